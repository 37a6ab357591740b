"""The callback beside the W&B logger: task names and world size for the logger, and the run id
and the weights' history in every checkpoint."""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_mtl.wandb_tracking.logger import WandbLogger, wandb_loggers
from lightning_mtl.wandb_tracking.run_id import STATE_KEY


class WandbRun(L.Callback):
    """What the W&B logger needs from the trainer: the task names and the world size when a
    stage starts, and a place in every checkpoint for the run id and the weights' history (so
    a resumed training continues the run, and its weight chart starts at step 0).

    ``logger=wandb`` adds it (``callbacks.wandb_run``); without a :class:`WandbLogger` it does
    nothing.
    """

    def __init__(self) -> None:
        self._loggers: list[WandbLogger] = []

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._loggers = wandb_loggers(trainer)
        names = [getattr(t, "name", t) for t in getattr(pl_module, "tasks", None) or []]
        for logger in self._loggers:
            logger.add_tasks(str(n) for n in names)
            logger.describe_trainer(trainer)

    def state_dict(self) -> dict[str, Any]:
        return self._loggers[0].state() if self._loggers else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for logger in self._loggers:
            logger.restore(state_dict)
