"""The multi-task LightningModule: the path of one batch, in one short file.

    batch ─▶ backbone (timm) ─▶ features ─▶ heads[task] ─▶ outputs[task]
          ─▶ losses[task] (labelled samples only) ─▶ weighting ─▶ one scalar
          ─▶ Lightning: backward, DDP all-reduce, AMP scaling, clipping, accumulation, step

A batch is ``{"image": B×C×H×W, "targets": {key: tensor}, "mask": {key: bool[B]}}``. A task
reads the label ``targets[task.target]`` of the samples where ``mask[task.target]`` is true; a
task with no labelled sample in the batch has no loss that step and is left out of the
weighting. Metrics are one torchmetrics ``MetricCollection`` per task and stage, logged as
``<stage>/<task>/<metric>``.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from lightning_mtl.errors import ConfigError
from lightning_mtl.metrics import build_metrics
from lightning_mtl.models.backbone import Backbone, Features
from lightning_mtl.tasks import (
    TaskSpec,
    build_tasks,
    check_label_keys,
    check_tasks_against_batch,
    plain_container,
)
from lightning_mtl.weighting import StepContext, build_weighting, task_gradients

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test")
_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class MultiTaskNet(nn.Module):
    """Shared backbone + one head per task; ``forward(images) -> {task: output}``.

    A plain ``nn.Module``: usable without Lightning (see the benchmark and the README).
    """

    def __init__(self, backbone: Backbone, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)

    def forward_features(self, images: torch.Tensor) -> Features:
        return self.backbone(images)

    def forward_heads(
        self, features: Features, image_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        return {name: head(features, image_size) for name, head in self.heads.items()}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_heads(self.forward_features(images), tuple(images.shape[-2:]))


class MultiTaskModule(L.LightningModule):
    """A timm backbone, the configured task heads, their losses and metrics, and a balancer.

    Args:
        backbone: keyword arguments of :class:`Backbone` (``name``, ``pretrained``, ...).
        tasks: the ``tasks:`` block (see :mod:`lightning_mtl.tasks`).
        weighting: ``{name: <method>, **kwargs}`` (see :mod:`lightning_mtl.weighting`).
        optimizer: a partial optimizer, called with the parameter groups.
        scheduler: a partial LR scheduler or ``None``; it receives ``total_steps`` if it takes it.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        backbone_lr_scale: the backbone's learning rate relative to the heads' (transfer learning).
        train_metrics: also compute metrics on training batches (costs a little per step).
        compile: ``torch.compile`` the network.
        grad_monitor_every_n_steps: log task gradient norms and their cosine (conflict) matrix
            every that many optimizer steps (0: never).
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        tasks: Mapping[str, Any],
        weighting: Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        backbone_lr_scale: float = 1.0,
        train_metrics: bool = True,
        compile: bool = False,
        grad_monitor_every_n_steps: int = 50,
    ) -> None:
        super().__init__()
        backbone, tasks, weighting = (
            plain_container(backbone),
            plain_container(tasks),
            plain_container(weighting),
        )
        # Plain containers only, so checkpoints load with torch.load(weights_only=True); the
        # optimizer and scheduler factories are code, kept out of the checkpoint.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        for name in tasks:
            if not _TASK_NAME.match(str(name)):
                raise ConfigError(
                    f"tasks.{name}: a task name must start with a letter and hold only letters, "
                    "digits and '_' (it becomes part of metric keys and module names)"
                )
        if scheduler_interval not in {"step", "epoch"}:
            raise ConfigError(
                f"model.scheduler_interval={scheduler_interval!r}; accepted values: step, epoch"
            )
        shared = Backbone(**backbone)
        self.tasks: list[TaskSpec] = build_tasks(tasks, shared)
        self.net = MultiTaskNet(shared, {task.name: task.head for task in self.tasks})
        self.losses = nn.ModuleDict({task.name: task.loss for task in self.tasks})
        weighting = dict(weighting)
        if "name" not in weighting:
            raise ConfigError(
                "weighting.name is missing (e.g. weighting=equal on the command line)"
            )
        custom = {t.name: t.weight for t in self.tasks if t.weight != 1.0}
        if custom and weighting["name"] != "static":
            log.warning(
                "tasks.<name>.weight %s is read only by weighting=static; weighting=%s ignores it",
                custom,
                weighting["name"],
            )
        self.weighting = build_weighting(
            weighting.pop("name"),
            [task.name for task in self.tasks],
            task_weights={task.name: task.weight for task in self.tasks},
            **weighting,
        )
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{task.name}": build_metrics(task.name, task.head, task.metrics).clone(
                    prefix=f"{stage}/{task.name}/"
                )
                for stage in STAGES
                for task in self.tasks
                if stage != "train" or train_metrics
            }
        )
        self.loss_means = nn.ModuleDict(
            {
                f"{stage}_{task.name}": MeanMetric()
                for stage in ("val", "test")
                for task in self.tasks
            }
        )
        self._updated: set[str] = set()  # metric collections updated since their last reset
        #: evaluation sources in loader order (set up by add_source_metrics); [] for one source
        self.source_names: list[str] = []
        self._source_keys: list[str] = []
        #: (task names, cosine matrix, step) of the last gradient-conflict measurement
        self.conflict: tuple[list[str], torch.Tensor, int] | None = None
        #: fp16: (GradScaler scale, balancer state) at the start of the optimizer step's window
        self._snapshot: tuple[float, dict[str, torch.Tensor]] | None = None

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
        images = batch["image"]
        scale = self._grad_scale()
        if scale is not None and batch_idx % self._accumulation == 0:
            self._snapshot = (scale, {k: v.clone() for k, v in self.weighting.state_dict().items()})
        self.weighting.prepare(self.net.backbone, self._world_size)
        features = self.net.forward_features(images)
        context = StepContext(step=self.global_step, epoch=self.current_epoch, grad_scale=scale)
        shared = _feature_list(features)
        if self.weighting.needs_gradients:
            # The heads read the representation detached into leaves: task gradients of it cost
            # a backward pass through the heads only, and the balancer sends its combined
            # gradient into the backbone (see weighting/gradient.py).
            context.features = shared
            context.representation = [f.detach().requires_grad_(f.requires_grad) for f in shared]
            context.shared_parameters = list(self.net.backbone.parameters())
            features = Features(context.representation[0], context.representation[1:])
        outputs = self.net.forward_heads(features, tuple(images.shape[-2:]))
        losses, labelled = self.task_losses(outputs, batch)
        if self._world_size > 1:
            context.world_size, context.rank = self._world_size, self.global_rank
            context.all_reduce = self._all_reduce_sum
            if self.weighting.reads_loss_values:
                context.global_losses = self._global_losses(losses)
        size = images.shape[0]
        # A zero term per task without labels keeps its head in the graph, so DDP (with the
        # default find_unused_parameters=False) gets a gradient, zero, for every parameter; a
        # batch with no label at all gives a zero loss that still back-propagates.
        terms = [outputs[t.name].sum() * 0.0 for t in self.tasks if t.name not in losses]
        if losses or self.weighting.needs_gradients or context.global_losses is not None:
            # under DDP a balancer runs even without a local loss: it joins the all-reduce of
            # gradient methods, and methods with state update it like the other ranks
            combined = self.weighting(losses, context)
            terms.insert(0, combined.loss)
            self.log_dict(
                {f"train/{t}/loss": v.detach() for t, v in losses.items()}, batch_size=size
            )
            self.log_dict(
                {f"train/weight/{t}": w for t, w in combined.weights.items()}, batch_size=size
            )
        else:  # the balancer's learned parameters (uncertainty, IMTL-L) get a zero gradient too
            terms.extend(p.sum() * 0.0 for p in self.weighting.parameters())
        total = sum(terms[1:], start=terms[0])
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=size)
        every = self.hparams.grad_monitor_every_n_steps
        if every and self.global_step % every == 0 and batch_idx % self._accumulation == 0:
            self._log_gradient_conflict(losses, shared, context)
        if self.hparams.train_metrics:
            self._update_metrics("train_", labelled)
        return total

    @property
    def _accumulation(self) -> int:
        return self._trainer.accumulate_grad_batches if self._trainer is not None else 1

    def _log_gradient_conflict(
        self,
        losses: Mapping[str, torch.Tensor],
        shared: list[torch.Tensor],
        context: StepContext,
    ) -> None:
        """Log each task's gradient norm and the pairwise cosines of the task gradients.

        Gradient methods have the (global) Gram matrix already; for the others it is computed
        at the shared representation (k backward passes through the heads; under DDP one
        all-reduce of k² numbers). Logged as ``train/grad_norm/<task>`` and
        ``train/grad_cos/<a>/<b>``; :attr:`conflict` keeps the last matrix for the W&B heatmap.
        """
        gram = getattr(self.weighting, "last_gram", None)
        if not self.weighting.needs_gradients or gram is None:
            names = [t.name for t in self.tasks if t.name in losses]
            rows = task_gradients([losses[n] for n in names], shared, context.grad_scale)
            full = rows.new_zeros(len(self.tasks), rows.shape[1])
            full[[self.weighting.index[n] for n in names]] = rows
            gram = full @ full.T
            if self._world_size > 1:
                gram = self._all_reduce_sum(gram) / self._world_size**2
        norms = gram.diagonal().clamp_min(0).sqrt()
        cosine = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
        seen = [i for i in range(len(self.tasks)) if norms[i] > 0]
        names = [self.tasks[i].name for i in seen]
        values = {f"train/grad_norm/{names[a]}": norms[i] for a, i in enumerate(seen)}
        for a, i in enumerate(seen):
            for b in range(a + 1, len(seen)):
                values[f"train/grad_cos/{names[a]}/{names[b]}"] = cosine[i, seen[b]]
        # straight to the loggers: self.log would repeat the last value at every step between
        metrics = {key: float(value) for key, value in values.items()}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        self.conflict = (names, cosine[seen][:, seen].detach().cpu(), self.global_step)

    def _grad_scale(self) -> float | None:
        """The fp16 GradScaler's current scale, or None without one."""
        scaler = getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer else None
        return float(scaler.get_scale()) if scaler is not None else None

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    @property
    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _global_losses(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Each task's loss averaged over the ranks that labelled it (NaN where none did).

        One all-reduce of 2k numbers: the k loss sums and the k counts of ranks.
        """
        k = len(self.tasks)
        stats = torch.zeros(2, k, device=self.device)
        for i, task in enumerate(self.tasks):
            if task.name in losses:
                stats[0, i] = losses[task.name].detach().float()
                stats[1, i] = 1.0
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        return torch.where(stats[1] > 0, stats[0] / stats[1].clamp_min(1), torch.nan)

    def validation_step(
        self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def _evaluate(self, stage: str, batch: Mapping[str, Any], dataloader_idx: int = 0) -> None:
        """Update each task's metrics and mean loss, overall and, with several evaluation
        sources (one loader each), for the loader's source as well."""
        losses, labelled = self.task_losses(self.net(batch["image"]), batch)
        groups = [f"{stage}_"]
        if self.source_names:
            groups.append(f"{stage}_{self.source_names[dataloader_idx]}__")
        for group in groups:
            for task, loss in losses.items():
                # weighted by the labelled samples: the epoch value is a per-sample mean
                weight = labelled[task][1].shape[0]
                self.loss_means[group + task].update(loss, weight=weight)
            self._update_metrics(group, labelled)

    def _update_metrics(
        self, group: str, labelled: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        for task in self.tasks:
            key = group + task.name
            if task.name in labelled and key in self.metrics:
                self.metrics[key].update(*task.metric_inputs(*labelled[task.name]))
                self._updated.add(key)

    def _log_epoch_metrics(self, stage: str) -> None:
        """Compute, log and reset each task's metrics (and, for val/test, its mean loss).

        Metrics are updated every step but computed once per epoch (logging the metric objects
        every step costs Lightning a device move of every metric per step). ``compute()``
        gathers every rank's state, so all ranks must call it for the same tasks: which tasks
        had labels this epoch is agreed first with one all-reduce of k numbers. A task with no
        label anywhere in the epoch logs nothing. ``<stage>/loss`` is the sum of the tasks'
        mean losses.
        """
        groups = [("", f"{stage}_")]
        if stage != "train":
            groups += [(f"{source}/", f"{stage}_{source}__") for source in self.source_names]
        entries = [
            (name, task, group + task.name)
            for name, group in groups
            for task in self.tasks
            if group + task.name in self.metrics
        ]
        keys = [key for _, _, key in entries]
        updated = torch.tensor([key in self._updated for key in keys], device=self.device)
        if self._world_size > 1:
            updated = self.trainer.strategy.reduce(updated.float(), reduce_op="sum") > 0
        totals: dict[str, torch.Tensor] = {}
        for (name, task, key), was_updated in zip(entries, updated.tolist(), strict=True):
            if was_updated:
                # compute() already gathered all ranks: sync_dist only averages equal values
                self.log_dict(self.metrics[key].compute(), sync_dist=True)
                if key in self.loss_means:
                    loss = self.loss_means[key].compute()
                    self.log(f"{stage}/{name}{task.name}/loss", loss, sync_dist=True)
                    totals[name] = totals[name] + loss if name in totals else loss
            self.metrics[key].reset()
            if key in self.loss_means:
                self.loss_means[key].reset()
            self._updated.discard(key)
        for name, total in totals.items():
            # a source's sum is ``total_loss``: ``<source>/loss`` would collide with the loss of
            # a task of the same name (Office-31: the domains are both sources and tasks)
            key = f"{stage}/{name}total_loss" if name else f"{stage}/loss"
            self.log(key, total, sync_dist=True, prog_bar=not name)

    def on_train_epoch_end(self) -> None:
        if self.hparams.train_metrics:
            self._log_epoch_metrics("train")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """fp16: a step the GradScaler skipped (inf/NaN gradients; it then lowers its scale)
        leaves no trace in the balancer: its state returns to the start of the step's window.

        Gradient methods already see an overflow in the task gradients of the representation
        (NaN weights, state untouched), but one that occurs deeper in the backbone's backward
        pass shows only when the scaler unscales; loss-based methods (DWA's history, FAMO's
        logits) would otherwise count a step that did not happen.
        """
        if self._snapshot is None:
            return
        scale, state = self._snapshot
        now = self._grad_scale()
        if now is not None and now < scale:
            self.weighting.load_state_dict(state)
            self._snapshot = None
            log.debug(
                "step %d skipped by the GradScaler; balancer state restored", self.global_step
            )

    def on_train_end(self) -> None:
        self.weighting.prepare(None)  # remove any hooks a balancer put on the backbone

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    # ------------------------------------------------------------------------------------- set-up
    def check_against_batch(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Run real batches through the model and compare outputs with labels (see tasks.py).

        Several batches (one per source of merged data): each is checked for the labels it has,
        and every task's label must be in at least one of them.
        """
        batches = [batch] if isinstance(batch, Mapping) else list(batch)
        check_label_keys(self.tasks, (key for one in batches for key in one["targets"]))
        was_training = self.training
        self.eval()
        try:
            for one in batches:
                with torch.no_grad():
                    outputs = self.net(one["image"])
                check_tasks_against_batch(self.tasks, outputs, one)
        finally:
            self.train(was_training)

    def setup(self, stage: str) -> None:
        if self.hparams.compile and stage == "fit":
            # In place: state-dict keys (and so checkpoints) stay those of the eager model.
            self.net.compile()
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        self.add_source_metrics(getattr(datamodule, "eval_sources", None) or {})

    def add_source_metrics(self, eval_sources: Mapping[str, Sequence[str]]) -> None:
        """Per-source metrics, for data modules with one evaluation loader per source.

        ``eval_sources`` maps each source name, in loader order, to the target keys it labels;
        each of its tasks gets ``<stage>/<source>/<task>/<metric>`` (and ``.../loss``; the
        source's sum is ``<stage>/<source>/total_loss``) beside the task's overall
        ``<stage>/<task>/<metric>``. Called from :meth:`setup`, before Lightning
        moves the module to its device. With fewer than two sources nothing is added.
        """
        wanted = list(eval_sources) if len(eval_sources) >= 2 else []
        if wanted == self.source_names:
            return
        for key in self._source_keys:  # another data module than before: start over
            del self.metrics[key]
            del self.loss_means[key]
        self._source_keys, self.source_names = [], wanted
        for stage in ("val", "test"):
            for source in wanted:
                for task in self.tasks:
                    if task.target not in eval_sources[source]:
                        continue
                    key = f"{stage}_{source}__{task.name}"
                    prefix = f"{stage}/{source}/{task.name}/"
                    metrics = build_metrics(task.name, task.head, task.metrics)
                    self.metrics[key] = metrics.clone(prefix=prefix).to(self.device)
                    self.loss_means[key] = MeanMetric().to(self.device)
                    self._source_keys.append(key)

    def configure_optimizers(self) -> Any:
        """One optimizer: backbone, heads and balancer parameters in three groups.

        The backbone group's LR is scaled by ``backbone_lr_scale``; the balancer's learned
        parameters (e.g. uncertainty log-variances) get no weight decay.
        """
        make_optimizer = self.make_optimizer
        base_lr = _keyword(make_optimizer, "lr")
        groups = [
            {"params": list(self.net.backbone.parameters()), "name": "backbone"},
            {"params": list(self.net.heads.parameters()), "name": "heads"},
        ]
        if self.hparams.backbone_lr_scale != 1.0:
            if base_lr is None:
                raise ConfigError(
                    "model.backbone_lr_scale needs the base learning rate: set model.optimizer.lr"
                )
            groups[0]["lr"] = base_lr * self.hparams.backbone_lr_scale
        balancer = [p for p in self.weighting.parameters() if p.requires_grad]
        if balancer:
            options = dict(self.weighting.optimizer_options)
            groups.append({"params": balancer, "name": "weighting", "weight_decay": 0.0, **options})
        groups = [g for g in groups if g["params"]]
        optimizer = make_optimizer(groups)
        make_scheduler = self.make_scheduler
        if make_scheduler is None:
            return optimizer
        kwargs = {}
        if "total_steps" in inspect.signature(make_scheduler).parameters:
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = make_scheduler(optimizer, **kwargs)
        interval = self.hparams.scheduler_interval
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
        }


def _feature_list(features: Features) -> list[torch.Tensor]:
    """The shared representation as a flat list: the pooled vector, then the maps."""
    return [features.pooled, *features.maps]


def _keyword(partial: Any, name: str) -> Any:
    """A keyword bound in a ``functools.partial`` (Hydra's ``_partial_: true``), or None."""
    return getattr(partial, "keywords", {}).get(name)
