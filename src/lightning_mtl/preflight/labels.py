"""Labels against the tasks: keys, declared class counts, and every scanned value in range.

Two levels. :func:`declared_problems` reads only what the data module declares
(``target_names``, ``num_classes``, ``num_labels``; a merged module raises a DataError when two
sources disagree) and compares it with the heads. :class:`LabelRule` then checks label values
read from the data: class ids in ``[0, num_classes)`` or the loss's ignore index, multi-label
values in {0, 1}, regression values finite, dense labels the size of their image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.preflight.report import Problem, problem_from_error
from lightning_mtl.tasks import TaskSpec

log = logging.getLogger(__name__)

CLASS_KINDS = ("classification", "segmentation")
DENSE_KINDS = ("segmentation", "dense_regression", "normals")


def _declared(datamodule: Any, attribute: str, problems: list[Problem]) -> dict[str, int]:
    """``datamodule.<attribute>`` ({} when it has none); a disagreement becomes a problem."""
    try:
        return dict(getattr(datamodule, attribute, None) or {})
    except ConfigError as error:  # a merged module: two sources disagree
        problems.append(problem_from_error("data.sources", error, "one count per label key"))
        return {}


def declared_problems(datamodule: Any, tasks: Sequence[TaskSpec]) -> list[Problem]:
    """Label keys, class counts across sources, and each head's size against the data's."""
    problems: list[Problem] = []
    provided = getattr(datamodule, "target_names", None)
    if provided is not None:
        keys = sorted(set(provided))
        for task in tasks:
            if task.target not in keys:
                problems.append(
                    Problem(
                        f"tasks.{task.name}.target",
                        f"{task.target!r} is not a label of the data",
                        f"one of the data's labels: {', '.join(keys)}",
                    )
                )
    num_classes = _declared(datamodule, "num_classes", problems)
    num_labels = _declared(datamodule, "num_labels", problems)
    for task in tasks:
        kind, size = task.head.metric_kind, task.head.out_features
        declared = num_classes.get(task.target)
        if kind in CLASS_KINDS and declared is not None:
            if size < declared:
                problems.append(
                    Problem(
                        f"tasks.{task.name}.head.num_classes",
                        f"{size}, but the data declares {declared} classes for {task.target!r}",
                        f"num_classes >= {declared}",
                    )
                )
            elif size > declared:
                log.warning(
                    "tasks.%s.head.num_classes=%d but the data declares %d classes for %r",
                    task.name,
                    size,
                    declared,
                    task.target,
                )
        declared = num_labels.get(task.target)
        if kind == "multilabel" and declared is not None and size != declared:
            problems.append(
                Problem(
                    f"tasks.{task.name}.head.num_labels",
                    f"{size}, but the data declares {declared} labels for {task.target!r}",
                    f"num_labels={declared}",
                )
            )
    return problems


@dataclass
class Finding:
    """Bad values of one task in one source and split: how many, what they are, a first sample."""

    count: int = 0
    low: float = float("inf")
    high: float = float("-inf")
    nan: bool = False
    inf: bool = False
    sample: int | None = None
    # the sample is a row of the source's label table (labelled samples only)
    table: bool = False

    def add(self, values: torch.Tensor, sample: int) -> None:
        self.count += int(values.numel())
        finite = values[torch.isfinite(values)]
        if finite.numel():
            self.low = min(self.low, float(finite.min()))
            self.high = max(self.high, float(finite.max()))
        self.nan |= bool(values.isnan().any())
        self.inf |= bool(values.isinf().any())
        if self.sample is None:
            self.sample = sample

    def values(self) -> str:
        """The bad values as text: their range, and nan / inf when there are some."""
        parts = []
        if self.low <= self.high:
            low, high = _plain(self.low), _plain(self.high)
            parts.append(low if low == high else f"{low} .. {high}")
        parts += [name for name, seen in (("nan", self.nan), ("inf", self.inf)) if seen]
        return ", ".join(parts)


@dataclass
class LabelRule:
    """What the values of one task's label must be, from its head and loss."""

    task: TaskSpec
    findings: dict[str, Finding] = field(default_factory=dict)
    shapes: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.task.head.metric_kind

    def expected(self) -> str:
        if self.kind in CLASS_KINDS:
            n = self.task.head.out_features
            ignore = getattr(self.task.loss, "ignore_index", None)
            text = f"class ids in [0, {n}) (the head's num_classes={n})"
            return text + (f" or the ignore index {ignore}" if ignore is not None else "")
        if self.kind == "multilabel":
            return "multi-label values 0 or 1"
        return "finite values (no NaN or inf)"

    def bad_mask(self, values: torch.Tensor) -> torch.Tensor:
        """True where a value of ``values`` breaks the rule (same shape as ``values``)."""
        if self.kind in CLASS_KINDS:
            ignore = getattr(self.task.loss, "ignore_index", None)
            ok = (values >= 0) & (values < self.task.head.out_features)
            if values.is_floating_point():
                ok &= values == values.round()
            if ignore is not None:
                ok |= values == ignore
        elif self.kind == "multilabel":
            ok = (values == 0) | (values == 1)
        elif values.is_floating_point():
            ok = torch.isfinite(values)
        else:
            return torch.zeros_like(values, dtype=torch.bool)
        return ~ok

    def check(self, where: str, values: torch.Tensor, sample: int) -> None:
        """One sample's label."""
        values = torch.as_tensor(values)
        bad = self.bad_mask(values)
        if bad.any():
            self.findings.setdefault(where, Finding()).add(values[bad].double(), sample)

    def check_table(self, where: str, values: torch.Tensor) -> None:
        """Every sample's label at once (``label_values``, one row per sample)."""
        values = torch.as_tensor(values)
        if values.numel() == 0:  # no sample of this split labels the task: nothing to check
            return
        rows = values.reshape(len(values), -1) if values.dim() else values.reshape(1, 1)
        bad = self.bad_mask(rows)
        if bad.any():
            first = int(bad.any(dim=1).nonzero()[0])
            self.findings.setdefault(where, Finding(table=True)).add(rows[bad].double(), first)

    def check_shape(
        self, where: str, label: torch.Tensor, image: torch.Tensor, sample: int
    ) -> None:
        """A dense label must cover its image pixel for pixel (the heads upsample to it)."""
        if self.kind in DENSE_KINDS and where not in self.shapes:
            size, label_size = tuple(image.shape[-2:]), tuple(label.shape[-2:])
            if label.dim() < 2 or label_size != size:
                self.shapes[where] = (sample, tuple(label.shape), size)

    def problems(self) -> Iterable[Problem]:
        name, target = self.task.name, self.task.target
        for where, found in self.findings.items():
            at = (
                f"row {found.sample} of its label table"
                if found.table
                else f"sample {found.sample}"
            )
            yield Problem(
                f"tasks.{name}: label {target!r} of {where}, {at}",
                f"holds {found.values()} ({found.count} bad value{'s' if found.count > 1 else ''} "
                "in the samples checked)",
                self.expected(),
                data=self.kind not in CLASS_KINDS,  # a class id past the head: the config
                sample=found.low > found.high,  # only NaN / inf: bad samples
            )
        for where, (sample, shape, size) in self.shapes.items():
            yield Problem(
                f"tasks.{name}: label {target!r} of {where}, sample {sample}",
                f"has shape {shape} but its image is {size[0]}×{size[1]}",
                f"a dense label of the image's size (H, W) = {size}",
                data=True,
            )


def _plain(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
