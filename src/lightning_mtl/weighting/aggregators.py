"""Gram-matrix rules taken from torchjd, one small class each.

Each rule maps the Gram matrix ``G = J Jᵀ`` of the present tasks' gradients to weights w; the
combined gradient is ``Jᵀw`` (see :mod:`lightning_mtl.weighting.gradient` for how the step applies
it at the representation or the parameter level). The rules are torchjd's ``...Weighting``
classes (pinned in pyproject.toml): well tested, and written for exactly this input. What is ours
is the step around them. Cost of a rule itself: O(k³) at most, on k×k numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchjd import aggregation as jd

from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


def preference_vector(pref: Sequence[float] | None, k: int) -> torch.Tensor | None:
    """A method's ``pref_vector`` as a float64 tensor, checked to hold one number per task."""
    if pref is None:
        return None
    if len(pref) != k:
        raise ValueError(f"weighting.pref_vector has {len(pref)} numbers; expected {k}")
    return torch.tensor([float(p) for p in pref], dtype=torch.float64)


class TorchJDWeighting(GradientWeighting):
    """A stateless torchjd Gram weighting applied to the present tasks' Gram matrix.

    Subclasses set ``self._rule`` once, or override :meth:`rule` when it depends on the
    present tasks (a preference vector restricted to them).
    """

    _rule: jd.Weighting

    def rule(self, present: list[int]) -> jd.Weighting:
        return self._rule

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        return self.rule(present)(gram)


class PreferenceWeighting(GradientWeighting):
    """A rule parametrised by a preference π over the tasks (``pref_vector``)."""

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        pref_vector: Sequence[float] | None = None,
    ) -> None:
        super().__init__(tasks, level, seed)
        self.pref = preference_vector(pref_vector, len(self.tasks))

    def present_preference(self, present: list[int]) -> torch.Tensor | None:
        """π restricted to the present tasks (None: the rule's uniform default)."""
        return None if self.pref is None else self.pref[present]


@WEIGHTINGS.register("mgda")
class MGDA(TorchJDWeighting):
    """MGDA (Désidéri 2012; Sener & Koltun, NeurIPS 2018): the min-norm point of the hull.

    ``w = argmin_{w ∈ Δ} ‖Jᵀw‖² = argmin wᵀGw`` over the simplex, solved by Frank-Wolfe
    (``max_iters``, tolerance ``epsilon``). The direction decreases every task's loss when one
    exists (a Pareto-stationary point gives 0). At ``level=representation`` this is MGDA-UB.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        epsilon: float = 1e-3,
        max_iters: int = 100,
    ) -> None:
        super().__init__(tasks, level, seed)
        self._rule = jd.MGDAWeighting(epsilon=epsilon, max_iters=max_iters)


@WEIGHTINGS.register("mgda_ub")
class MGDAUB(MGDA):
    """MGDA-UB (Sener & Koltun 2018): MGDA on the gradients of the shared representation.

    The paper's upper bound: ``‖∂L/∂θ‖ ≤ ‖∂z/∂θ‖·‖∂L/∂z‖``, so minimising the norm of the
    combined representation gradient needs one backward through the encoder, not k.
    """

    levels = ("representation",)
    level_note = "MGDA-UB is MGDA at the representation level; for params use weighting=mgda."


@WEIGHTINGS.register("pcgrad")
class PCGrad(TorchJDWeighting):
    """PCGrad (Yu et al., NeurIPS 2020): project away conflicting components, then sum.

    For each task i, in a random order of the other tasks j: if ``gᵢ·gⱼ < 0`` then
    ``gᵢ ← gᵢ − (gᵢ·gⱼ/‖gⱼ‖²) gⱼ``; ``d = Σ gᵢ``. Every projection is a linear combination of
    the original gradients, so the weights follow from G alone. The order is drawn from the
    per-step generator, so DDP ranks (and a resumed run) project in the same order.
    """

    def __init__(self, tasks: Sequence[str], level: str = "representation", seed: int = 0) -> None:
        super().__init__(tasks, level, seed)
        self._rule = jd.PCGradWeighting()


@WEIGHTINGS.register("cagrad")
class CAGrad(TorchJDWeighting):
    """CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent.

    ``max_d min_i gᵢ·d`` subject to ``‖d − ḡ‖ ≤ c‖ḡ‖`` (ḡ the mean gradient), solved in its
    dual over the simplex on G; ``c`` trades the worst task's improvement against the average
    (c = 0 is plain averaging). Needs cvxpy.
    """

    def __init__(
        self, tasks: Sequence[str], level: str = "representation", seed: int = 0, c: float = 0.4
    ) -> None:
        super().__init__(tasks, level, seed)
        self._rule = jd.CAGradWeighting(c=c)


@WEIGHTINGS.register("imtl_g")
class IMTLG(TorchJDWeighting):
    """IMTL-G (Liu et al., ICLR 2021): the direction with equal projections on each unit gradient.

    ``d = Jᵀw`` with ``d·uᵢ`` equal for all i (uᵢ = gᵢ/‖gᵢ‖) and ``Σ wᵢ = 1``: a closed form with
    one k×k solve.
    """

    def __init__(self, tasks: Sequence[str], level: str = "representation", seed: int = 0) -> None:
        super().__init__(tasks, level, seed)
        self._rule = jd.IMTLGWeighting()


@WEIGHTINGS.register("aligned_mtl")
class AlignedMTL(PreferenceWeighting, TorchJDWeighting):
    """Aligned-MTL (Senushkin et al., CVPR 2023): align the principal components of J.

    With ``G = V Λ Vᵀ``, the gradients are replaced by a well-conditioned system
    ``Ĵ = σ Λ^{-1/2} Vᵀ J`` (all singular values equal to σ, set by ``scale_mode``: the smallest
    one by default), and ``d = Ĵᵀ π`` for the preference π (uniform by default).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        pref_vector: Sequence[float] | None = None,
        scale_mode: str = "min",
    ) -> None:
        super().__init__(tasks, level, seed, pref_vector)
        self.scale_mode = scale_mode

    def rule(self, present: list[int]) -> jd.Weighting:
        pref = self.present_preference(present)
        return jd.AlignedMTLWeighting(pref_vector=pref, scale_mode=self.scale_mode)


@WEIGHTINGS.register("upgrad")
class UPGrad(PreferenceWeighting, TorchJDWeighting):
    """UPGrad (Quinton & Rey, 2024, "Jacobian descent"): project onto the dual cone of the rows.

    Each gradient gᵢ is projected onto ``{x : Jx ≥ 0}`` (so it conflicts with no task), and the
    projections are averaged with the preference π: ``d = Σ πᵢ proj(gᵢ)``. Each projection is a
    small quadratic program on G (quadprog).
    """

    def rule(self, present: list[int]) -> jd.Weighting:
        return jd.UPGradWeighting(pref_vector=self.present_preference(present))


@WEIGHTINGS.register("dualproj")
class DualProj(PreferenceWeighting, TorchJDWeighting):
    """DualProj (Quinton & Rey, 2024): project the averaged gradient onto the dual cone of J.

    ``d = proj_{x : Jx ≥ 0}(Σ πᵢ gᵢ)``: the closest direction to the average that conflicts
    with no task (a QP on G; cf. GEM, Lopez-Paz & Ranzato 2017).
    """

    def rule(self, present: list[int]) -> jd.Weighting:
        return jd.DualProjWeighting(pref_vector=self.present_preference(present))


@WEIGHTINGS.register("fairgrad")
class FairGrad(TorchJDWeighting):
    """FairGrad (Ban & Ji, ICML 2024): α-fair utility maximisation over the tasks.

    Solves ``G w = w^{-1/α}`` (elementwise) for w > 0 with scipy: α = 1 is proportional fairness
    (as Nash-MTL), α → ∞ approaches max-min fairness.
    """

    def __init__(
        self, tasks: Sequence[str], level: str = "representation", seed: int = 0, alpha: float = 1.0
    ) -> None:
        super().__init__(tasks, level, seed)
        self._rule = jd.FairGradWeighting(alpha=alpha)
