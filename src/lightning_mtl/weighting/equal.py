"""Equal weighting: ``L = Σᵢ Lᵢ``, the baseline every MTL paper compares against. Cost: none."""

from __future__ import annotations

import torch

from lightning_mtl.weighting.base import LossWeighting, StepContext
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("equal")
class Equal(LossWeighting):
    """Every present task has weight 1."""

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        return torch.ones_like(losses)
