"""The multi-task LightningModule: the path of one batch, in one short file.

    batch ─▶ architecture (timm backbone, shared and task-specific layers) ─▶ features[task]
          ─▶ heads[task] ─▶ outputs[task] ─▶ losses[task] (labelled samples only)
          ─▶ balancer ─▶ one scalar ─▶ Lightning: backward, DDP, AMP, clipping, accumulation
          ─▶ one optimizer (groups per backbone stage, new layers, heads, balancer)

A batch is ``{"image": B×C×H×W, "targets": {key: tensor}, "mask": {key: bool[B]}}``. A task
reads the label ``targets[task.target]`` of the samples where ``mask[task.target]`` is true; a
task with no labelled sample in the batch has no loss that step and is left out of the
weighting. Bookkeeping lives elsewhere: metrics in :mod:`lightning_mtl.task_metrics`, the
gradient-conflict monitor, the fp16 roll-back of the balancer and layer-wise training in
:mod:`lightning_mtl.callbacks`, the optimizer's groups in :mod:`lightning_mtl.optim`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_mtl.callbacks.balancer_rollback import BalancerRollback, grad_scale
from lightning_mtl.callbacks.nonfinite import NonFiniteGuard
from lightning_mtl.errors import ConfigError
from lightning_mtl.models.architectures import Meeting, architecture_options, build_architecture
from lightning_mtl.models.backbone import Backbone
from lightning_mtl.models.net import MultiTaskNet
from lightning_mtl.nonfinite import NonFinitePolicy, check_losses, parameter_zero_term
from lightning_mtl.optim import (
    build_optimizer,
    check_implementation,
    fused_conflict,
    group_rules,
    optimizer_groups,
)
from lightning_mtl.prediction import predicted
from lightning_mtl.schedules import schedule_length
from lightning_mtl.task_metrics import TaskMetrics
from lightning_mtl.tasks import (
    TaskSpec,
    build_tasks,
    check_against_batches,
    plain_container,
    task_reads,
)
from lightning_mtl.utils.setup import CONFIG_DIR
from lightning_mtl.weighting import StepContext, build_balancer
from lightning_mtl.weighting.base import global_loss_values


@dataclass
class StepRecord:
    """The step's losses and meetings, for callbacks that run before the backward pass."""

    losses: dict[str, torch.Tensor]
    meetings: list[Meeting]
    grad_scale: float | None
    batch_idx: int


class MultiTaskModule(L.LightningModule):
    """A timm backbone in an architecture, the configured task heads, losses and metrics, and a
    balancer, trained with one optimizer.

    Args:
        backbone: keyword arguments of :class:`Backbone` (``name``, ``pretrained``, ...).
        tasks: the ``tasks:`` block (see :mod:`lightning_mtl.tasks`).
        weighting: ``{name: <method>, **kwargs}`` (see :mod:`lightning_mtl.weighting`).
        optimizer: a partial optimizer, called with the parameter groups.
        optimizer_impl: ``auto`` (fused where torch supports it, else foreach, else
            single-tensor), ``fused``, ``foreach`` or ``single`` (see :mod:`lightning_mtl.optim`).
        scheduler: a partial LR scheduler or ``None``; it receives ``total_steps`` if it takes it.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        architecture: a name from ``configs/architecture/`` or ``{name, **options}``.
        backbone_lr_scale: the backbone's learning rate relative to the heads' (transfer).
        layer_decay: each backbone stage's LR relative to the stage above it (1: off).
        no_decay_norm_bias: no weight decay on biases, norms and ViT embeddings.
        train_metrics: also compute metrics on training batches (costs a little per step).
        compile: ``torch.compile`` the network (true, or the options of ``torch.compile`` such as
            ``{mode: max-autotune}``); ``channels_last``: NHWC memory format.
        nonfinite_loss: ``{policy: skip_step | drop_task, max_consecutive: n}``, what a step with a
            NaN/inf task loss does (see :mod:`lightning_mtl.nonfinite`).
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        tasks: Mapping[str, Any],
        weighting: Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        architecture: str | Mapping[str, Any] = "hard",
        backbone_lr_scale: float = 1.0,
        layer_decay: float = 1.0,
        no_decay_norm_bias: bool = False,
        train_metrics: bool = True,
        compile: bool | Mapping[str, Any] = False,
        channels_last: bool = False,
        optimizer_impl: str = "auto",
        nonfinite_loss: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        backbone, tasks, weighting, compile, nonfinite_loss = map(
            plain_container, (backbone, tasks, weighting, compile, nonfinite_loss)
        )
        # the architecture's options in full (its YAML defaults), so checkpoints are complete
        architecture = architecture_options(plain_container(architecture), CONFIG_DIR)
        # Plain containers only, so checkpoints load with torch.load(weights_only=True); the
        # optimizer and scheduler factories are code, kept out of the checkpoint.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        check_implementation(optimizer, optimizer_impl)
        #: skips, counts and stops on NaN/inf losses and gradients (a callback of every run)
        self.nonfinite = NonFiniteGuard(NonFinitePolicy.parse(nonfinite_loss))
        if scheduler_interval not in {"step", "epoch"}:
            raise ConfigError(
                f"model.scheduler_interval={scheduler_interval!r}; accepted values: step, epoch"
            )
        reads = task_reads(tasks)
        net = build_architecture(architecture, Backbone(**backbone), reads)
        self.tasks: list[TaskSpec] = build_tasks(tasks, {t: net.feature_info(t) for t in reads})
        self.net = MultiTaskNet(net, {task.name: task.head for task in self.tasks})
        self.losses = nn.ModuleDict({task.name: task.loss for task in self.tasks})
        self.weighting = build_balancer(dict(weighting), self.tasks, net.places, net.check_level)
        self.task_metrics = TaskMetrics(self.tasks, train=train_metrics)
        #: the current step's losses and meetings, for the callbacks before backward
        self.step_record: StepRecord | None = None

    @property
    def backbone(self) -> nn.Module:
        """Every backbone-derived module (copies in branches, experts and columns included), for
        Lightning's ``BackboneFinetuning`` and similar callbacks that look for ``backbone``."""
        return nn.ModuleList(self.net.architecture.backbone_modules())

    # ------------------------------------------------------------------------------ the batch path
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(images)

    def task_losses(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Each task's loss over its labelled samples, and those samples' (output, label).

        A task with no labelled sample (or only ignored labels, or whose label key the batch
        lacks) has no entry in either dict.
        """
        losses: dict[str, torch.Tensor] = {}
        labelled: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for task in self.tasks:
            if task.target not in batch["targets"]:  # merged data: no sample of it labels this
                continue
            output, target = outputs[task.name], batch["targets"][task.target]
            mask = batch.get("mask", {}).get(task.target)
            if mask is not None and not bool(mask.all()):
                if not bool(mask.any()):
                    continue
                output, target = output[mask], target[mask]
            loss = self.losses[task.name](output, target)
            if loss is not None:
                losses[task.name] = loss
                labelled[task.name] = (output.detach(), target)
        return losses, labelled

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        images = self._images(batch)
        context = self._step_context()
        balancer = self.weighting
        # params-level gradient methods hook the architecture for the step's forward and G
        with balancer.hooked(self.net.architecture.places, context.world_size, context.step):
            # Gradient methods: the modules after each meeting place read it detached (cut), so the
            # task gradients there cost backward passes through those modules only.
            out = self.net.forward_features(images, cut=balancer.needs_gradients)
            outputs = self.net.forward_heads(out.features, images.shape[-2:], out.meetings)
            losses, labelled = self.task_losses(outputs, batch)
            # NaN/inf losses, before the balancer sees them: skip the step, or drop those tasks
            check = check_losses(losses, balancer.tasks, context.all_reduce, self.device)
            if check.bad:
                rank_zero = self._trainer is None or self._trainer.is_global_zero
                if self.nonfinite.on_bad_losses(self.global_step, check, losses, rank_zero):
                    # A zero loss whose zero gradient reaches every parameter from the parameters
                    # themselves (Lightning refuses a None under DDP, and DDP wants every gradient);
                    # then optimizer_step skips the optimizer and the guard restores the state.
                    self.step_record = None
                    return parameter_zero_term(self)
                losses = {t: v for t, v in losses.items() if t not in check.bad}
                labelled = {t: v for t, v in labelled.items() if t not in check.bad}
            context.meetings = out.meetings
            if balancer.needs_gradients:
                context.downstream = self._downstream_parameters()
            if context.all_reduce is not None and balancer.reads_loss_values:
                context.global_losses = global_loss_values(
                    losses, balancer.tasks, context.all_reduce, self.device
                )
            size = images.shape[0]
            # A zero term per task without labels keeps its head in the graph, so DDP (with the
            # default find_unused_parameters=False) gets a gradient, zero, for every parameter; a
            # batch with no label at all gives a zero loss that still back-propagates.
            terms = [
                outputs[t.name].sum() * 0.0
                for t in self.tasks
                if t.name not in losses and t.name not in check.bad
            ]
            if check.bad:  # a dropped task's outputs may be NaN: zero gradients from the parameters
                terms.append(parameter_zero_term(self))
            if losses or balancer.needs_gradients or context.global_losses is not None:
                # under DDP a balancer runs even without a local loss: it joins the all-reduces, and
                # methods with state update it like the other ranks
                combined = balancer(losses, context)
                terms.insert(0, combined.loss)
                shown = {f"train/weight/{t}": w for t, w in combined.weights.items()}
                for place, weights in combined.places.items():
                    shown.update({f"train/weight/{place}/{t}": w for t, w in weights.items()})
                self.log_dict(shown, batch_size=size)
            else:  # the balancer's learned parameters (uncertainty, IMTL-L) get a zero gradient too
                terms.append(balancer.zero_term())
        total = sum(terms[1:], start=terms[0])
        self._log_train_losses(losses, total, context, size)
        self.step_record = StepRecord(losses, out.meetings, context.grad_scale, batch_idx)
        if self.hparams["train_metrics"]:
            self.task_metrics.update("train_", labelled)
        return total

    def _log_train_losses(
        self,
        losses: Mapping[str, torch.Tensor],
        total: torch.Tensor,
        context: StepContext,
        size: int,
    ) -> None:
        """Log ``train/<task>/loss`` and ``train/loss``. Under DDP they are the global values:
        each task's loss averaged over the ranks that labelled it, and the total over all ranks
        (one all-reduce of 2(k+1) numbers per step, on every rank at the same point), so the
        curves do not show rank 0's shard alone."""
        values = {t: v.detach() for t, v in losses.items()}
        if context.all_reduce is not None:
            names = [*self.weighting.tasks, ""]
            means = global_loss_values(
                {**values, "": total}, names, context.all_reduce, self.device
            )
            labelled = means.isnan().logical_not().tolist()  # one host sync, not one per name
            present = {n: m for n, m, keep in zip(names, means, labelled, strict=True) if keep}
            values = {t: m for t, m in present.items() if t}
            total = present.get("", total)
        self.log_dict({f"train/{t}/loss": v for t, v in values.items()}, batch_size=size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=size)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        # Lightning passes a LightningOptimizer, which subclasses the wrapped optimizer's class
        optimizer: torch.optim.Optimizer,  # type: ignore[override]
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """The optimizer's step, unless the ``nonfinite_loss`` guard skips it: the closure (the
        last micro-batch's training step and backward) runs first, then a window with a NaN/inf
        loss (``skip_step``) or gradient never reaches the optimizer, the clipping or the fp16
        GradScaler. (Optimizers that evaluate their closure more than once, such as LBFGS, are
        not supported: they would get this one result again.)"""
        if optimizer_closure is None:
            optimizer.step()
            return
        result = optimizer_closure()
        if self.nonfinite.skips_step(self.trainer, self, optimizer):
            return
        optimizer.step(closure=lambda: result)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.step_record = None  # callbacks had it; the graph's tensors need not outlive the step

    def _downstream_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters after the architecture: the heads' and the losses' own."""
        parts = (self.net.heads.parameters(), self.losses.parameters())
        return [p for part in parts for p in part if p.requires_grad]

    def _images(self, batch: Mapping[str, Any]) -> torch.Tensor:
        images = batch["image"]
        if self.hparams["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _step_context(self) -> StepContext:
        trainer = self._trainer
        context = StepContext(
            step=self.global_step, epoch=self.current_epoch, grad_scale=grad_scale(trainer)
        )
        if trainer is not None and trainer.world_size > 1:
            context.world_size, context.rank = trainer.world_size, trainer.global_rank
            context.all_reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")
        return context

    def validation_step(
        self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        losses, labelled = self.task_losses(self.net(self._images(batch)), batch)
        self.task_metrics.evaluate("val", losses, labelled, dataloader_idx)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        losses, labelled = self.task_losses(self.net(self._images(batch)), batch)
        self.task_metrics.evaluate("test", losses, labelled, dataloader_idx)

    def predict_step(
        self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """Each task's output in the form a user reads (:mod:`lightning_mtl.prediction`): class
        probabilities (B×C; per pixel B×C×H×W for segmentation), multi-label probabilities,
        regression values, depth maps, unit normals; at the input images' size."""
        outputs = self.net(self._images(batch))
        return {task.name: predicted(task, outputs[task.name]) for task in self.tasks}

    def on_train_epoch_end(self) -> None:
        if self.hparams["train_metrics"]:
            self.task_metrics.log_epoch("train", self)

    def on_validation_epoch_end(self) -> None:
        self.task_metrics.log_epoch("val", self)

    def on_test_epoch_end(self) -> None:
        self.task_metrics.log_epoch("test", self)

    def on_train_start(self) -> None:
        # frozen batch norm (all its parameters frozen) keeps its statistics: eval mode
        self.net.architecture.train(self.training)

    # ------------------------------------------------------------------------------------- set-up
    def check_against_batch(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Run real batches (one per source of merged data) through the network and compare
        outputs with labels: :func:`lightning_mtl.tasks.check_against_batches`."""
        check_against_batches(self, self.tasks, batch)

    def setup(self, stage: str) -> None:
        if self.hparams["channels_last"]:
            # Module.to takes memory_format; torch's overloads of it leave the keyword out
            self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self.hparams["compile"] and stage == "fit":
            self.net.compile_parts(self.hparams["compile"])
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        sources = getattr(datamodule, "eval_sources", None) or {}
        self.task_metrics.add_sources(sources, self.device)

    def configure_callbacks(self) -> list[L.Callback]:
        """The fp16 roll-back of the balancer's state and the guard of ``nonfinite_loss`` (this
        module's own, which ``training_step`` reports to), in every run (no config can drop them)."""
        present = self._trainer is not None and any(
            # Trainer.callbacks is set by Lightning's callback connector, not declared on Trainer
            isinstance(c, BalancerRollback)
            for c in self._trainer.callbacks  # type: ignore[attr-defined]
        )
        return [self.nonfinite] if present else [BalancerRollback(), self.nonfinite]

    def configure_optimizers(self) -> Any:
        """One optimizer over the groups of :func:`lightning_mtl.optim.optimizer_groups`, in the
        implementation ``optimizer_impl`` selects (:func:`lightning_mtl.optim.build_optimizer`)."""
        optimizer = build_optimizer(
            self.make_optimizer,
            optimizer_groups(self, group_rules(self)),
            self.hparams.get("optimizer_impl", "auto"),
            fused_conflict(self._trainer),
        )
        make_scheduler = self.make_scheduler
        if make_scheduler is None:
            return optimizer
        kwargs, interval = {}, self.hparams["scheduler_interval"]
        if "total_steps" in inspect.signature(make_scheduler).parameters:
            kwargs["total_steps"] = schedule_length(self.trainer, interval)
        scheduler = make_scheduler(optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
        }
