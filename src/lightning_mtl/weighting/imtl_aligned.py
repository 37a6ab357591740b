"""IMTL-G and Aligned-MTL: the two rules that read the rank of G, decided on the unit gradients
at the gradients' noise level (:func:`~lightning_mtl.weighting.aggregators.gram_range`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.aggregators import (
    PreferenceWeighting,
    psd_pinv,
    range_eigh,
)
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("imtl_g")
class IMTLG(GradientWeighting):
    """IMTL-G (Liu et al., ICLR 2021): the direction with equal projections on each unit gradient.

    ``d = Jᵀw`` with ``d·uᵢ`` equal for all i (``uᵢ = gᵢ/‖gᵢ‖``) and ``Σ wᵢ = 1``: with
    ``n = √diag(G)``, ``w = G⁺n / Σ(G⁺n)`` (the paper's closed form when G is invertible; the
    pseudo-inverse is the generalisation of Quinton & Rey 2024 that torchjd implements, for
    dependent gradients). Cost: one k×k eigendecomposition.

    Ours, not torchjd's ``IMTLGWeighting``, for two details: the pseudo-inverse is taken on G's
    numerical range (:func:`gram_range`: rank decided on the unit gradients at the float32
    gradients' noise level; torchjd's ``k·eps64`` threshold on G reads the round-off of a Gram
    matrix of long gradients as rank, e.g. ``w = (1, 1, −1)``, d ≈ 0, for ``g₃ = g₁ + g₂`` with D = 1e5), and
    the test for a vanishing ``Σ(G⁺n)`` is relative (torchjd's absolute 1e-12 zeroes the weights
    of gradients with norms above ~1e12). Corners: a zero gradient has ``nᵢ = 0`` and drops out
    (the paper's unit vector is undefined); one task, ``d = g``; anti-parallel gradients and more
    tasks than dimensions are the pseudo-inverse's least-squares case, as in torchjd; if
    ``G⁺n = 0`` (e.g. ``g₂ = −g₁``) the only equal-projection direction is 0: ``w = n/Σn``.
    """

    exact_gram = True  # a solve/pseudo-inverse/eigen cut-off of G: G in float64

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        scale = float(gram.diagonal().max())
        if not scale > 0:
            return gram.new_full((len(present),), 1.0 / len(present))
        gram = gram / scale  # w is scale-free; this keeps the tests below relative
        norms = gram.diagonal().clamp_min(0).sqrt()
        v = psd_pinv(gram) @ norms
        total = v.sum()
        if float(total.abs()) <= 1e-12 * float(v.abs().sum()) or not float(v.abs().sum()) > 0:
            return norms / norms.sum()
        return v / total


@WEIGHTINGS.register("aligned_mtl")
class AlignedMTL(PreferenceWeighting):
    """Aligned-MTL (Senushkin et al., CVPR 2023): align the principal components of J.

    With ``G = V Λ Vᵀ`` restricted to its rank r, the gradients are replaced by a well-conditioned
    system ``Ĵ = σ Λ^{-1/2} Vᵀ J`` (all singular values equal to σ, set by ``scale_mode``: the
    smallest kept one, ``min``, by default; ``median``; ``rmse``: the mean eigenvalue), and
    ``d = Ĵᵀ π`` for the preference π (``1/k`` each by default): ``w = σ V Λ^{-1/2} Vᵀ π``. Cost:
    one k×k eigendecomposition.

    Ours, not torchjd's: the eigendecomposition is taken on G's numerical range
    (:func:`gram_range`, rank decided on the unit gradients: singular values below 1e-5 of the
    largest are the float32 gradients' noise; the official code cuts eigenvalues of a float32 G
    at ``k · eps_float32``, that G's own round-off, which also drops real directions whose
    singular value is below ~6e-4). torchjd uses ``k · eps64 · λ_max`` on G itself, which reads the
    round-off of a Gram matrix of long gradients as rank (D = 1e5, ``g₃ = g₁ + g₂``: σ collapses
    to the round-off and d ≈ 0); the official code, on G itself, would drop a task 1e4 times
    smaller than the others, which here stays rank (as in torchjd). Corners: a zero gradient has
    no component in the kept eigenvectors (weight 0); one task, ``d = π g``; all gradients zero
    (rank 0), ``w = π`` (d = 0).
    """

    exact_gram = True  # a solve/pseudo-inverse/eigen cut-off of G: G in float64

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        pref_vector: Sequence[float] | None = None,
        scale_mode: str = "min",
    ) -> None:
        super().__init__(tasks, level, seed, pref_vector)
        if scale_mode not in ("min", "median", "rmse"):
            raise ConfigError(
                f"weighting.scale_mode={scale_mode!r}: expected one of min, median, rmse"
            )
        self.scale_mode = scale_mode

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        pref = self.preference_or_mean(present, gram)
        values, vectors = range_eigh(gram)
        if len(values) == 0:
            return pref
        if self.scale_mode == "min":
            sigma2 = values.min()
        elif self.scale_mode == "median":
            sigma2 = values.median()
        else:
            sigma2 = values.mean()
        balance = sigma2.sqrt() * (vectors / values.sqrt()) @ vectors.T
        return balance @ pref
