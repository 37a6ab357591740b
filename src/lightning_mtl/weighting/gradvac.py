"""GradVac, Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021).

For each task i and, in a random order, each other task j: if the cosine ``φᵢⱼ`` of the (already
adjusted) gᵢ and gⱼ falls below its running target ``φ̂ᵢⱼ``, add the multiple of gⱼ that raises
it to the target,

    gᵢ ← gᵢ + ‖gᵢ‖ (φ̂ᵢⱼ √(1−φᵢⱼ²) − φᵢⱼ √(1−φ̂ᵢⱼ²)) / (‖gⱼ‖ √(1−φ̂ᵢⱼ²)) · gⱼ,

then ``φ̂ᵢⱼ ← (1−β) φ̂ᵢⱼ + β φᵢⱼ``; ``d = Σ gᵢ``. PCGrad is the case φ̂ = 0. Every adjustment is a
multiple of an original gradient, so the rule reads G alone: with ``gᵢ' = Σₖ Cᵢₖ gₖ``,
``‖gᵢ'‖² = Cᵢ G Cᵢᵀ`` and ``gᵢ'·gⱼ = Cᵢ G₍:,ⱼ₎``; the weights are the column sums of C. Cost:
O(k³) per step.

The loop is torchjd's ``GradVacWeighting`` (the same random draws: one ``randperm`` of the other
tasks per i, so a run with the same seed makes the same choices) without its absolute
``eps = 1e-8`` in the denominators, which made the cosine of gradients with norms near 1e-4 about
half its value. A pair is skipped instead where the paper's formula is undefined: a zero
gradient (no cosine: no adjustment, its target unchanged) and a target of ±1 (unreachable by a
finite multiple: its target still moves). Its state, the k×k targets φ̂, is a buffer here
(checkpointed); only the present tasks' block is read and updated, so a task absent from a batch
keeps its targets. The order is drawn from the per-step generator (same on every rank).
Corners: one task, ``d = g``; parallel gradients never fall below their target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.aggregators import zero_gradients
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


def gradvac_weights(gram: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """GradVac's weights from G (float64); ``targets`` (m×m) are updated in place."""
    m = len(gram)
    zero = zero_gradients(gram).tolist()
    norms = gram.diagonal().clamp_min(0).sqrt()
    coefficients = torch.eye(m, dtype=gram.dtype)
    for i in range(m):
        dots = gram[i].clone()  # gᵢ'·gⱼ for every j
        others = [j for j in range(m) if j != i]
        order = [others[p] for p in torch.randperm(len(others)).tolist()]
        for j in order:
            norm_i = float((dots * coefficients[i]).sum().clamp_min(0).sqrt())
            if zero[i] or zero[j] or norm_i == 0.0:
                continue
            cosine = float(dots[j]) / (norm_i * float(norms[j]))
            target = float(targets[i, j])
            room = max(1.0 - target * target, 0.0) ** 0.5
            if cosine < target and room > 0:
                gap = max(1.0 - cosine * cosine, 0.0) ** 0.5
                step = norm_i * (target * gap - cosine * room) / (float(norms[j]) * room)
                coefficients[i, j] += step
                dots += step * gram[j]
            targets[i, j] = (1.0 - beta) * target + beta * cosine
    return coefficients.sum(0)


@WEIGHTINGS.register("gradvac")
class GradVac(GradientWeighting):
    """GradVac with target EMA rate ``beta`` (in [0, 1])."""

    def __init__(
        self, tasks: Sequence[str], level: str = "representation", seed: int = 0, beta: float = 0.5
    ) -> None:
        super().__init__(tasks, level, seed)
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"weighting.beta={beta}: expected a number in [0, 1]")
        k = len(self.tasks)
        self.register_buffer("targets", torch.zeros(k, k, dtype=torch.float64))
        self.beta = float(beta)

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        block = torch.tensor(present, device=self.targets.device)
        targets = self.targets[block][:, block].cpu().double()
        weights = gradvac_weights(gram.double().cpu(), targets, self.beta)
        self.targets[block.unsqueeze(1), block] = targets.to(self.targets)
        return weights.to(gram)
