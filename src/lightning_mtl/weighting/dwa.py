"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, "End-to-End Multi-Task Learning
with Attention").

The weight of a task follows the rate at which its loss has been falling:

    rᵢ(t−1) = L̄ᵢ(t−1) / L̄ᵢ(t−2),      wᵢ(t) = K · exp(rᵢ(t−1)/T) / Σⱼ exp(rⱼ(t−1)/T)

where ``L̄ᵢ(e)`` is task i's mean loss over epoch e, K the number of tasks and T a temperature
(2 in the paper; larger T gives more uniform weights). Weights are 1 during the first two
epochs. A task whose loss falls slowly gets a larger weight.

The epoch means are of the losses averaged over DDP ranks (``context.global_losses``), so every rank holds the same history and computes the same weights. The history
and the running sums are buffers: saved in checkpoints, restored on resume. A task absent
from a step does not enter that step's sums; a task absent from a whole epoch keeps ratio 1.
Cost per step: O(k) and one all-reduce of k numbers under DDP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_mtl.weighting.base import Combined, LossWeighting, StepContext
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("dwa")
class DynamicWeightAverage(LossWeighting):
    """DWA with temperature ``temperature``."""

    reads_loss_values = True

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        if temperature <= 0:
            raise ValueError(f"weighting.temperature must be > 0, got {temperature}")
        self.temperature = temperature
        k = len(self.tasks)
        self.register_buffer("epoch_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("epoch_count", torch.zeros(k, dtype=torch.float64))
        # history[0]: mean losses of epoch t-2, history[1]: of epoch t-1 (0 where unknown)
        self.register_buffer("history", torch.zeros(2, k, dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.tensor(0))
        self.register_buffer("current_epoch", torch.tensor(-1))

    def _close_epoch(self) -> None:
        if self.epoch_count.sum() > 0:
            means = torch.where(
                self.epoch_count > 0,
                self.epoch_sum / self.epoch_count.clamp_min(1),
                self.history[1],
            )
            self.history.copy_(torch.stack([self.history[1], means]))
            self.epochs_seen += 1
        self.epoch_sum.zero_()
        self.epoch_count.zero_()

    def all_weights(self) -> torch.Tensor:
        """The weights of all tasks for the current epoch."""
        k = len(self.tasks)
        if int(self.epochs_seen) < 2:
            return torch.ones(k, dtype=torch.float64, device=self.history.device)
        older, newer = self.history
        ratio = torch.where(older > 0, newer / older.clamp_min(1e-12), torch.ones_like(newer))
        return k * torch.softmax(ratio / self.temperature, dim=0)

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        """Close the previous epoch's means on the first step of a new epoch, then weight."""
        if context.epoch != int(self.current_epoch):
            if int(self.current_epoch) >= 0:
                self._close_epoch()
            self.current_epoch.fill_(context.epoch)
        return super().combine(losses, context)

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        global_losses = self.loss_values(losses, present, context).double()
        self.epoch_sum[present] += global_losses
        self.epoch_count[present] += 1
        return self.all_weights()[present]
