"""Chance level of every task: the best prediction that ignores the image.

For each task the statistics of the training split give a constant prediction: the majority
class (classification), each label's prevalence (multi-label), the mean value (regression), and
for dense tasks the same *per pixel* (the floor of the Shapes scenes has a fixed depth per row,
so a per-pixel mean already predicts much of the depth map). The task's own metrics then score
that constant on the evaluation split. A model that does not beat these numbers has learned
nothing from the images; the README's figures and the slow end-to-end test compare with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lightning_mtl.metrics import build_metrics
from lightning_mtl.tasks import TaskSpec


def _label_statistics(task: TaskSpec, batches: Iterable[Mapping[str, Any]]) -> torch.Tensor:
    """The constant output (one sample's output shape) that best fits the training labels."""
    kind, n = task.head.metric_kind, task.head.out_features
    total: torch.Tensor | None = None
    count = 0
    for batch in batches:
        target = batch["targets"][task.target]
        mask = batch.get("mask", {}).get(task.target)
        if mask is not None:
            target = target[mask]
        if kind in {"classification", "segmentation"}:
            # class histogram (per pixel for segmentation): one-hot along a new dim 1
            one_hot = torch.nn.functional.one_hot(target.long().clamp_min(0), n).movedim(-1, 1)
            stats = one_hot.sum(0).double()
        else:
            stats = target.double().sum(0)
        total = stats if total is None else total + stats
        count += target.shape[0]
    assert total is not None, f"no labelled sample of task {task.name!r}"
    if kind in {"classification", "segmentation"}:
        # logits that put all mass on the majority class (per pixel)
        return torch.where(total == total.max(0, keepdim=True).values, 10.0, -10.0).float()
    mean = (total / count).float()
    if kind == "multilabel":
        return torch.logit(mean.clamp(1e-4, 1 - 1e-4))
    if kind == "normals":
        return torch.nn.functional.normalize(mean, dim=0)
    return mean


def chance_metrics(
    tasks: list[TaskSpec],
    fit_batches: list[Mapping[str, Any]],
    eval_batches: list[Mapping[str, Any]],
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of the image-independent prediction of every task."""
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        constant = _label_statistics(task, fit_batches)
        metrics = build_metrics(task.name, task.head, task.metrics)
        for batch in eval_batches:
            target = batch["targets"][task.target]
            output = constant.expand(target.shape[0], *constant.shape).clone()
            metrics.update(*task.metric_inputs(output, target))
        results[task.name] = {name: float(value) for name, value in metrics.compute().items()}
    return results
