"""Metric bookkeeping: one ``MetricCollection`` and one mean loss per stage × task × source.

Keys: ``<stage>_<task>`` for a task's metrics over every sample that labels it, and, with
several evaluation sources (merged data), ``<stage>_<source>__<task>`` per source. Metrics are
updated every step but computed, logged and reset once per epoch: logging the metric objects
every step costs Lightning a device move of every metric per step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from lightning_mtl.metrics import build_metrics
from lightning_mtl.tasks import TaskSpec

STAGES = ("train", "val", "test")
Labelled = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


class TaskMetrics(nn.Module):
    """Each task's metrics per stage (train only if ``train``), and per evaluation source."""

    def __init__(self, tasks: Sequence[TaskSpec], train: bool = True) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{task.name}": self._collection(task, f"{stage}/{task.name}/")
                for stage in STAGES
                for task in self.tasks
                if stage != "train" or train
            }
        )
        self.loss_means = nn.ModuleDict(
            {f"{stage}_{t.name}": MeanMetric() for stage in ("val", "test") for t in self.tasks}
        )
        self._updated: set[str] = set()  # collections updated since their last reset
        #: evaluation sources in loader order (see :meth:`add_sources`); [] for one source
        self.source_names: list[str] = []
        self._source_keys: list[str] = []

    @staticmethod
    def _collection(task: TaskSpec, prefix: str) -> MetricCollection:
        return build_metrics(task.name, task.head, task.metrics).clone(prefix=prefix)

    # nn.ModuleDict is untyped: its items are the MetricCollections / MeanMetrics built above
    def _metrics(self, key: str) -> MetricCollection:
        return cast(MetricCollection, self.metrics[key])

    def _loss_mean(self, key: str) -> MeanMetric:
        return cast(MeanMetric, self.loss_means[key])

    # ------------------------------------------------------------------------------ updates
    def update(self, group: str, labelled: Labelled) -> None:
        """Update the metrics of ``group`` (``"train_"``, ``"val_"``, ``"val_<source>__"``) with
        each task's labelled (output, label) pairs."""
        for task in self.tasks:
            key = group + task.name
            if task.name in labelled and key in self.metrics:
                self._metrics(key).update(*task.metric_inputs(*labelled[task.name]))
                self._updated.add(key)

    def evaluate(
        self,
        stage: str,
        losses: Mapping[str, torch.Tensor],
        labelled: Labelled,
        dataloader_idx: int = 0,
    ) -> None:
        """One evaluation batch: each task's metrics and mean loss, overall and, with several
        sources (one loader each), for the loader's source as well."""
        groups = [f"{stage}_"]
        if self.source_names:
            groups.append(f"{stage}_{self.source_names[dataloader_idx]}__")
        for group in groups:
            for task, loss in losses.items():
                # weighted by the labelled samples: the epoch value is a per-sample mean
                self._loss_mean(group + task).update(loss, weight=labelled[task][1].shape[0])
            self.update(group, labelled)

    # ------------------------------------------------------------------------------ the epoch
    def log_epoch(self, stage: str, module: L.LightningModule) -> None:
        """Compute, log (through ``module``) and reset each task's metrics and mean loss.

        ``compute()`` gathers every rank's state, so all ranks must call it for the same tasks:
        which tasks had labels this epoch is agreed first with one all-reduce of k numbers. A
        task with no label anywhere in the epoch logs nothing. ``<stage>/loss`` is the sum of
        the tasks' mean losses; a source's sum is ``<stage>/<source>/total_loss``.
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
        updated = torch.tensor([key in self._updated for key in keys], device=module.device)
        if module.trainer.world_size > 1:
            updated = module.trainer.strategy.reduce(updated.float(), reduce_op="sum") > 0
        totals: dict[str, torch.Tensor] = {}
        for (name, task, key), was_updated in zip(entries, updated.tolist(), strict=True):
            if was_updated:
                # compute() already gathered all ranks: sync_dist only averages equal values
                module.log_dict(self._metrics(key).compute(), sync_dist=True)
                if key in self.loss_means:
                    loss = self._loss_mean(key).compute()
                    module.log(f"{stage}/{name}{task.name}/loss", loss, sync_dist=True)
                    totals[name] = totals[name] + loss if name in totals else loss
            self._metrics(key).reset()
            if key in self.loss_means:
                self._loss_mean(key).reset()
            self._updated.discard(key)
        for name, total in totals.items():
            # ``total_loss``: ``<source>/loss`` would collide with the loss of a task of the same
            # name (Office-31: the domains are both sources and tasks)
            key = f"{stage}/{name}total_loss" if name else f"{stage}/loss"
            module.log(key, total, sync_dist=True, prog_bar=not name)

    # ------------------------------------------------------------------------------ sources
    def add_sources(self, eval_sources: Mapping[str, Sequence[str]], device: Any = None) -> None:
        """Per-source metrics, for data modules with one evaluation loader per source.

        ``eval_sources`` maps each source name, in loader order, to the target keys it labels;
        each of its tasks gets ``<stage>/<source>/<task>/<metric>`` (and ``.../loss``) beside
        the task's overall ``<stage>/<task>/<metric>``. With fewer than two sources nothing is
        added; another data module than before replaces the previous ones.
        """
        wanted = list(eval_sources) if len(eval_sources) >= 2 else []
        if wanted == self.source_names:
            return
        for key in self._source_keys:
            del self.metrics[key]
            del self.loss_means[key]
        self._source_keys, self.source_names = [], wanted
        for stage in ("val", "test"):
            for source in wanted:
                for task in self.tasks:
                    if task.target not in eval_sources[source]:
                        continue
                    key = f"{stage}_{source}__{task.name}"
                    collection = self._collection(task, f"{stage}/{source}/{task.name}/")
                    self.metrics[key] = collection.to(device)
                    self.loss_means[key] = MeanMetric().to(device)
                    self._source_keys.append(key)
