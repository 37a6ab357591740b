"""ConFIG, Conflict-Free Inverse Gradients (Liu, Chu & Thuerey, ICLR 2025).

With unit gradients ``uᵢ = gᵢ/‖gᵢ‖`` (rows of U), the direction is the one with equal cosine to
every task, ``u = normalize(U⁺ 1)``, scaled by the sum of projections, ``d = (Σᵢ gᵢ·u) u``.

torchjd ships ConFIG as an aggregator of the k×D Jacobian only. It is written here as a weighting
of the Gram matrix, so it needs no k×D matrix: with ``D = diag(G)`` and ``Gᵤ = D^{-½} G D^{-½}``
(the Gram matrix of U), ``U⁺ 1 = Uᵀ a`` for ``a = Gᵤ⁺ 1`` and ``‖Uᵀ a‖² = aᵀ Gᵤ a``, so

    d = Jᵀ w,   w = D^{-½} a · (1ᵀ G D^{-½} a) / (aᵀ Gᵤ a).

A test checks ``Jᵀ w`` against torchjd's aggregator. Cost: one k×k pseudo-inverse.
"""

from __future__ import annotations

import torch

from lightning_mtl.weighting.aggregators import PreferenceWeighting
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.registry import WEIGHTINGS


def config_weights(gram: torch.Tensor, pref: torch.Tensor | None = None) -> torch.Tensor:
    """ConFIG's weights from the Gram matrix (``pref`` replaces the vector of ones)."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))  # a zero gradient drops out
    unit_gram = gram * inv[:, None] * inv[None, :]
    target = torch.ones_like(norms) if pref is None else pref.to(norms)
    a = torch.linalg.pinv(unit_gram, hermitian=True) @ target
    squared = a @ unit_gram @ a
    if squared <= 0:
        return torch.zeros_like(norms)
    coefficients = inv * a
    return coefficients * (gram @ coefficients).sum() / squared


@WEIGHTINGS.register("config")
class ConFIG(PreferenceWeighting):
    """ConFIG; ``pref_vector`` (one number per task) replaces the equal-cosine target."""

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        return config_weights(gram, self.present_preference(present))
