"""The guard of ``model.nonfinite_loss`` (see :mod:`lightning_mtl.nonfinite`): a step with a NaN/inf
loss or gradient leaves no trace, is logged and counted, and too many in a row stop the run.

``MultiTaskModule.training_step`` reports each non-finite loss to the module's guard
(:meth:`NonFiniteGuard.report_losses`); the guard works at the optimizer step's window (one step,
or the micro-batches of gradient accumulation):

* at the window's first micro-batch it snapshots the balancer's state and the network's buffers;
* ``MultiTaskModule.optimizer_step`` runs the closure (training step and backward), then asks
  :meth:`NonFiniteGuard.skips_step`, which also checks the gradients for NaN/inf where no fp16
  GradScaler does. A skipped window never reaches the optimizer, the clipping or the GradScaler
  (its scale and growth count stay as they were); its gradients are dropped and the snapshot
  restored. A window with a dropped task keeps its update; only the buffers it made non-finite
  are restored;
* it logs ``train/nonfinite_steps`` (bad steps so far) and raises
  :class:`~lightning_mtl.nonfinite.NonFiniteError` after ``max_consecutive`` bad steps in a row;
* at the end of training and before a test, any non-finite parameter or network buffer raises
  :class:`~lightning_mtl.nonfinite.NonFiniteError` naming it.

The learning-rate schedule and ``global_step`` go on over a skipped step, as over a step the
GradScaler skips. The counters are saved in checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from torch.nn.utils import get_total_norm

from lightning_mtl.nonfinite import KEY, LossCheck, NonFiniteError, NonFinitePolicy, check_weights

if TYPE_CHECKING:  # the module imports this callback; its hooks are written for that module
    from lightning_mtl.module import MultiTaskModule

log = logging.getLogger(__name__)


class NonFiniteGuard(L.Callback):
    """Skip, count and stop on non-finite losses and gradients, by ``policy``."""

    def __init__(self, policy: NonFinitePolicy | None = None) -> None:
        self.policy = policy or NonFinitePolicy()
        #: bad optimizer steps so far (skipped, or with a task dropped) and in a row now
        self.steps = 0
        self.consecutive = 0
        self._streak: dict[str, None] = {}  # what made the current run of bad steps bad
        self._streak_start = 0
        self._tasks: dict[str, None] = {}  # this window's tasks with a non-finite loss
        self._skip = False  # this window is skipped for every parameter
        self._balancer: dict[str, torch.Tensor] | None = None
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ reported by the module
    def on_bad_losses(
        self,
        step: int,
        check: LossCheck,
        losses: Mapping[str, torch.Tensor],
        rank_zero: bool = True,
    ) -> bool:
        """Record this step's non-finite losses (``check``: what
        :func:`~lightning_mtl.nonfinite.check_losses` found) and say whether the step is skipped:
        always under ``skip_step``, and under ``drop_task`` when no trainable loss is left."""
        skip = self.policy.policy == "skip_step" or not check.trainable
        values = {t: float(losses[t].detach()) for t in check.bad if t in losses}
        self.report_losses(step, check.bad, values, skip, rank_zero)
        return skip

    def report_losses(
        self,
        step: int,
        bad: Sequence[str],
        values: Mapping[str, float],
        skip: bool,
        rank_zero: bool = True,
    ) -> None:
        """Record that ``bad`` tasks had a non-finite loss (``values``: those known on this rank)
        in this step; ``skip``: the step is skipped (else the tasks are dropped from it)."""
        self._tasks.update(dict.fromkeys(bad))
        self._skip = self._skip or skip
        if not rank_zero:
            return
        shown = ", ".join(f"{t!r} ({values[t]})" if t in values else f"{t!r}" for t in bad)
        action = (
            "the step is skipped for every parameter (no optimizer update, balancer state not "
            "advanced)"
            if skip
            else "these tasks are left out of this step; the others train"
        )
        log.warning(
            "non-finite loss at step %d: task %s; %s (%s.policy=%s; training stops after %d bad "
            "steps in a row)",
            step,
            shown,
            action,
            KEY,
            self.policy.policy,
            self.policy.max_consecutive,
        )

    # --------------------------------------------------------------------- the optimizer window
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % trainer.accumulate_grad_batches:  # not a window's first micro-batch
            return
        self._tasks, self._skip = {}, False
        module = cast("MultiTaskModule", pl_module)
        self._balancer = {k: v.clone() for k, v in module.weighting.state_dict().items()}
        self._buffers = [(b, b.detach().clone()) for b in module.net.buffers()]

    def skips_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> bool:
        """After the window's last backward, before the optimizer: whether to skip its step (a
        non-finite loss under ``skip_step``, or a non-finite gradient without a GradScaler).
        Restores what a bad window changed, counts it, and raises :class:`NonFiniteError` at
        ``max_consecutive`` bad steps in a row."""
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        gradient = not self._skip and scaler is None and not _finite_gradients(optimizer)
        if gradient and trainer.is_global_zero:
            log.warning(
                "non-finite gradient at step %d (finite losses); the step is skipped for every "
                "parameter (%s: training stops after %d bad steps in a row)",
                trainer.global_step,
                KEY,
                self.policy.max_consecutive,
            )
        skip = self._skip or gradient
        if not skip and not self._tasks:
            self.consecutive, self._streak = 0, {}
            return False
        if skip:
            optimizer.zero_grad(set_to_none=True)
        self._restore(pl_module, every_buffer=skip)
        if not self.consecutive:
            self._streak_start = trainer.global_step
        self.steps += 1
        self.consecutive += 1
        self._streak.update(dict.fromkeys(f"task {t!r}" for t in self._tasks))
        if gradient:
            self._streak["a non-finite gradient"] = None
        if self.consecutive >= self.policy.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} training steps in a row ({self._streak_start} to "
                f"{trainer.global_step}) had non-finite values: {', '.join(self._streak)}; "
                f"training stopped ({KEY}.max_consecutive={self.policy.max_consecutive}, "
                f"policy={self.policy.policy}). Look at those tasks' labels and losses (a NaN "
                "label, the log of 0, weighting.min_losses), the learning rate and the precision."
            )
        return skip

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        pl_module.log(
            "train/nonfinite_steps", float(self.steps), on_step=True, on_epoch=False, batch_size=1
        )

    def _restore(self, pl_module: L.LightningModule, every_buffer: bool) -> None:
        """The balancer's state (when the step is skipped) and the network's buffers (all of
        them, or those that became non-finite) as they were at the window's start."""
        if every_buffer and self._balancer is not None:
            cast("MultiTaskModule", pl_module).weighting.load_state_dict(self._balancer)
        floats = [(b, saved) for b, saved in self._buffers if b.is_floating_point()]
        if every_buffer:
            chosen = self._buffers
        elif floats:
            flags = torch.stack([torch.isfinite(b).all() for b, _ in floats]).tolist()
            chosen = [pair for pair, ok in zip(floats, flags, strict=True) if not ok]
        else:
            chosen = []
        with torch.no_grad():
            for buffer, saved in chosen:
                buffer.copy_(saved)

    # ----------------------------------------------------------------------------- final guard
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_weights(
            pl_module,
            f"at the end of training (step {trainer.global_step})",
            cast("MultiTaskModule", pl_module).net.named_buffers(prefix="net"),
        )

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        buffers = cast("MultiTaskModule", pl_module).net.named_buffers(prefix="net")
        check_weights(pl_module, "before testing", buffers)

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def _finite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite (its max-norm: one pass over
    the gradients without a copy, one host sync)."""
    grads = [
        p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]
    if not grads:
        return True
    return bool(torch.isfinite(get_total_norm(grads, float("inf"))))
