"""Learning-rate schedules that need the run's total number of optimizer steps, and that follow
parameter groups added during training.

``MultiTaskModule.configure_optimizers`` passes ``total_steps`` (:func:`schedule_length`: the
run's optimizer steps, or its epochs for a scheduler stepped per epoch) to any scheduler factory
that accepts it.

Gradual unfreezing adds a parameter group to the one optimizer in the middle of a run. torch's
``LambdaLR`` (and every scheduler built on ``base_lrs``) keeps one base LR per group *present at
construction*, so a group added later would keep its initial LR for good, and after a resume
the saved ``base_lrs`` and the rebuilt lambdas disagree. :class:`WarmupCosine` instead reads
every group's ``initial_lr`` at each step, and a group may carry ``warmup_start`` and
``warmup_steps`` (set when it enters): its LR then also ramps linearly from 0 over those steps.
Both keys live in the optimizer's state dict, so a resumed run continues the same schedule.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_mtl.errors import ConfigError


def schedule_length(trainer: Any, interval: str) -> int:
    """How many times the scheduler steps in the run: optimizer steps (Lightning's
    ``estimated_stepping_batches``, accumulation and ``max_steps`` included) for
    ``interval="step"``, ``trainer.max_epochs`` for ``interval="epoch"``."""
    if interval == "step":
        return int(trainer.estimated_stepping_batches)
    epochs = trainer.max_epochs
    if epochs is None or epochs < 1:
        raise ConfigError(
            "model.scheduler_interval=epoch needs trainer.max_epochs >= 1 (the schedule's "
            f"length), got {epochs}"
        )
    return int(epochs)


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_fraction: float, min_lr_ratio: float
) -> float:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to
    ``min_lr_ratio`` (a multiple of each group's initial LR)."""
    warmup = max(1, int(total_steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def entry_ramp(group: dict[str, Any], step: int) -> float:
    """A late group's warm-up factor at ``step`` (1 for groups without one)."""
    length = int(group.get("warmup_steps", 0) or 0)
    if length <= 0:
        return 1.0
    return min(1.0, max(0.0, (step - int(group.get("warmup_start", 0)) + 1) / length))


class WarmupCosine(LRScheduler):
    """Warm-up then cosine decay of every parameter group, groups added later included."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.01,
        last_epoch: int = -1,
    ) -> None:
        self.total_steps = int(total_steps)
        self.warmup_fraction = warmup_fraction
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | Tensor]:  # LRScheduler's signature; floats here
        step = self.last_epoch
        factor = warmup_cosine_factor(
            step, self.total_steps, self.warmup_fraction, self.min_lr_ratio
        )
        lrs: list[float | Tensor] = []
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            lrs.append(group["initial_lr"] * factor * entry_ramp(group, step))
        return lrs


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 0.01,
) -> WarmupCosine:
    """The default schedule (``configs/model/default.yaml``); see :class:`WarmupCosine`."""
    return WarmupCosine(optimizer, total_steps, warmup_fraction, min_lr_ratio)
