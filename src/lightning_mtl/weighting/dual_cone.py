"""UPGrad and DualProj (Quinton & Rey, 2024): exact projections onto the dual cone of the task
gradients (torchjd adds ``1e-4·I`` to G; ``docs/torchjd_notes.md``)."""

from __future__ import annotations

import torch
from scipy.optimize import nnls

from lightning_mtl.weighting.aggregators import (
    PreferenceWeighting,
    psd_factor,
    zero_gradients,
)
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.registry import WEIGHTINGS


def dual_cone_weights(gram: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each row u of ``targets`` (n×m, or one vector), the weights v with ``Jᵀv`` the exact
    projection of ``Jᵀu`` onto the dual cone ``{x : Jx ≥ 0}``.

    Quinton & Rey (2024), Prop. 1: ``v = argmin vᵀGv`` subject to ``v ≥ u``. With ``v = u + s``,
    ``s ≥ 0``, and G factored as ``M Mᵀ``, this is the non-negative least squares problem
    ``min ‖Mᵀ s + Mᵀ u‖``, solved exactly (Lawson-Hanson) on the unit-diagonal
    ``D^{-½} G D^{-½}`` (factored once for all rows), so gradients of any relative scale are
    projected to the same relative accuracy. A zero gradient constrains nothing (its ``s`` is 0).
    """
    rows = targets.reshape(-1, len(gram))
    result = rows.clone()
    live = (~zero_gradients(gram)).nonzero().flatten()
    if len(live):
        block = gram[live][:, live]
        norms = block.diagonal().sqrt()
        unit = block / norms[:, None] / norms[None, :]
        factor = psd_factor(((unit + unit.T) / 2).cpu().numpy()).T
        scaled = (rows[:, live] * norms).cpu().numpy()
        for row, u in enumerate(scaled):
            t, _ = nnls(factor, -(factor @ u), maxiter=50 * len(live) + 100)
            result[row, live] += torch.from_numpy(t).to(result) / norms
    return result.reshape(targets.shape)


@WEIGHTINGS.register("upgrad")
class UPGrad(PreferenceWeighting):
    """UPGrad (Quinton & Rey, 2024, "Jacobian descent"): project onto the dual cone of the rows.

    Each gradient gᵢ is projected onto ``{x : Jx ≥ 0}`` (so it conflicts with no task), and the
    projections are averaged with the preference π (``1/k`` each by default):
    ``d = Σ πᵢ proj(gᵢ)``. Each projection is the exact solution of a small non-negative least
    squares problem on G (:func:`dual_cone_weights`); cost O(k⁴) at most.

    Ours, not torchjd's projector: torchjd normalises G by its trace, replaces it by 0 when the
    trace is below an absolute 1e-4 (UPGrad becomes the mean for gradients of norm ≲ 1e-2) and
    adds ``1e-4·I``, which moves d by ~5e-4 relative and, with gradients 1e4 apart in scale, leaves
    the small tasks' conflicts in place (cosine −0.8 with a task). With its regularisation turned
    down (``QuadprogProjector(reg_eps=1e-10)``) torchjd agrees with this to ~1e-9. Corners: one
    task, ``d = g``; a zero gradient is already in the cone; anti-parallel gradients give 0.
    """

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        pref = self.preference_or_mean(present, gram)
        return dual_cone_weights(gram, torch.diag(pref)).sum(0)


@WEIGHTINGS.register("dualproj")
class DualProj(PreferenceWeighting):
    """DualProj (Quinton & Rey, 2024): project the averaged gradient onto the dual cone of J.

    ``d = proj_{x : Jx ≥ 0}(Σ πᵢ gᵢ)``: the closest direction to the average that conflicts
    with no task (cf. GEM, Lopez-Paz & Ranzato 2017); one exact projection
    (:func:`dual_cone_weights`, see :class:`UPGrad` for why it is not torchjd's).
    """

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        return dual_cone_weights(gram, self.preference_or_mean(present, gram))
