"""The task-affinity monitor: which task helps which, measured by look-ahead during training
(Fifty et al., NeurIPS 2021, "Efficiently Identifying Task Groupings for Multi-Task Learning").

Every ``every_n_steps`` optimizer steps, before Lightning's backward pass (the step's graph is
still alive), the monitor takes each task's gradient at the shared parameters of the
architecture's first meeting place, steps those parameters on one task at a time
(``θ_s − η g_i``, the heads unchanged) and evaluates every task's loss again on the same batch:
``Z[i → j] = 1 − L_j(θ_s − η g_i) / L_j(θ_s)`` (:func:`~lightning_mtl.diagnostics.affinity.
lookahead_affinity`). It is the gradient-conflict monitor's sibling: the cosine says whether two
gradients disagree, the affinity whether a step on one actually lowers the other's loss.

Logged as ``train/affinity/<i>/<j>`` (the diagonal included) and ``perf/affinity_ms``; the mean
over the run is written to ``<run dir>/task_affinity.md`` with the best task groupings.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from torch import nn

from lightning_mtl.diagnostics.affinity import format_affinity, lookahead_affinity
from lightning_mtl.models.meeting import Meeting
from lightning_mtl.weighting.meetings import LeafGrads, task_gradient

if TYPE_CHECKING:  # the module imports the callbacks
    from lightning_mtl.module import MultiTaskModule

log = logging.getLogger(__name__)

FILENAME = "task_affinity.md"


class TaskAffinityMonitor(L.Callback):
    """Measure the look-ahead affinity between every pair of tasks every ``every_n_steps``
    optimizer steps (0: never), log it, and keep its running mean for the run's report.

    ``lr``: the look-ahead step size; None takes each shared parameter's current learning rate
    from the optimizer (its group's: backbone stages differ under ``backbone_lr_scale`` and
    ``layer_decay``), as the paper uses the training learning rate. With Adam(W) the
    look-ahead is still a plain gradient step of that size, not an Adam step, so the values are
    not the change the real step makes: read the table for its signs and relative sizes. A
    step whose learning rate is 0 (the first step of a warm-up) is not measured.

    What is measured (:meth:`measure`): the shared parameters are those of the first meeting
    place (where all tasks meet, nearest the images); each task's gradient there is taken from
    the step's graph (through the cuts of a gradient method's meetings, with the fp16
    GradScaler's scale); the losses, before and after each look-ahead, come from forward passes
    of the network without gradient, in train mode (batch statistics, as in training), on
    copies of the buffers (batch-norm running statistics do not move) and with the RNG forked
    at the same state for every pass (dropout draws the same masks; training's RNG stream is
    untouched). Training itself is not perturbed: the same run gives the same weights, bit for
    bit (with deterministic kernels, as on CPU), with and without the monitor. Under DDP each rank measures on its own batch and the
    k×k matrices are averaged over the ranks entry by entry, each over the ranks where it was
    measured (a sum of values and of counts in one all-reduce; NaN where no rank measured it).
    Every rank runs all k + 1 forward passes, whatever tasks its batch labels, so that
    SyncBatchNorm's collectives match.

    Not measured (one info message each): no meeting place, nothing upstream of it trains
    (frozen backbone), or, in a single process, fewer than 2 tasks labelled in the batch.

    Cost, per measuring step: k backward passes from the meeting to the shared parameters plus
    k + 1 forward passes without gradients, i.e. about (3k + 1)/3 training steps for k tasks
    (counting a training step as 3 forward-pass units: a forward and a backward of about two),
    so ``every_n_steps=100`` adds about (3k + 1)/300 of the training time (5 tasks: ~5%).
    Measured: on the default config (resnet18, 64×64 images, batch 32, 5 tasks, ``equal``), on
    one CPU thread, 6.9 s per measurement against 1.4 s per training step (forward and
    backward): 4.9 steps, the estimate being 5.3; so about 5% of training at the default 100.
    """

    def __init__(self, every_n_steps: int = 100, lr: float | None = None) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise ValueError(f"every_n_steps must be an integer >= 0, got {every_n_steps!r}")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0 turns it off), got {every_n_steps}")
        if lr is not None:
            if isinstance(lr, bool) or not isinstance(lr, int | float):
                raise ValueError(f"lr must be a number > 0 or None, got {lr!r}")
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"lr must be a finite number > 0 or None, got {lr}")
        self.every_n_steps = every_n_steps
        self.lr = None if lr is None else float(lr)
        #: the tasks of the running mean, and its per-entry sum and count (float64 / int64, k×k)
        self.names: list[str] = []
        self.total: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        #: (task names, matrix, step) of the last measurement
        self.last: tuple[list[str], torch.Tensor, int] | None = None
        self._pending: tuple[int, Any] | None = None
        self._said: set[str] = set()

    # ------------------------------------------------------------------------------ the hooks
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # the batch is not in the step record: hold it on the steps that will be measured only
        self._pending = (batch_idx, batch) if self._due(trainer, batch_idx) else None

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        pending, self._pending = self._pending, None
        record = getattr(pl_module, "step_record", None)
        if pending is None or record is None or record.batch_idx != pending[0]:
            return
        lr = self._step_size(trainer)
        if lr is None:
            return
        start = time.perf_counter()
        module = cast("MultiTaskModule", pl_module)  # it keeps a step record: a MultiTaskModule
        measured = self.measure(module, record, pending[1], lr, trainer.world_size)
        if measured is None:
            return
        names, matrix = measured
        if trainer.world_size > 1:
            matrix = mean_over_ranks(trainer, matrix, pl_module.device)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        self._accumulate(names, matrix)
        self.last = (names, matrix, trainer.global_step)
        if not trainer.is_global_zero:
            return
        values = {
            f"train/affinity/{a}/{b}": float(matrix[i, j])
            for i, a in enumerate(names)
            for j, b in enumerate(names)
            if not math.isnan(float(matrix[i, j]))
        }
        values["perf/affinity_ms"] = elapsed_ms
        # straight to the loggers: self.log would repeat the last value at every step between
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._pending = None  # a skipped step never reached the backward: let the batch go

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = None
        mean = self.mean()
        if mean is None or not trainer.is_global_zero:
            return
        folder = Path(trainer.default_root_dir)
        if not folder.is_dir():
            return
        path = folder / FILENAME
        names, matrix = mean
        measurements = int(self.count.max()) if self.count is not None else None
        path.write_text(format_affinity(names, matrix, measurements))
        log.info("task affinity (mean over %s measuring steps): %s", measurements, path)

    # ------------------------------------------------------------------------------ the state
    def mean(self) -> tuple[list[str], torch.Tensor] | None:
        """The tasks and the k×k mean affinity so far (NaN where never measured), or None."""
        if self.total is None or self.count is None or not bool((self.count > 0).any()):
            return None
        counted = self.count.clamp_min(1).double()
        mean = torch.where(self.count > 0, self.total / counted, math.nan)
        return list(self.names), mean

    def state_dict(self) -> dict[str, Any]:
        if self.total is None or self.count is None:
            return {}
        return {"names": list(self.names), "total": self.total.clone(), "count": self.count.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.names = list(state_dict["names"])
        self.total = torch.as_tensor(state_dict["total"], dtype=torch.float64).clone()
        self.count = torch.as_tensor(state_dict["count"], dtype=torch.int64).clone()

    def _accumulate(self, names: list[str], matrix: torch.Tensor) -> None:
        if self.total is None or self.count is None or names != self.names:
            if self.names and names != self.names:
                log.warning(
                    "task affinity: the tasks changed (%s -> %s); the running mean starts over",
                    self.names,
                    names,
                )
            k = len(names)
            self.names = list(names)
            self.total = torch.zeros(k, k, dtype=torch.float64)
            self.count = torch.zeros(k, k, dtype=torch.int64)
        matrix = matrix.detach().double().cpu()
        seen = ~matrix.isnan()
        self.total += torch.where(seen, matrix, 0.0)
        self.count += seen.long()

    # ------------------------------------------------------------------------------ measuring
    def _due(self, trainer: L.Trainer, batch_idx: int) -> bool:
        every = self.every_n_steps
        if not every or trainer.global_step % every:
            return False
        return batch_idx % trainer.accumulate_grad_batches == 0  # first micro-batch only

    def _step_size(self, trainer: L.Trainer) -> float | dict[int, float] | None:
        """``lr``, or each parameter's learning rate now (by ``id``): its optimizer group's, so
        that backbone stages under ``backbone_lr_scale``/``layer_decay`` step as in training."""
        if self.lr is not None:
            return self.lr
        optimizers = trainer.optimizers
        if not optimizers:
            self._say("optimizer", "task affinity: no optimizer to take the learning rate from")
            return None
        rates = {
            id(p): float(group["lr"])
            for optimizer in optimizers
            for group in optimizer.param_groups
            for p in group["params"]
        }
        if not all(math.isfinite(r) and r > 0 for r in rates.values()):
            self._say(
                "lr",
                "task affinity: a learning rate is 0 at step %d (warm-up?): steps with a zero "
                "learning rate are not measured",
                trainer.global_step,
            )
            return None
        return rates

    def measure(
        self,
        pl_module: MultiTaskModule,
        record: Any,
        batch: Mapping[str, Any],
        lr: float | Mapping[int, float],
        world_size: int = 1,
    ) -> tuple[list[str], torch.Tensor] | None:
        """This rank's k×k affinity matrix (float64, CPU; every task of the module, in order;
        NaN rows and columns for tasks without a loss) on the step of ``record`` (the module's
        :class:`~lightning_mtl.module.StepRecord`, graph alive) and its ``batch``; None when
        there is nothing to measure. Changes nothing: parameters, buffers, gradients and the
        RNG are as before."""
        names = [task.name for task in pl_module.tasks]
        meetings: list[Meeting] = list(record.meetings or [])
        if not meetings:
            self._say("meeting", "task affinity: no meeting place (nothing shared); not measured")
            return None
        place = meetings[0].place
        shared = place.trainable_parameters()
        if not shared:
            self._say(
                "frozen", "task affinity: nothing upstream of %r trains; not measured", place.name
            )
            return None
        present = [n for n in names if n in record.losses]
        if world_size == 1 and len(present) < 2:
            self._say("tasks", "task affinity: fewer than 2 tasks in a measured batch; skipped")
            return None
        net: nn.Module = pl_module.net
        keys_of = {id(p): key for key, p in net.named_parameters()}
        if any(id(p) not in keys_of for p in shared):
            self._say("outside", "task affinity: shared parameters outside the network; skipped")
            return None
        keys = [keys_of[id(p)] for p in shared]
        gradients: list[Sequence[torch.Tensor] | None] = []
        for name in names:
            if name in record.losses:
                loss = record.losses[name]
                gradients.append(shared_gradients(loss, name, meetings, shared, record.grad_scale))
            elif world_size > 1:  # a zero step: every rank runs k + 1 passes (SyncBatchNorm)
                gradients.append([torch.zeros_like(p) for p in shared])
            else:
                gradients.append(None)
        images = pl_module._images(batch)
        buffers = dict(net.named_buffers())

        def losses_at(values: Sequence[torch.Tensor] | None) -> dict[str, torch.Tensor]:
            state = {key: buffer.clone() for key, buffer in buffers.items()}
            if values is not None:
                state.update(zip(keys, values, strict=True))
            with torch.no_grad(), same_rng(images.device):
                outputs = torch.func.functional_call(net, state, (images,))
                losses, _ = pl_module.task_losses(outputs, batch)
            return {n: v for n, v in losses.items() if n in record.losses}

        if isinstance(lr, Mapping):  # each shared parameter at its optimizer group's rate
            if any(id(p) not in lr for p in shared):
                self._say("optimizer", "task affinity: shared parameters outside the optimizer")
                return None
            rates: float | list[float] = [lr[id(p)] for p in shared]
        else:
            rates = lr
        matrix = lookahead_affinity(losses_at, names, shared, gradients, rates)
        for i, name in enumerate(names):
            if name not in record.losses:
                matrix[i] = math.nan
        return names, matrix

    def _say(self, key: str, message: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            log.info(message, *args)


def shared_gradients(
    loss: torch.Tensor,
    task: str,
    meetings: Sequence[Meeting],
    params: Sequence[nn.Parameter],
    scale: float | None = None,
) -> list[torch.Tensor]:
    """``∂loss/∂params`` for the shared parameters upstream of ``meetings[0]``, the graph kept.

    Uncut meetings (loss-based methods): one backward pass. Cut meetings (gradient methods: the
    modules after each place read detached leaves): the task's gradient at each place it passes,
    deepest first and chained across the cuts (:func:`~lightning_mtl.weighting.meetings.
    task_gradient`), then sent through the first place's tensors to its parameters. With an
    fp16 GradScaler ``scale`` the backward runs on the scaled loss and is divided back (no
    underflow). Parameters the loss does not reach get zeros; the gradients come in the
    parameters' dtype, float32 when scaled.
    """
    factor = scale if scale is not None else 1.0
    first = meetings[0]
    outputs: list[torch.Tensor] = [loss * factor] if loss.requires_grad else []
    grad_outputs: list[torch.Tensor] = [torch.ones_like(loss)] if loss.requires_grad else []
    if first.leaves is not first.tensors:
        rows: dict[int, LeafGrads] = {}
        for index in reversed(range(len(meetings))):
            meeting = meetings[index]
            if task not in meeting.place.tasks or not any(x.requires_grad for x in meeting.leaves):
                continue
            later = [(meetings[q], rows[q]) for q in sorted(rows)]
            rows[index] = task_gradient(loss, meeting, later, scale)
        for tensor, part in zip(first.tensors, rows.get(0, []), strict=False):
            if part is not None and tensor.requires_grad:
                outputs.append(tensor)
                grad_outputs.append((part * factor).to(tensor.dtype))
    got: Sequence[torch.Tensor | None] = [None] * len(params)
    if outputs:
        got = torch.autograd.grad(
            outputs, list(params), grad_outputs, retain_graph=True, allow_unused=True
        )
    gradients = []
    for grad, param in zip(got, params, strict=True):
        if grad is None:
            gradients.append(torch.zeros_like(param))
        else:
            gradients.append(grad.float() / factor if scale is not None else grad)
    return gradients


@contextlib.contextmanager
def same_rng(device: torch.device) -> Iterator[None]:
    """Run the block from the RNG state at entry and restore that state after it: every forward
    pass in such a block draws the same dropout masks, and the caller's stream does not move."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            yield
        return
    index = device.index
    if index is None:
        module = torch.get_device_module(device.type)
        index = module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        yield


def mean_over_ranks(trainer: L.Trainer, matrix: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Each entry's mean over the ranks that measured it (NaN where none did): the values and
    the counts summed in one all-reduce."""
    seen = ~matrix.isnan()
    stacked = torch.stack([torch.where(seen, matrix, 0.0), seen.double()]).to(device)
    total = trainer.strategy.reduce(stacked, reduce_op="sum").double().cpu()
    return torch.where(total[1] > 0, total[0] / total[1].clamp_min(1.0), math.nan)
