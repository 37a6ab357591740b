"""``last.ckpt`` that a kill or a pre-emption never makes you lose much.

Lightning's ``ModelCheckpoint`` monitoring a validation metric writes nothing before the first
validation (a kill in epoch 0 loses everything), and with ``save_top_k`` it writes ``last.ckpt``
only when the metric improves. This one, a ``ModelCheckpoint`` that only keeps ``last.ckpt``,
writes it independently of any metric:

* every ``every_n_train_steps`` optimizer steps, from the first epoch on;
* at the end of every training epoch (after its validation, so the state of the monitored
  checkpoint callback in it is that epoch's); the last one is the final state of the fit;
* when the process receives SIGTERM (what a cluster sends before pre-emption): Lightning's
  signal connector sets a flag and ends the fit at the next step boundary with its
  ``SIGTERMException`` (a ``SystemExit``: exit code 0); this callback saves ``last.ckpt`` then,
  and the run resumes with ``ckpt_path=<run folder>``.

Put it after the monitored ``ModelCheckpoint`` (Lightning keeps the order of checkpoint
callbacks), so the state saved with ``last.ckpt`` holds the monitored one's best checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_mtl.errors import ConfigError

log = logging.getLogger(__name__)


class LastCheckpoint(ModelCheckpoint):
    """Write ``<dirpath>/last.ckpt`` every ``every_n_train_steps`` steps, at every training
    epoch end and on SIGTERM; no other file (see the module docstring)."""

    def __init__(self, dirpath: str | Path | None = None, every_n_train_steps: int = 100) -> None:
        if every_n_train_steps < 1:
            raise ConfigError(
                f"callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps}: expected an "
                "integer >= 1 (null the callback to write no last.ckpt)"
            )
        super().__init__(
            dirpath=dirpath,
            monitor=None,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            # Always the same name: a resumed run rewrites its own last.ckpt, no last-v1.ckpt.
            enable_version_counter=False,
        )

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Also when a step-triggered write already happened at this step: validation has run
        # since, and the monitored callback's new best belongs in the saved state.
        if not self._skips(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: the epoch-end write covers it (no metric is monitored here)."""

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """On SIGTERM only: other exceptions may leave a half-updated state, not worth keeping."""
        if not isinstance(exception, SIGTERMException) or self._skips(trainer):
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        folder = Path(self.last_model_path).parent
        resume = folder.parent if folder.name == "checkpoints" else self.last_model_path
        log.warning(
            "SIGTERM: saved %s at step %d; resume with `mtl-train ... ckpt_path=%s`",
            self.last_model_path,
            trainer.global_step,
            resume,
        )

    def _skips(self, trainer: L.Trainer) -> bool:
        """No write outside a fit, in the sanity check or under fast_dev_run."""
        return (
            bool(trainer.fast_dev_run)  # type: ignore[attr-defined]  # set by Lightning's setup
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
        )
