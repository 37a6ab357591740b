"""Equal weighting: ``L = Σᵢ Lᵢ``, the baseline every MTL paper compares against. Cost: none.

Corners: every present task weighs 1 (one task present: its loss); the weights read no value,
so zero and negative losses are summed as they are, and a non-finite loss too (weight 1; the
combined loss is then non-finite and a GradScaler skips the step). Equal has no state to poison,
so it reads no loss value at all: no device-to-host copy per step.
"""

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
