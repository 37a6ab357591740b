"""Per-task metrics: names in a task's ``metrics:`` list become torchmetrics objects.

Which names are accepted depends on the head's ``metric_kind`` (``accuracy`` means multiclass
accuracy for a classification head and per-label accuracy for a multi-label head). Two metrics
that torchmetrics does not provide are written here: the depth threshold accuracy
(δ < 1.25, Eigen et al. 2014) and the angular error of surface normals (mean and
within-threshold rates, as reported on NYUv2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics import classification as C
from torchmetrics import regression as R

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.heads import Head
from lightning_mtl.registry import unknown_name_message


class R2Score(R.R2Score):
    """torchmetrics' R² that gives NaN instead of raising over fewer than two samples: with
    merged data, a task can have a single labelled sample in a short epoch."""

    def compute(self) -> torch.Tensor:
        if int(self.total) < 2:
            return torch.tensor(float("nan"), device=self.total.device)
        return super().compute()


class ThresholdAccuracy(Metric):
    """Share of valid pixels with ``max(ŷ/y, y/ŷ) < threshold`` (δ₁ for 1.25)."""

    higher_is_better = True
    full_state_update = False

    # states (add_state in __init__), declared for the type checker
    hits: torch.Tensor
    total: torch.Tensor

    def __init__(self, threshold: float = 1.25, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        # integer counters: exact for any number of pixels, and supported on every device
        self.add_state("hits", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds = preds.float().clamp_min(1e-6)
        target = target.float().clamp_min(1e-6)
        ratio = torch.maximum(preds / target, target / preds)
        self.hits += (ratio < self.threshold).sum()
        self.total += ratio.numel()

    def compute(self) -> torch.Tensor:
        return self.hits.float() / self.total.clamp_min(1).float()


class MeanAngularError(Metric):
    """Mean angle in degrees between predicted and true normals (N×3 rows)."""

    higher_is_better = False
    full_state_update = False

    # states (add_state in __init__), declared for the type checker
    value: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("value", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def degrees(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cosine = torch.nn.functional.cosine_similarity(preds.float(), target.float(), dim=1)
        return torch.rad2deg(torch.acos(cosine.clamp(-1.0, 1.0)))

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        degrees = self.degrees(preds, target)
        self.value += degrees.sum()
        self.total += degrees.numel()

    def compute(self) -> torch.Tensor:
        return self.value.float() / self.total.clamp_min(1).float()


class AngularAccuracy(MeanAngularError):
    """Share of normals whose angle to the truth is below ``within`` degrees (11.25, 22.5, 30)."""

    higher_is_better = True

    def __init__(self, within: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.within = within

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        degrees = self.degrees(preds, target)
        self.value += (degrees < self.within).sum().float()
        self.total += degrees.numel()


def _by_kind() -> dict[str, dict[str, Callable[[Head], Metric]]]:
    """``{metric_kind: {name: factory(head, **kwargs)}}``.

    Classification metrics skip torchmetrics' per-update argument validation (a ``unique`` over
    every label, each step): the labels are checked against the heads once before training.
    """

    def n(head: Head) -> int:
        return head.out_features

    return {
        "classification": {
            "accuracy": lambda h, **kw: C.MulticlassAccuracy(n(h), average="micro", **_fast(kw)),
            "balanced_accuracy": lambda h, **kw: C.MulticlassAccuracy(
                n(h), average="macro", **_fast(kw)
            ),
            "f1": lambda h, **kw: C.MulticlassF1Score(n(h), average="macro", **_fast(kw)),
            "auroc": lambda h, **kw: C.MulticlassAUROC(n(h), **_fast(kw)),
        },
        "multilabel": {
            "accuracy": lambda h, **kw: C.MultilabelAccuracy(n(h), **_fast(kw)),
            "f1": lambda h, **kw: C.MultilabelF1Score(n(h), average="macro", **_fast(kw)),
            "map": lambda h, **kw: C.MultilabelAveragePrecision(n(h), average="macro", **_fast(kw)),
            "exact_match": lambda h, **kw: C.MultilabelExactMatch(n(h), **_fast(kw)),
        },
        "regression": {
            "mae": lambda h, **kw: R.MeanAbsoluteError(**kw),
            "mse": lambda h, **kw: R.MeanSquaredError(**kw),
            "rmse": lambda h, **kw: R.MeanSquaredError(squared=False, **kw),
            "r2": lambda h, **kw: R2Score(**kw),
        },
        "segmentation": {
            "miou": lambda h, **kw: C.MulticlassJaccardIndex(n(h), average="macro", **_fast(kw)),
            "pixel_accuracy": lambda h, **kw: C.MulticlassAccuracy(
                n(h), average="micro", **_fast(kw)
            ),
            "mean_class_accuracy": lambda h, **kw: C.MulticlassAccuracy(
                n(h), average="macro", **_fast(kw)
            ),
        },
        "dense_regression": {
            "mae": lambda h, **kw: R.MeanAbsoluteError(**kw),
            "rmse": lambda h, **kw: R.MeanSquaredError(squared=False, **kw),
            "abs_rel": lambda h, **kw: R.MeanAbsolutePercentageError(**kw),
            "delta1": lambda h, **kw: ThresholdAccuracy(1.25, **kw),
        },
        "normals": {
            "mean_angle": lambda h, **kw: MeanAngularError(**kw),
            "within_11_25": lambda h, **kw: AngularAccuracy(11.25, **kw),
            "within_22_5": lambda h, **kw: AngularAccuracy(22.5, **kw),
            "within_30": lambda h, **kw: AngularAccuracy(30.0, **kw),
        },
    }


def _fast(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"validate_args": False, **kwargs}


METRICS = _by_kind()


def accepted_metrics(kind: str) -> list[str]:
    return sorted(METRICS[kind])


def build_metrics(
    task: str, head: Head, spec: list[str] | Mapping[str, Mapping[str, Any] | None]
) -> MetricCollection:
    """A ``MetricCollection`` of the names in ``spec`` (a list, or a mapping name -> kwargs)."""
    kind = head.metric_kind
    items = spec.items() if isinstance(spec, Mapping) else ((name, None) for name in spec)
    metrics: dict[str, Metric | MetricCollection] = {}
    for name, kwargs in items:
        if name not in METRICS[kind]:
            raise ConfigError(
                unknown_name_message(
                    f"tasks.{task}.metrics",
                    name,
                    f"metric for a {kind} head",
                    accepted_metrics(kind),
                )
            )
        try:
            metrics[name] = METRICS[kind][name](head, **dict(kwargs or {}))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"tasks.{task}.metrics.{name}: {err}") from err
    if not metrics:
        raise ConfigError(
            f"tasks.{task}.metrics is empty; give at least one of {', '.join(accepted_metrics(kind))}"
        )
    return MetricCollection(metrics)
