"""Training speed as a metric: the median wall time of a training step, per epoch.

A step is timed from ``on_train_batch_start`` to ``on_train_batch_end``: the forward pass, the
losses and the balancer, the backward pass and the optimizer step, and whatever other callbacks
do inside them. Data loading is not included (it happens before ``on_train_batch_start``), so
the number compares models, not loaders. On CUDA the device is synchronized at both ends
(kernels run asynchronously: without it the time would be that of queuing them). The first
``warmup_steps`` steps of every fit are left out (allocator growth, cuDNN autotuning, lazy
initialisation), and the median ignores the occasional slow step (the gradient-conflict
monitor's extra backward passes every 50 steps, a checkpoint, the machine's other work).

Logged at the end of every training epoch to every logger (the CSV logger's ``metrics.csv``,
W&B):

* ``perf/step_ms``: the median step time in milliseconds;
* ``perf/samples_per_s``: training samples per second over all processes at that speed
  (the step's batch size × world size / median step time).

Under DDP every rank measures its own steps and the slowest rank's median is logged (a DDP step
ends with an all-reduce, so it is the slowest rank that sets the pace): one all-reduce of one
number per epoch. An epoch with no step past the warm-up logs nothing. With gradient
accumulation every micro-batch is a step here (those without an optimizer step are cheaper).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch


class StepTimer(L.Callback):
    """Log the median training-step time (``perf/step_ms``) and the throughput it implies
    (``perf/samples_per_s``) at the end of every training epoch.

    Args:
        warmup_steps: steps at the start of every fit that are not measured.
        cuda_sync: synchronize the CUDA device around each step (true wall time of the step;
            costs the overlap of one step's queued kernels with the next step's Python).
    """

    def __init__(self, warmup_steps: int = 5, cuda_sync: bool = True) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.cuda_sync = cuda_sync
        self._seen = 0
        self._start: float | None = None
        #: this epoch's measured step times (seconds) and batch sizes
        self.times: list[float] = []
        self.sizes: list[int] = []
        #: the values logged last (the results store records them at the end of the run)
        self.logged: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times, self.sizes = [], []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._start is None:
            return
        self._sync(pl_module)
        elapsed = time.perf_counter() - self._start
        self._start = None
        self._seen += 1
        if self._seen <= self.warmup_steps:
            return
        self.times.append(elapsed)
        self.sizes.append(batch_size(batch))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.times:  # every step of the epoch was warm-up (or none ran)
            return
        step_s = statistics.median(self.times)
        samples = statistics.median(self.sizes) * max(trainer.world_size, 1)
        if trainer.world_size > 1:
            # The slowest rank sets the pace. Reduced here, on every rank at the same point:
            # ``self.log(sync_dist=True)`` would defer the all-reduce to the first read of the
            # logged values, which the progress bar makes on rank 0 alone (a collective
            # mismatch).
            slowest = torch.tensor([step_s], dtype=torch.float64, device=pl_module.device)
            step_s = float(trainer.strategy.reduce(slowest, reduce_op="max"))
        # straight to the loggers (rank 0's; the values are the same on every rank now)
        values = {"perf/step_ms": step_s * 1e3, "perf/samples_per_s": samples / step_s}
        self.logged = values
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def _sync(self, pl_module: L.LightningModule) -> None:
        if self.cuda_sync and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


def batch_size(batch: Any) -> int:
    """The number of samples in a batch: the leading size of its ``image`` tensor (or of the first
    tensor found); 0 when there is none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    if isinstance(batch, Mapping):
        if isinstance(batch.get("image"), torch.Tensor):
            return batch_size(batch["image"])
        values = list(batch.values())
    elif isinstance(batch, list | tuple):
        values = list(batch)
    else:
        return 0
    for value in values:
        size = batch_size(value)
        if size:
            return size
    return 0
