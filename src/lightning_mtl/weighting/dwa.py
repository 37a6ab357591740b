"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, "End-to-End Multi-Task Learning
with Attention").

The weight of a task follows the rate at which its loss has been falling:

    rᵢ(t−1) = (d̄ᵢ(t−1) + ε) / (d̄ᵢ(t−2) + ε),      wᵢ(t) = K · exp(rᵢ(t−1)/T) / Σⱼ exp(rⱼ(t−1)/T)

where ``d̄ᵢ(e)`` is task i's mean distance ``Lᵢ − mᵢ`` to its known lower bound (``min_losses``,
0 by default: the paper's mean loss) over epoch e, ε = 1e-8, K the number of tasks and T a
temperature (2 in the paper; larger T gives more uniform weights). Weights are 1 during the first
two epochs. A task whose loss falls slowly gets a larger weight.

The epoch means are of the losses averaged over DDP ranks (``context.global_losses``), so every
rank holds the same history and computes the same weights. The history and the running sums are
buffers: saved in checkpoints, restored on resume. Cost per step: O(k) and one all-reduce of k
numbers under DDP.

Corners:

* A task absent from a step does not enter that step's sums; a task absent from a whole epoch
  keeps its previous mean (ratio 1 once both epochs are its old mean); a task without two known
  epochs has ratio 1. A task's weight depends on every task's ratio (the softmax runs over all
  K), also when it is the only one present.
* ``Lᵢ < mᵢ`` is refused (``ValueError``: set ``weighting.min_losses``); a mean distance of 0 is
  legal (ε keeps the ratio finite).
* A non-finite loss: the step is weighted as if that task were absent (weight 0) and the value
  does not enter the epoch sums, so the history is that of a run without it
  (:func:`~lightning_mtl.weighting.loss_checks.skip_non_finite`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.base import Combined, LossWeighting, StepContext
from lightning_mtl.weighting.loss_checks import (
    EPS,
    CheckedLossWeighting,
    distance_to_bound,
    lower_bounds,
)
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("dwa")
class DynamicWeightAverage(CheckedLossWeighting, LossWeighting):
    """DWA with temperature ``temperature`` and the losses' lower bounds ``min_losses``."""

    # buffers (register_buffer in __init__), declared for the type checker
    min_losses: torch.Tensor
    epoch_sum: torch.Tensor
    epoch_count: torch.Tensor
    history: torch.Tensor
    history_known: torch.Tensor
    epochs_seen: torch.Tensor
    current_epoch: torch.Tensor

    reads_loss_values = True

    def __init__(
        self,
        tasks: Sequence[str],
        temperature: float = 2.0,
        min_losses: float | Sequence[float] | Mapping[str, float] = 0.0,
    ) -> None:
        super().__init__(tasks)
        if temperature <= 0:
            raise ConfigError(f"weighting.temperature must be > 0, got {temperature}")
        self.temperature = temperature
        k = len(self.tasks)
        bounds = lower_bounds(self.tasks, min_losses, "dwa")
        self.register_buffer("min_losses", bounds, persistent=False)
        self.register_buffer("epoch_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("epoch_count", torch.zeros(k, dtype=torch.float64))
        # history[0]: mean losses of epoch t-2, history[1]: of epoch t-1, where history_known
        self.register_buffer("history", torch.zeros(2, k, dtype=torch.float64))
        self.register_buffer("history_known", torch.zeros(2, k, dtype=torch.bool))
        self.register_buffer("epochs_seen", torch.tensor(0))
        self.register_buffer("current_epoch", torch.tensor(-1))

    def _close_epoch(self) -> None:
        if self.epoch_count.sum() > 0:
            seen = self.epoch_count > 0
            means = torch.where(
                seen, self.epoch_sum / self.epoch_count.clamp_min(1), self.history[1]
            )
            known = seen | self.history_known[1]
            self.history.copy_(torch.stack([self.history[1], means]))
            self.history_known.copy_(torch.stack([self.history_known[1], known]))
            self.epochs_seen += 1
        self.epoch_sum.zero_()
        self.epoch_count.zero_()

    def all_weights(self) -> torch.Tensor:
        """The weights of all tasks for the current epoch."""
        k = len(self.tasks)
        if int(self.epochs_seen) < 2:
            return torch.ones(k, dtype=torch.float64, device=self.history.device)
        both = (self.history_known[0] & self.history_known[1]).tolist()
        known = [i for i in range(k) if both[i]]
        ratio = torch.ones(k, dtype=torch.float64, device=self.history.device)
        if known:
            older, newer = (
                distance_to_bound(self, self.history[e, known], known, what="epoch mean loss")
                for e in (0, 1)
            )
            ratio[known] = (newer + EPS) / (older + EPS)
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
        distance_to_bound(self, global_losses, present)
        self.epoch_sum[present] += global_losses
        self.epoch_count[present] += 1
        return self.all_weights()[present]

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints before history_known marked an unknown mean by 0.
        key = prefix + "history_known"
        history = state_dict.get(prefix + "history")
        if key not in state_dict and isinstance(history, torch.Tensor):
            state_dict[key] = history != 0
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
