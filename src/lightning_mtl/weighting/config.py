"""ConFIG, Conflict-Free Inverse Gradients (Liu, Chu & Thuerey, ICLR 2025).

With unit gradients ``uᵢ = gᵢ/‖gᵢ‖`` (rows of U), the direction is the one with equal cosine to
every task, ``u = normalize(U⁺ 1)``, scaled by the sum of projections, ``d = (Σᵢ gᵢ·u) u``.

torchjd ships ConFIG as an aggregator of the k×D Jacobian only. It is written here as a weighting
of the Gram matrix, so it needs no k×D matrix: with ``D = diag(G)`` and ``Gᵤ = D^{-½} G D^{-½}``
(the Gram matrix of U), ``U⁺ 1 = Uᵀ a`` for ``a = Gᵤ⁺ 1`` and ``‖Uᵀ a‖² = aᵀ Gᵤ a``, so

    d = Jᵀ w,   w = D^{-½} a · (1ᵀ G D^{-½} a) / (aᵀ Gᵤ a).

The pseudo-inverse of Gᵤ is taken on its numerical range
(:func:`~lightning_mtl.weighting.aggregators.gram_range`: singular values of the unit gradients
above 1e-5 of the largest), the Gram analogue of the official code's least squares on the
float32 unit matrix: round-off of dependent gradients is not rank (torchjd's aggregator, given
the float64 cast of float32 rows with ``g₃ = g₁ + g₂``, inverts that round-off and returns a
direction of norm ~1e-5 instead of ~90), while gradients 1e-4 from anti-parallel (the CAGrad
toy's Pareto set) keep their equal-cosine direction. A test checks ``Jᵀ w`` against torchjd's aggregator. Cost: one k×k eigendecomposition.

Corners: a zero gradient has no unit vector and drops out (weight 0), as in the official code
(``nan_to_num``); one task gives ``d = g``; anti-parallel gradients (``1 ⊥ range Gᵤ``) give 0,
the only direction with equal cosine to both; more tasks than dimensions is the pseudo-inverse's
least-squares case, as in the paper.
"""

from __future__ import annotations

import torch

from lightning_mtl.weighting.aggregators import PreferenceWeighting, psd_pinv, zero_gradients
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.registry import WEIGHTINGS


def config_weights(gram: torch.Tensor, pref: torch.Tensor | None = None) -> torch.Tensor:
    """ConFIG's weights from the Gram matrix (``pref`` replaces the vector of ones)."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    live = ~zero_gradients(gram)
    inv = torch.where(live, 1.0 / torch.where(live, norms, 1.0), 0.0)  # a zero gradient drops out
    unit_gram = gram * inv[:, None] * inv[None, :]
    target = torch.ones_like(norms) if pref is None else pref.to(norms)
    a = psd_pinv(unit_gram) @ target
    squared = a @ unit_gram @ a
    if not squared > 1e-20 * float(target @ target):
        return torch.zeros_like(norms)  # Uᵀa = 0: no direction has equal cosine with every task
    coefficients = inv * a
    return coefficients * (gram @ coefficients).sum() / squared


@WEIGHTINGS.register("config")
class ConFIG(PreferenceWeighting):
    """ConFIG; ``pref_vector`` (one number per task) replaces the equal-cosine target."""

    exact_gram = True  # a solve/pseudo-inverse/eigen cut-off of G: G in float64

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        return config_weights(gram, self.present_preference(present))
