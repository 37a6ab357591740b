"""Geometric Loss Strategy (Chennupati, Sistu, Yogamani & Rawashdeh, CVPR Workshops 2019,
"MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task
Learning").

The objective is the geometric mean of the task losses, which is invariant to the scale of
each loss (multiplying Lᵢ by a constant scales the objective, not the balance):

    L = (Πᵢ Lᵢ)^(1/k),      ∂L/∂Lᵢ = L / (k·Lᵢ)

so the effective weight of a task is inversely proportional to its loss. It is computed here as
``Σ wᵢ Lᵢ`` with ``wᵢ = G / (k·Lᵢ)`` taken from the losses averaged over DDP ranks: the summed
gradient is then exactly the gradient of the geometric mean of the global losses (a per-rank
geometric mean would not average to it). Cost per step: O(k), one all-reduce of k numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_mtl.weighting.base import LossWeighting, StepContext
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("gls")
class GeometricLossStrategy(LossWeighting):
    """Weights ``G / (k·Lᵢ)`` with G the geometric mean of the (global) losses."""

    reads_loss_values = True

    def __init__(self, tasks: Sequence[str], eps: float = 1e-8) -> None:
        super().__init__(tasks)
        self.eps = eps

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        global_losses = self.loss_values(losses, present, context).clamp_min(self.eps)
        geometric_mean = global_losses.log().mean().exp()
        return geometric_mean / (len(present) * global_losses)
