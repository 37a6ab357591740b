"""A task is data: its name, the label key it reads, its head, loss, metrics and weight.

Tasks are declared in YAML (``configs/task/<name>.yaml`` or an experiment's ``tasks:`` block)::

    segmentation:
      target: segmentation        # label key in the batch; defaults to the task name
      head: {name: segmentation, num_classes: 4}
      loss: {name: cross_entropy}
      metrics: [miou, pixel_accuracy]
      weight: 1.0                 # read by the `static` weighting (task priority)

:func:`build_tasks` turns that block into :class:`TaskSpec` objects, failing with the key and the
accepted values on any mistake; :func:`check_tasks_against_batch` then runs the model on one
real batch and compares each head's output with its labels, so a wrong ``num_classes`` or a
label of the wrong shape stops the run before training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.heads import HEADS, Head
from lightning_mtl.models.losses import LOSSES

TASK_KEYS = {"target", "head", "loss", "metrics", "weight"}
_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass
class TaskSpec:
    """A validated task. ``head`` and ``loss`` are built modules; ``metrics`` is the raw spec."""

    name: str
    target: str
    head: Head
    loss: nn.Module
    metrics: list[str] | dict[str, dict[str, Any] | None]
    weight: float = 1.0

    def metric_inputs(
        self, output: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reshape one task's output and labels into what its torchmetrics expect."""
        kind = self.head.metric_kind
        # Probabilities, not logits: torchmetrics only applies sigmoid/softmax to a batch whose
        # values leave [0, 1], so small logits would be read as probabilities batch by batch.
        if kind == "multilabel":
            return output.float().sigmoid(), target.long()
        if kind == "classification":
            return self._drop_ignored(output.float().softmax(dim=-1), target.long())
        if kind == "regression":
            target = target.reshape(output.shape)
            return (
                (output.squeeze(-1), target.squeeze(-1))
                if output.shape[-1] == 1
                else (output, target)
            )
        if kind == "dense_regression":
            ignore = getattr(self.loss, "ignore_value", None)
            target = target.reshape(output.shape)
            if ignore is None:
                return output.reshape(-1), target.reshape(-1)
            valid = target != ignore
            return output[valid], target[valid]
        if kind == "normals":
            output, target = (
                output.movedim(1, -1).reshape(-1, 3),
                target.movedim(1, -1).reshape(-1, 3),
            )
            valid = target.abs().sum(dim=1) > 0
            return output[valid], target[valid]
        if kind == "segmentation":
            # Class indices once for every metric of the task (``max(1).indices`` is several
            # times faster than ``argmax(1)`` on CPU for B×C×H×W logits).
            return self._drop_ignored(output.max(dim=1).indices, target.long())
        return output, target.long()

    def _drop_ignored(
        self, preds: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Leave out the labels the loss ignores (``ignore_index``), once for all the metrics."""
        ignore = getattr(self.loss, "ignore_index", None)
        if ignore is None:
            return preds, target
        valid = target != ignore
        return preds[valid], target[valid]


def plain_container(value: Any) -> Any:
    """OmegaConf containers to plain Python (the registries take plain kwargs)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return value


def _named_block(task: str, key: str, block: Any) -> tuple[str, dict[str, Any]]:
    """``{name: x, **kwargs}`` or a bare name -> ``(name, kwargs)``."""
    if isinstance(block, str):
        return block, {}
    if not isinstance(block, Mapping) or "name" not in block:
        raise ConfigError(
            f"tasks.{task}.{key} must be a name or a mapping with a 'name' key, got {block!r}"
        )
    kwargs = dict(block)
    return str(kwargs.pop("name")), kwargs


class FeatureInfoLike(Protocol):
    """What a head is built from: channels and strides of the maps it reads (a
    :class:`~lightning_mtl.models.backbone.FeatureInfo`, or a ``Backbone``)."""

    # read-only: FeatureInfo is a frozen dataclass
    @property
    def channels(self) -> Any: ...

    @property
    def reductions(self) -> Any: ...

    @property
    def pooled_dim(self) -> int: ...


def check_tasks_block(config: Any) -> dict[str, Mapping[str, Any]]:
    """The ``tasks:`` block as a plain dict, each entry checked for its keys."""
    config = plain_container(config)
    if not isinstance(config, Mapping) or not config:
        raise ConfigError("tasks is empty: declare at least one task (see configs/task/)")
    for name, raw in config.items():
        if not _TASK_NAME.match(str(name)):
            raise ConfigError(
                f"tasks.{name}: a task name must start with a letter and hold only letters, "
                "digits and '_' (it becomes part of metric keys and module names)"
            )
        if not isinstance(raw, Mapping):
            raise ConfigError(f"tasks.{name} must be a mapping with keys {sorted(TASK_KEYS)}")
        unknown = set(raw) - TASK_KEYS
        if unknown:
            raise ConfigError(
                f"tasks.{name} has unknown keys {sorted(unknown)}; accepted keys: {sorted(TASK_KEYS)}"
            )
        for required in ("head", "loss", "metrics"):
            if raw.get(required) is None:
                raise ConfigError(
                    f"tasks.{name}.{required} is missing: every task needs a head, a loss and "
                    f"metrics (accepted heads: {', '.join(HEADS.names())}; "
                    f"losses: {', '.join(LOSSES.names())})"
                )
    return dict(config)


def task_reads(config: Mapping[str, Any]) -> dict[str, str]:
    """What each task's head reads (``"maps"`` or ``"pooled"``), before any head is built: the
    architecture is built first, and may group tasks by it."""
    reads = {}
    for name, raw in check_tasks_block(config).items():
        head_name, _ = _named_block(name, "head", raw["head"])
        head_class = cast("type[Head]", HEADS.get(head_name, f"tasks.{name}.head.name"))  # classes
        reads[str(name)] = head_class.reads
    return reads


def build_tasks(
    config: Mapping[str, Any], features: FeatureInfoLike | Mapping[str, FeatureInfoLike]
) -> list[TaskSpec]:
    """Validate the ``tasks:`` block and build each task's head and loss.

    ``features``: what the heads read, one for all tasks or one per task (an architecture's
    ``feature_info(task)``).
    """
    specs = []
    for name, raw in check_tasks_block(config).items():
        info = features[name] if isinstance(features, Mapping) else features
        head_name, head_kwargs = _named_block(name, "head", raw["head"])
        head = HEADS.build(head_name, f"tasks.{name}.head.name", info, **head_kwargs)
        loss_name, loss_kwargs = _named_block(name, "loss", raw["loss"])
        loss = LOSSES.build(loss_name, f"tasks.{name}.loss.name", **loss_kwargs)
        metrics = raw["metrics"]
        if isinstance(metrics, str):
            metrics = [metrics]
        weight = raw.get("weight", 1.0)
        if not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(f"tasks.{name}.weight must be a number >= 0, got {weight!r}")
        specs.append(
            TaskSpec(
                name=str(name),
                target=str(raw.get("target", name)),
                head=head,
                loss=loss,
                metrics=metrics,
                weight=float(weight),
            )
        )
    return specs


def check_label_keys(tasks: list[TaskSpec], provided: Iterable[str]) -> None:
    """Every task's label key must be one the data provides (over all its sources)."""
    keys = set(provided)
    for task in tasks:
        if task.target not in keys:
            raise ConfigError(
                f"tasks.{task.name}.target={task.target!r} is not a label of the data; "
                f"the data module provides: {', '.join(sorted(keys))}"
            )


def check_tasks_against_batch(
    tasks: list[TaskSpec],
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, Any],
    ranges: bool = True,
) -> None:
    """Compare each head's output with the labels of a real batch; raise on any mismatch.

    Tasks whose label the batch lacks are skipped: a batch of merged data comes from one source;
    :func:`check_label_keys` checks that some source has every label. ``ranges=False`` leaves
    the class ids to the pre-flight scan, which reads many more samples than one batch.
    """
    targets = batch["targets"]
    for task in tasks:
        if task.target not in targets:
            continue
        output, target = outputs[task.name], targets[task.target]
        expected = task.head.target_shape(output[0])
        if tuple(target.shape[1:]) != expected:
            raise ConfigError(
                f"tasks.{task.name}: the {task.head.__class__.__name__} outputs "
                f"{tuple(output.shape[1:])} per sample, which needs labels of shape {expected}, "
                f"but label {task.target!r} has shape {tuple(target.shape[1:])}. Check the head's "
                "size (num_classes / num_labels / out_dim / out_channels) and the label key."
            )
        kind = task.head.metric_kind
        if ranges and kind in {"classification", "segmentation"}:
            ignore = getattr(task.loss, "ignore_index", -100)
            labels = target[target != ignore]
            if labels.numel() and int(labels.max()) >= task.head.out_features:
                raise ConfigError(
                    f"tasks.{task.name}: label {task.target!r} holds class {int(labels.max())} but "
                    f"the head has num_classes={task.head.out_features}"
                )


def check_against_batches(
    model: nn.Module,
    tasks: list[TaskSpec],
    batch: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    ranges: bool = True,
) -> None:
    """Run real batches through ``model`` (``model(images) -> {task: output}``, in eval mode)
    and compare each head's output with the labels: a wrong task config stops here.

    Several batches (one per source of merged data): each is checked for the labels it has, and
    every task's label must be in at least one of them. ``ranges``: also check class ids.
    """
    batches = [batch] if isinstance(batch, Mapping) else list(batch)
    check_label_keys(tasks, (key for one in batches for key in one["targets"]))
    was_training = model.training
    model.eval()
    try:
        for one in batches:
            with torch.no_grad():
                outputs = model(one["image"])
            check_tasks_against_batch(tasks, outputs, one, ranges)
    finally:
        model.train(was_training)
