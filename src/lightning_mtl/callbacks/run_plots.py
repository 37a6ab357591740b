"""The run's figures at the end of training: losses, metrics, task weights, gradient norms and
cosines, affinity, drawn from the CSV logger's ``metrics.csv`` into ``<run dir>/plots/`` (see
:func:`lightning_mtl.diagnostics.plots.plot_run`), and sent to W&B when it logs the run.

Drawn once when the fit ends and again when a test ends, so that the test values appear in
``metrics.png`` (the second drawing overwrites the first). Global rank 0 only: the CSV logger
writes there alone. A failure while drawing is a warning naming the run folder, never an
error: the figures must not fail a finished training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_mtl.diagnostics.plots import plot_run

log = logging.getLogger(__name__)


class RunPlots(L.Callback):
    """Draw the run's figures from its ``metrics.csv`` when training (and testing) ends.

    Args:
        enabled: False: draw nothing (a config switch that keeps the callback in place).
        steps: the steps of the per-step cosine matrices in ``grad_conflict.png`` (``None``:
            the first, middle and last measurement).
    """

    def __init__(self, enabled: bool = True, steps: list[int] | None = None) -> None:
        self.enabled = enabled
        self.steps = list(steps) if steps is not None else None
        #: the PNG files of the last drawing (empty before it, and on other ranks)
        self.written: list[Path] = []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._plot(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._plot(trainer)

    def _plot(self, trainer: L.Trainer) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        csv_loggers = [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]
        if not csv_loggers:
            log.info("run plots: no CSV logger (`logger=csv` or `logger=wandb`), nothing drawn")
            return
        logger = csv_loggers[0]
        log_dir = Path(logger.log_dir)
        run_dir = log_dir.parent  # the folder holding csv/
        try:
            for each in csv_loggers:
                each.save()  # the rows still buffered
            self.written = plot_run(run_dir, self.steps, metrics_csv=log_dir / "metrics.csv")
        except Exception as error:  # a figure must not fail a finished run
            log.warning("run plots: drawing the figures of %s failed: %r", run_dir, error)
            return
        log.info("run plots: %d figures in %s", len(self.written), run_dir / "plots")
        for wandb in (lg for lg in trainer.loggers if isinstance(lg, WandbLogger)):
            for path in self.written:
                try:
                    wandb.log_image(key=f"plots/{path.stem}", images=[str(path)])
                except Exception as error:
                    log.warning("run plots: sending %s to W&B failed: %r", path, error)
