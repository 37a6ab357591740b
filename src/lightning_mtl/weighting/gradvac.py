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

import numpy as np
import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.aggregators import zero_gradients
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


def gradvac_weights(gram: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """GradVac's weights from G (float64); ``targets`` (m×m) are updated in place.

    The k(k−1) pair updates run on NumPy arrays and Python floats: each is a handful of
    operations on m numbers, where a torch call's dispatch (~10 µs) would dominate (40 tasks:
    1560 pairs, about 10× faster than the same loop on tensors)."""
    m = len(gram)
    zero = zero_gradients(gram).tolist()
    g = gram.double().cpu().numpy()
    phi = targets.double().cpu().numpy().copy()
    norms = np.sqrt(np.clip(np.diagonal(g), 0.0, None)).tolist()
    coefficients = np.eye(m)
    for i in range(m):
        dots = g[i].copy()  # gᵢ'·gⱼ for every j
        others = [j for j in range(m) if j != i]
        order = [others[p] for p in torch.randperm(len(others)).tolist()]
        row = coefficients[i]
        for j in order:
            norm_i = max(float(dots @ row), 0.0) ** 0.5
            if zero[i] or zero[j] or norm_i == 0.0:
                continue
            cosine = float(dots[j]) / (norm_i * norms[j])
            target = float(phi[i, j])
            room = max(1.0 - target * target, 0.0) ** 0.5
            if cosine < target and room > 0:
                gap = max(1.0 - cosine * cosine, 0.0) ** 0.5
                step = norm_i * (target * gap - cosine * room) / (norms[j] * room)
                row[j] += step
                dots += step * g[j]
            phi[i, j] = (1.0 - beta) * target + beta * cosine
    targets.copy_(torch.from_numpy(phi))
    return torch.from_numpy(coefficients.sum(0)).to(gram)


@WEIGHTINGS.register("gradvac")
class GradVac(GradientWeighting):
    """GradVac with target EMA rate ``beta`` (in [0, 1])."""

    # buffers (register_buffer in __init__), declared for the type checker
    targets: torch.Tensor

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
