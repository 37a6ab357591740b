"""Log how many samples the data left out under ``data.on_bad_sample=skip``.

The data module counts the skipped samples in the main process (``data/bad_samples.py``), where
every batch arrives whatever ``num_workers`` is; this callback only logs its counts:
``data/skipped_samples`` (training samples skipped since the start of training, every step)
and ``data/skipped_val_samples`` / ``data/skipped_test_samples`` (skipped in that evaluation).
Summed over the ranks under DDP. Nothing is logged under ``on_bad_sample=raise``.
"""

from __future__ import annotations

from typing import Any

import lightning as L


class SkippedSamples(L.Callback):
    """Logs the data module's skipped-sample counts (see the module docstring)."""

    def __init__(self) -> None:
        self._before: dict[str, int] = {}

    @staticmethod
    def _skipped(trainer: L.Trainer) -> dict[str, int] | None:
        # set by Lightning's data connector, not declared on Trainer
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if getattr(datamodule, "on_bad_sample", None) != "skip":
            return None
        return datamodule.bad_samples.skipped

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        skipped = self._skipped(trainer)
        if skipped is not None:
            module.log(
                "data/skipped_samples",
                float(skipped.get("train", 0)),
                on_step=True,
                on_epoch=False,
                reduce_fx="sum",
                sync_dist=trainer.world_size > 1,
            )

    def _start(self, trainer: L.Trainer, split: str) -> None:
        skipped = self._skipped(trainer)
        if skipped is not None:
            self._before[split] = skipped.get(split, 0)

    def _end(self, trainer: L.Trainer, module: L.LightningModule, split: str) -> None:
        skipped = self._skipped(trainer)
        if skipped is not None and not trainer.sanity_checking:
            count = skipped.get(split, 0) - self._before.get(split, 0)
            module.log(
                f"data/skipped_{split}_samples",
                float(count),
                on_step=False,
                on_epoch=True,
                reduce_fx="sum",
                sync_dist=trainer.world_size > 1,
            )

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start(trainer, "val")

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._end(trainer, module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start(trainer, "test")

    def on_test_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._end(trainer, module, "test")
