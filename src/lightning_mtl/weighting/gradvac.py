"""GradVac, Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021).

For each task i and, in a random order, each other task j: if the cosine ``φᵢⱼ`` of the (already
adjusted) gᵢ and gⱼ falls below its running target ``φ̂ᵢⱼ``, add the multiple of gⱼ that raises
it to the target,

    gᵢ ← gᵢ + ‖gᵢ‖ (φ̂ᵢⱼ √(1−φᵢⱼ²) − φᵢⱼ √(1−φ̂ᵢⱼ²)) / (‖gⱼ‖ √(1−φ̂ᵢⱼ²)) · gⱼ,

then ``φ̂ᵢⱼ ← (1−β) φ̂ᵢⱼ + β φᵢⱼ``; ``d = Σ gᵢ``. PCGrad is the case φ̂ = 0. The rule is torchjd's
``GradVacWeighting`` (from G alone). Its state, the k×k targets φ̂, is kept here in a buffer
(checkpointed) and only the present tasks' block is read and updated, so a task absent from a
batch keeps its targets. The order is drawn from the per-step generator (same on every rank).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchjd import aggregation as jd

from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("gradvac")
class GradVac(GradientWeighting):
    """GradVac with target EMA rate ``beta``."""

    def __init__(
        self, tasks: Sequence[str], level: str = "representation", seed: int = 0, beta: float = 0.5
    ) -> None:
        super().__init__(tasks, level, seed)
        k = len(self.tasks)
        self.register_buffer("targets", torch.zeros(k, k, dtype=torch.float64))
        self.beta = beta

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        rule = jd.GradVacWeighting(beta=self.beta)
        block = torch.tensor(present, device=self.targets.device)
        rule._phi_t = self.targets[block][:, block].cpu().clone()  # torchjd keeps it on the CPU
        rule._state_key = (len(present), gram.dtype)
        weights = rule(gram)
        self.targets[block.unsqueeze(1), block] = rule._phi_t.to(self.targets)
        return weights
