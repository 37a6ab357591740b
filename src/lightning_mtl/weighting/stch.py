"""STCH, Smooth Tchebycheff scalarization (Lin, Zhang, Yang, Zhang & Zhang, ICML 2024).

The smooth maximum of the tasks' normalised log-losses,

    STCH = μ log Σᵢ exp(λᵢ vᵢ / μ),   vᵢ = log(Lᵢ + ε) − log(Nᵢ),

optimises the worst-off task (a smooth Tchebycheff scalarization: every Pareto-optimal point is
reachable by some preference λ; μ → 0 gives the hard maximum). ``Nᵢ`` normalises each task by its
average loss over the first ``warmup_steps`` steps (the paper's nadir estimate from a warm-up
epoch), during which the weights are equal. The weights are the gradient of k·STCH with respect
to the losses,

    wᵢ = k · softmaxᵢ(λ v / μ) · λᵢ / (Lᵢ + ε),

which is the gradient of the mean log-loss when all vᵢ agree (uniform λ). λ is ``preference`` (uniform 1/k by default).
Loss values are global under DDP. Cost O(k).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_mtl.weighting.base import LossWeighting, StepContext
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("stch")
class STCH(LossWeighting):
    """STCH with smoothing ``mu``, ``warmup_steps`` and an optional ``preference`` λ."""

    reads_loss_values = True

    def __init__(
        self,
        tasks: Sequence[str],
        mu: float = 0.5,
        warmup_steps: int = 100,
        preference: Sequence[float] | None = None,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks)
        k = len(self.tasks)
        if mu <= 0:
            raise ValueError(f"weighting.mu={mu}; STCH needs mu > 0")
        if preference is not None and len(preference) != k:
            raise ValueError(f"weighting.preference has {len(preference)} numbers; expected {k}")
        self.mu, self.warmup_steps, self.eps = mu, int(warmup_steps), eps
        pref = torch.full((k,), 1.0 / k) if preference is None else torch.tensor(preference)
        self.register_buffer("preference", pref.double(), persistent=False)
        self.register_buffer("loss_sums", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("loss_counts", torch.zeros(k, dtype=torch.float64))

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        values = self.loss_values(losses, present, context).double()
        if context.step < self.warmup_steps:
            self.loss_sums[present] += values.to(self.loss_sums)
            self.loss_counts[present] += 1
            return torch.ones_like(values)
        nadir = self.loss_sums[present] / self.loss_counts[present].clamp_min(1)
        nadir = torch.where(self.loss_counts[present] > 0, nadir, values.to(nadir))
        shifted = values + self.eps
        scaled = self.preference[present] * (shifted.log() - (nadir + self.eps).log())
        soft = torch.softmax(scaled / self.mu, dim=0)
        return len(self.tasks) * soft * self.preference[present] / shifted
