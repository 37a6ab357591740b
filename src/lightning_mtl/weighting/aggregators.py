"""Gram-matrix rules, one small class each: torchjd's where it follows the paper, ours where not.

Each rule maps the float64 Gram matrix ``G = J Jᵀ`` of the present tasks' gradients to weights w;
the combined gradient is ``Jᵀw`` (see :mod:`lightning_mtl.weighting.gradient` for how the step
applies it at the representation or the parameter level). The rules read G in float64 and solve
in float64. Cost of a rule itself: O(k³) on k×k numbers, plus a small convex program for CAGrad.

Every rule is defined on every input a step can produce: one present task, a zero gradient,
gradients of very different scales, a singular G (dependent, parallel or anti-parallel
gradients; more tasks than gradient dimensions). Where torchjd 0.18 deviates from a paper there,
the piece is ours and its docstring says why (``docs/torchjd_notes.md`` has the reproductions):

* a rank decision (IMTL-G, Aligned-MTL, ConFIG) is made on the Gram matrix of the unit gradients
  at the gradients' noise level, singular values below 1e-5 of the largest in full float32
  (6e-4 under TF32 or autocast; :func:`gram_range`, :func:`rank_tolerance`): torchjd's
  threshold, ``k·eps64`` on G, reads the
  round-off of G itself as rank once the gradients are long (D = 1e5: IMTL-G and Aligned-MTL
  give a direction ~0 for exactly dependent gradients);
* CAGrad solves the paper's dual exactly; torchjd returns an all-zero update below an absolute
  ``norm_eps`` (a zero task gradient, scales 1e4 apart, or merely small gradients);
* UPGrad and DualProj project exactly; torchjd adds ``1e-4·I`` to the trace-normalised G, which
  moves the result by ~1e-3 and, with scales 1e4 apart, leaves strong conflicts in place;
* FairGrad solves for per-task scaled unknowns (on G itself, torchjd's least squares stops far
  short when scales are 1e4 apart) and leaves zero gradients out of its equation, which has no
  solution for them.

This file holds the helpers every Gram rule shares (rank, range, pseudo-inverse, factor) and the
rules torchjd serves as the papers define them (MGDA, MGDA-UB, PCGrad); the others are one file
each: ``cagrad.py``, ``imtl_aligned.py``, ``dual_cone.py``, ``fairgrad.py``, ``nash_mtl.py``,
``gradvac.py``, ``config.py`` (ConFIG).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torchjd import aggregation as jd
from torchjd.linalg import PSDMatrix

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS

#: a direction of the unit gradients whose singular value is below this fraction of the largest
#: is noise, for full-precision float32 gradients (see :func:`rank_tolerance`)
RANK_RTOL = 1e-5
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
#: a task gradient with ``‖gᵢ‖² ≤ ZERO_RATIO · max ‖gⱼ‖²`` is zero (float64 round-off of G)
ZERO_RATIO = float(torch.finfo(torch.float64).eps)


# ------------------------------------------------------------------------------------ helpers
def preference_vector(pref: Sequence[float] | None, k: int) -> torch.Tensor | None:
    """A method's ``pref_vector`` as a float64 tensor, checked to hold one number per task."""
    if pref is None:
        return None
    if len(pref) != k:
        raise ConfigError(f"weighting.pref_vector has {len(pref)} numbers; expected {k}")
    return torch.tensor([float(p) for p in pref], dtype=torch.float64)


def reduced_precision(device: torch.device) -> bool:
    """Whether the task gradients on ``device`` come from reduced-precision arithmetic: autocast
    (16-mixed, bf16-mixed) is on, or on CUDA float32 matmuls or cuDNN convolutions may use TF32
    (``utils/setup.py`` asks for TF32 matmuls; cuDNN allows TF32 convolutions by default)."""
    if torch.is_autocast_enabled(device.type):
        return True
    if device.type != "cuda":
        return False
    return torch.get_float32_matmul_precision() != "highest" or torch.backends.cudnn.allow_tf32


def rank_tolerance(eigenvalues: torch.Tensor) -> float:
    """The eigenvalue below which a direction of a unit-diagonal Gram matrix is noise.

    Full-precision float32 gradients: ``RANK_RTOL² · λ_max``, a singular value of the unit
    gradients below 1e-5 of the largest. G is formed in float64, so its own round-off (~1e-16
    relative) is far below; two float32 backward passes that should give dependent gradients (a
    task that is the sum of two others) agree to ~1e-7-1e-6 relative, which is where their
    round-off puts the spurious singular values. A direction above 1e-5 is signal, which the
    papers' algorithms (exact pseudo-inverses) invert: on the CAGrad toy next to the Pareto set
    the two gradients are 1e-4 from anti-parallel and ConFIG's direction is still defined there
    (the official code's float32 least squares keeps it).

    Reduced precision (:func:`reduced_precision`: TF32, autocast) leaves ~1e-4-1e-3 relative
    noise in the gradients, which the fine cut would invert (g₃ = g₁ + g₂ with 3e-5 noise already
    gives IMTL-G ``w = (1, 1, −1)``): there the cut is ``k · eps₃₂ · λ_max`` (singular values
    below ~6e-4 at k = 3), the official Aligned-MTL threshold, correct up to 1e-3 noise."""
    top = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
    if reduced_precision(eigenvalues.device):
        return max(top, 0.0) * len(eigenvalues) * FLOAT32_EPS
    return max(top, 0.0) * RANK_RTOL**2


def gram_range(gram: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (k×r) of the range of a symmetric PSD G, r its numerical rank.

    The rank is decided on the angles, not the scales: on ``Gᵤ = D^{-½} G D^{-½}`` (the Gram
    matrix of the unit gradients) with :func:`rank_tolerance`, so a task 1e4 times smaller than
    the others is rank, while the round-off of dependent float32 gradients is not. The null
    space of G is ``D^{-½}`` times that of Gᵤ, plus the zero gradients' axes."""
    k = len(gram)
    zero = zero_gradients(gram)
    live = (~zero).nonzero().flatten()
    null = [torch.eye(k, dtype=gram.dtype, device=gram.device)[:, zero]]
    if len(live):
        norms = gram.diagonal()[live].sqrt()
        unit = gram[live][:, live] / norms[:, None] / norms[None, :]
        values, vectors = torch.linalg.eigh((unit + unit.T) / 2)
        dropped = vectors[:, values <= rank_tolerance(values)] / norms[:, None]
        embedded = gram.new_zeros(k, dropped.shape[1])
        embedded[live] = dropped
        null.append(embedded)
    basis = torch.cat(null, dim=1)
    if basis.shape[1] == 0:
        return torch.eye(k, dtype=gram.dtype, device=gram.device)
    if basis.shape[1] == k:
        return gram.new_zeros(k, 0)
    complete, _ = torch.linalg.qr(basis, mode="complete")
    return complete[:, basis.shape[1] :]


def range_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nonzero eigenvalues of G and their eigenvectors (k×r), on :func:`gram_range`."""
    basis = gram_range(gram)
    reduced = basis.T @ gram @ basis
    values, vectors = torch.linalg.eigh((reduced + reduced.T) / 2)
    return values.clamp_min(torch.finfo(gram.dtype).tiny), basis @ vectors


def psd_pinv(gram: torch.Tensor) -> torch.Tensor:
    """The pseudo-inverse of a symmetric PSD G on its numerical range (:func:`gram_range`)."""
    values, vectors = range_eigh(gram)
    return (vectors / values) @ vectors.T


def zero_gradients(gram: torch.Tensor) -> torch.Tensor:
    """A mask of the tasks whose gradient is zero (to the float64 round-off of G)."""
    diagonal = gram.diagonal()
    return (
        diagonal <= ZERO_RATIO * max(float(diagonal.max()), 0.0) if len(diagonal) else diagonal > 0
    )


def psd_factor(gram: np.ndarray) -> np.ndarray:
    """A square M with ``M Mᵀ = G`` for a symmetric PSD G (negative round-off clipped)."""
    values, vectors = np.linalg.eigh(gram)
    return vectors * np.sqrt(np.clip(values, 0.0, None))


class TorchJDWeighting(GradientWeighting):
    """A stateless torchjd Gram weighting applied to the present tasks' Gram matrix.

    Subclasses set ``self._rule`` once, or override :meth:`rule` when it depends on the
    present tasks (a preference vector restricted to them).
    """

    _rule: jd.Weighting[PSDMatrix]

    def rule(self, present: list[int]) -> jd.Weighting[PSDMatrix]:
        return self._rule

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        # the present tasks' Gram matrix J Jᵀ: torchjd's PSDMatrix is a static type only
        return self.rule(present)(cast(PSDMatrix, gram))


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

    def preference_or_mean(self, present: list[int], gram: torch.Tensor) -> torch.Tensor:
        """π of the present tasks, or ``1/m`` each (torchjd's default for the dual-cone rules)."""
        pref = self.present_preference(present)
        m = len(present)
        return gram.new_full((m,), 1.0 / m) if pref is None else pref.to(gram)


# ---------------------------------------------------------------------------------- the rules
@WEIGHTINGS.register("mgda")
class MGDA(TorchJDWeighting):
    """MGDA (Désidéri 2012; Sener & Koltun, NeurIPS 2018): the min-norm point of the hull.

    ``w = argmin_{w ∈ Δ} ‖Jᵀw‖² = argmin wᵀGw`` over the simplex, solved by the paper's
    Frank-Wolfe (torchjd's; ``max_iters``, tolerance ``epsilon``). The direction decreases every
    task's loss when one exists. Cost: ``max_iters`` k×k products. At ``level=representation``
    this is MGDA-UB. Corners, as in the paper: one task gets weight 1; a zero gradient, or a
    pair of anti-parallel ones, puts 0 in the hull, so the direction is 0 (Pareto-stationary);
    the smallest gradient dominates when scales differ.
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
        if not epsilon > 0 or int(max_iters) < 1:
            raise ConfigError(
                f"weighting.epsilon={epsilon}, weighting.max_iters={max_iters}: "
                "expected epsilon > 0 and max_iters >= 1"
            )
        self._rule = jd.MGDAWeighting(epsilon=epsilon, max_iters=int(max_iters))


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
    the original gradients, so the weights follow from G alone (torchjd's rule, exact: no ε).
    The order is drawn from the per-step generator, so DDP ranks (and a resumed run) project in
    the same order. Cost: O(k³). Corners, as in the paper: a zero gradient conflicts with nothing
    (weight 1, no division); one task gives ``d = g``; anti-parallel gradients cancel (d = 0).

    The loop is torchjd's ``PCGradWeighting`` (the same draws: one ``randperm`` of all tasks per
    task, in turn), its k² scalar steps in NumPy: torch's per-operation overhead made them 14 ms
    at 40 tasks on one CPU thread (a fifth of ``equal``'s step in the cost benchmark), NumPy's
    1.7 ms (the same weights: 1e-16 relative in float64).
    """

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        g = gram.detach().cpu().numpy()
        k = g.shape[0]
        weights = np.zeros(k, dtype=g.dtype)
        for i in range(k):
            order = torch.randperm(k).tolist()
            projected = np.zeros(k, dtype=g.dtype)
            projected[i] = 1.0
            for j in order:
                if j == i:
                    continue
                inner = g[j] @ projected  # ⟨gᵢ^PC, gⱼ⟩
                if inner < 0.0:
                    projected[j] -= inner / g[j, j]
            weights += projected
        return torch.from_numpy(weights).to(gram)
