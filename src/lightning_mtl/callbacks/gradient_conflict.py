"""The gradient-conflict monitor: each task's gradient norm and the pairwise cosines of the task
gradients, the first sign of negative transfer.

Every ``every_n_steps`` optimizer steps, before Lightning's backward pass (the step's graph is
still alive), the monitor measures the task gradients at the architecture's first meeting place
(the one nearest the images, where all tasks meet): for gradient methods the balancer's global
Gram matrix is at hand (free); for the others it costs one backward pass per task through the
modules between that place and the losses (under DDP, one all-reduce of k² numbers). A place
defined at ``level=params`` only (soft sharing: each head reads its own column) is measured at
its shared parameters instead (k backward passes through the network). A place that no
gradient reaches (frozen upstream) is not measured; one message says so.

Logged as ``train/grad_norm/<task>`` and ``train/grad_cos/<a>/<b>`` to every logger; with a
W&B logger the cosine matrix also goes as a heatmap image (``train/grad_conflict``, with a
caption naming its step; two tasks measured at least). ``logger=wandb`` shows these under
``gradients/norm/``, ``gradients/cos/`` and ``gradients/conflict`` (docs/wandb.md).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

# the heatmap lives with the run's other figures; imported here too, where it was first
from lightning_mtl.diagnostics.plots import conflict_figure
from lightning_mtl.weighting import task_gradients

if TYPE_CHECKING:  # the module imports the callbacks
    from lightning_mtl.module import MultiTaskModule

log = logging.getLogger(__name__)

__all__ = ["GradientConflictMonitor", "conflict_figure"]


class GradientConflictMonitor(L.Callback):
    """Measure and log task-gradient norms and cosines every ``every_n_steps`` steps (0: never);
    ``heatmap``: also log the cosine matrix as an image to W&B."""

    def __init__(self, every_n_steps: int = 50, heatmap: bool = True) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.heatmap = heatmap
        #: (task names, cosine matrix, step) of the last measurement
        self.last: tuple[list[str], torch.Tensor, int] | None = None
        self._warned = False

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        record = getattr(pl_module, "step_record", None)
        every = self.every_n_steps
        if record is None or not every or trainer.global_step % every:
            return
        if record.batch_idx % trainer.accumulate_grad_batches:
            return  # once per optimizer step: its first micro-batch
        gram = self._gram(trainer, pl_module, record)
        if gram is None:
            return
        names = [t.name for t in cast("MultiTaskModule", pl_module).tasks]
        norms = gram.diagonal().clamp_min(0).sqrt()
        cosine = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
        seen = [i for i in range(len(names)) if norms[i] > 0]
        shown = [names[i] for i in seen]
        values = {f"train/grad_norm/{shown[a]}": float(norms[i]) for a, i in enumerate(seen)}
        for a, i in enumerate(seen):
            for b in range(a + 1, len(seen)):
                values[f"train/grad_cos/{shown[a]}/{shown[b]}"] = float(cosine[i, seen[b]])
        # straight to the loggers: self.log would repeat the last value at every step between
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        self.last = (shown, cosine[seen][:, seen].detach().cpu(), trainer.global_step)
        if self.heatmap and trainer.is_global_zero:
            self._log_heatmap(trainer)

    def _gram(
        self, trainer: L.Trainer, pl_module: L.LightningModule, record: Any
    ) -> torch.Tensor | None:
        """The k×k Gram matrix of the task gradients at the first meeting place (global)."""
        module = cast("MultiTaskModule", pl_module)  # it keeps a step record: a MultiTaskModule
        weighting = module.weighting
        gram = getattr(weighting, "last_gram", None)
        if weighting.needs_gradients and gram is not None:
            return gram
        meeting = record.meetings[0] if record.meetings else None
        if meeting is None:
            return None
        if "representation" in meeting.place.levels:
            inputs = [t for t in meeting.tensors if t.requires_grad]
        else:
            inputs = meeting.place.trainable_parameters()
        if not inputs:
            if not self._warned:
                log.info(
                    "gradient monitor: nothing upstream of %r trains; not measured",
                    meeting.place.name,
                )
                self._warned = True
            return None
        tasks = [t.name for t in module.tasks]
        names = [t for t in tasks if t in record.losses]
        rows = task_gradients([record.losses[n] for n in names], inputs, record.grad_scale)
        full = rows.new_zeros(len(tasks), rows.shape[1])
        full[[tasks.index(n) for n in names]] = rows
        if trainer.world_size > 1 and "representation" not in meeting.place.levels:
            # parameter gradients: each rank holds a part of the one gradient, so average the
            # rows before the products (as the balancer does at level=params)
            full = trainer.strategy.reduce(full, reduce_op="sum") / trainer.world_size
            return full @ full.T
        gram = full @ full.T
        if trainer.world_size > 1:  # per-sample rows: the ranks' Gram matrices add up
            gram = trainer.strategy.reduce(gram, reduce_op="sum") / trainer.world_size**2
        return gram

    def _log_heatmap(self, trainer: L.Trainer) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or self.last is None:
            return
        names, cosine, step = self.last
        if len(names) < 2:  # one task's gradient reached the place: no pair to show
            return
        figure = conflict_figure(names, cosine.float().numpy(), step)
        for logger in loggers:
            try:  # a W&B failure must not stop training
                logger.log_image(
                    key="train/grad_conflict",
                    images=[figure],
                    step=trainer.global_step,
                    caption=[f"task-gradient cosines at step {step}"],
                )
            except Exception as error:
                log.warning("gradient monitor: sending the heatmap to W&B failed: %r", error)
