"""Geometric Loss Strategy (Chennupati, Sistu, Yogamani & Rawashdeh, CVPR Workshops 2019,
"MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task
Learning").

The objective is the geometric mean of the task losses, which is invariant to the scale of
each loss (multiplying Lᵢ by a constant scales the objective, not the balance):

    L = (Πᵢ dᵢ)^(1/k),      ∂L/∂Lᵢ = G / (k·dᵢ),      dᵢ = Lᵢ − mᵢ + ε

with ``mᵢ`` the loss's known lower bound (``min_losses``, 0 by default: the paper's Lᵢ) and
ε = 1e-8, so the effective weight of a task is inversely proportional to its distance. It is
computed here as ``Σ wᵢ Lᵢ`` with ``wᵢ = G / (k·dᵢ)`` taken from the losses averaged over DDP
ranks: the summed gradient is then exactly the gradient of the geometric mean of the global
losses (a per-rank geometric mean would not average to it). Cost per step: O(k), one all-reduce
of k numbers.

Corners: k is the number of tasks present (one task present: weight 1); no state. ``Lᵢ < mᵢ`` is
refused (``ValueError``: set ``weighting.min_losses``); ``Lᵢ = mᵢ`` gives ``dᵢ = ε``, a large
weight for that task, finite. A non-finite loss: the others are weighted as if it were absent,
it gets weight 0 (:func:`~lightning_mtl.weighting.loss_checks.skip_non_finite`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_mtl.weighting.base import LossWeighting, StepContext
from lightning_mtl.weighting.loss_checks import (
    EPS,
    CheckedLossWeighting,
    distance_to_bound,
    lower_bounds,
)
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("gls")
class GeometricLossStrategy(CheckedLossWeighting, LossWeighting):
    """Weights ``G / (k·dᵢ)`` with G the geometric mean of the (global) distances ``dᵢ``."""

    # buffers (register_buffer in __init__), declared for the type checker
    min_losses: torch.Tensor

    reads_loss_values = True

    def __init__(
        self,
        tasks: Sequence[str],
        eps: float = EPS,
        min_losses: float | Sequence[float] | Mapping[str, float] = 0.0,
    ) -> None:
        super().__init__(tasks)
        self.eps = eps
        bounds = lower_bounds(self.tasks, min_losses, "gls")
        self.register_buffer("min_losses", bounds, persistent=False)

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        values = self.loss_values(losses, present, context)
        shifted = distance_to_bound(self, values, present) + self.eps
        geometric_mean = shifted.log().mean().exp()
        return geometric_mean / (len(present) * shifted)
