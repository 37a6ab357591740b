"""The writer registry, :data:`WRITERS`, keyed by a task's kind (its head's ``metric_kind``), its
base :class:`TaskWriter` and the writers of the image-level kinds (one CSV row per image:
classification, multilabel, regression); the dense kinds are in
:mod:`lightning_mtl.prediction.dense`. What each kind writes: :mod:`lightning_mtl.prediction`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.registry import Registry
from lightning_mtl.tasks import TaskSpec

#: the threshold of a multi-label task whose metrics name none (torchmetrics' default, so the
#: 0/1 columns agree with the task's accuracy and F1)
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Sample:
    """One predicted image: ``file`` names it in tables (its path relative to the input folder,
    or ``<source>/<split>/<index>`` for a data split), ``stem`` is ``file`` without its suffix
    (the dense outputs' file names), ``size`` its own (H, W)."""

    file: str
    size: tuple[int, int]

    @property
    def stem(self) -> str:
        path = Path(self.file)
        return str(path.with_suffix("")) if path.suffix else self.file


@dataclass
class WriterOptions:
    """What the writers take from ``predict.yaml``: class names and multi-label thresholds per
    task (both optional)."""

    class_names: Mapping[str, Sequence[str]] = field(default_factory=dict)
    thresholds: Mapping[str, float] = field(default_factory=dict)


class TaskWriter:
    """Base of the writers: ``activate`` (see :mod:`lightning_mtl.prediction`) and, per batch, ``rows``
    (table kinds) or ``write`` (dense kinds) for the samples of the batch."""

    #: whether the kind's outputs are rows of one CSV (image-level kinds) or files per image
    table = False

    def __init__(self, task: TaskSpec, folder: Path, options: WriterOptions) -> None:
        self.task, self.folder = task, folder
        self.size = task.head.out_features

    @staticmethod
    def activate(output: torch.Tensor) -> torch.Tensor:
        return output

    def names(self, options: WriterOptions, prefix: str) -> list[str]:
        """The class (label) names of ``options.class_names`` for this task, or ``0..n-1``."""
        names = options.class_names.get(self.task.name)
        if names is None:
            return [str(i) for i in range(self.size)]
        names = [str(name) for name in names]
        if len(names) != self.size:
            raise ConfigError(
                f"class_names.{self.task.name} has {len(names)} names but the task's head has "
                f"{self.size} {prefix}: give one name per {prefix[:-1]}, in index order"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"class_names.{self.task.name}={names}: the names must differ")
        return names

    # ------------------------------------------------------------------ table kinds
    def columns(self) -> list[str]:
        raise NotImplementedError

    def rows(self, samples: Sequence[Sample], output: torch.Tensor) -> list[dict[str, Any]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ dense kinds
    def write(self, sample: Sample, output: torch.Tensor) -> None:
        raise NotImplementedError


WRITERS: Registry[TaskWriter] = Registry("prediction writer")


def writer_class(task: TaskSpec) -> type[TaskWriter]:
    """The writer of ``task``'s kind (a ConfigError listing the kinds with a writer if none)."""
    kind = task.head.metric_kind
    return WRITERS.get(kind, f"tasks.{task.name}.head (kind)")  # type: ignore[return-value]


def predicted(task: TaskSpec, output: torch.Tensor) -> torch.Tensor:
    """``task``'s raw output in the form a user reads (the ``activate`` of its kind)."""
    return writer_class(task).activate(output)


def _number(value: torch.Tensor | float) -> float:
    return round(float(value), 6)


@WRITERS.register("classification")
class ClassificationWriter(TaskWriter):
    """Probabilities over exclusive classes: the most likely class and every probability."""

    table = True

    def __init__(self, task: TaskSpec, folder: Path, options: WriterOptions) -> None:
        super().__init__(task, folder, options)
        self.classes = self.names(options, "classes")

    @staticmethod
    def activate(output: torch.Tensor) -> torch.Tensor:
        return output.float().softmax(dim=-1)

    def columns(self) -> list[str]:
        return ["file", "class", *(f"prob_{name}" for name in self.classes)]

    def rows(self, samples: Sequence[Sample], output: torch.Tensor) -> list[dict[str, Any]]:
        best = output.argmax(dim=-1)
        return [
            {
                "file": sample.file,
                "class": self.classes[int(best[i])],
                **{f"prob_{n}": _number(p) for n, p in zip(self.classes, output[i], strict=True)},
            }
            for i, sample in enumerate(samples)
        ]


@WRITERS.register("multilabel")
class MultiLabelWriter(TaskWriter):
    """Independent label probabilities, and each label's 0/1 decision at the task's threshold:
    ``thresholds.<task>`` in the config, else the ``threshold`` of the task's metrics, else
    :data:`DEFAULT_THRESHOLD` (the one its accuracy and F1 use)."""

    table = True

    def __init__(self, task: TaskSpec, folder: Path, options: WriterOptions) -> None:
        super().__init__(task, folder, options)
        self.labels = self.names(options, "labels")
        threshold = options.thresholds.get(task.name, metric_threshold(task))
        if not isinstance(threshold, int | float) or not 0.0 < threshold < 1.0:
            raise ConfigError(
                f"thresholds.{task.name}={threshold!r}: expected a probability between 0 and 1"
            )
        self.threshold = float(threshold)

    @staticmethod
    def activate(output: torch.Tensor) -> torch.Tensor:
        return output.float().sigmoid()

    def columns(self) -> list[str]:
        return ["file", *(f"score_{n}" for n in self.labels), *(f"pred_{n}" for n in self.labels)]

    def rows(self, samples: Sequence[Sample], output: torch.Tensor) -> list[dict[str, Any]]:
        rows = []
        for i, sample in enumerate(samples):
            scores = output[i]
            row: dict[str, Any] = {"file": sample.file}
            row.update({f"score_{n}": _number(s) for n, s in zip(self.labels, scores, strict=True)})
            row.update(
                {
                    f"pred_{n}": int(s >= self.threshold)
                    for n, s in zip(self.labels, scores, strict=True)
                }
            )
            rows.append(row)
        return rows


def metric_threshold(task: TaskSpec) -> float:
    """The ``threshold`` among the task's metric options (``metrics: {f1: {threshold: 0.3}}``),
    else :data:`DEFAULT_THRESHOLD`."""
    metrics = task.metrics
    if isinstance(metrics, Mapping):
        for options in metrics.values():
            if isinstance(options, Mapping) and "threshold" in options:
                return float(options["threshold"])
    return DEFAULT_THRESHOLD


@WRITERS.register("regression")
class RegressionWriter(TaskWriter):
    """Real values per image: ``value``, or ``value_0..`` for a head with several outputs."""

    table = True

    def columns(self) -> list[str]:
        return ["file", *self._value_columns()]

    def _value_columns(self) -> list[str]:
        return ["value"] if self.size == 1 else [f"value_{i}" for i in range(self.size)]

    def rows(self, samples: Sequence[Sample], output: torch.Tensor) -> list[dict[str, Any]]:
        columns = self._value_columns()
        return [
            {"file": s.file, **{c: _number(v) for c, v in zip(columns, output[i], strict=True)}}
            for i, s in enumerate(samples)
        ]
