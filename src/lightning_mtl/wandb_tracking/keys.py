"""The W&B names of the template's metric keys: a panel section per task, sections of their own
for the task weights, gradient measurements and affinities, and the rows of the test table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: the splits whose keys start with the split; val and test ones are drawn against the epoch
SPLITS = ("train", "val", "test")
EPOCH_SPLITS = ("val", "test")
#: ``train/<what>/...`` keys that belong to a section of their own rather than to a task
TRAIN_SECTIONS = {
    "weight": "weights",
    "grad_norm": "gradients/norm",
    "grad_cos": "gradients/cos",
    "grad_conflict": "gradients/conflict",
    "affinity": "affinity",
}
WEIGHT_PREFIX = "train/weight/"
WEIGHT_CHART = "all_tasks"
TEST_TABLE = "test/metrics"


def wandb_key(key: str, tasks: Iterable[str] | None) -> str:
    """The W&B name of a metric key: each task's keys first under the task's name, the task
    weights, gradient measurements and affinities in sections of their own; others unchanged.

    ============================================  ========================================
    key (CSV, callback_metrics)                   W&B
    ============================================  ========================================
    ``train|val|test/<task>/<metric>``            ``<task>/train|val|test/<metric>``
    ``val|test/<source>/<task>/<metric>``         ``<task>/val|test/<source>/<metric>``
    ``train/weight/<task>``                       ``weights/<task>``
    ``train/weight/<place>/<task>``               ``weights/<place>/<task>``
    ``train/grad_norm/<task>``                    ``gradients/norm/<task>``
    ``train/grad_cos/<a>/<b>``                    ``gradients/cos/<a>/<b>``
    ``train/grad_conflict`` (the heatmap)         ``gradients/conflict``
    ``train/affinity/<a>/<b>``                    ``affinity/<a>/<b>``
    ``train|val|test/loss``, ``perf/...``, ...    unchanged
    ============================================  ========================================

    A metric name never holds a ``/`` (torchmetrics' names), so the number of parts tells a
    task's key (3) from a source's (4), also where sources and tasks share names (Office-31).
    ``tasks=None``: any name in a task's place counts as a task.
    """
    parts = key.split("/")
    split = parts[0]
    if split not in SPLITS or len(parts) < 2:
        return key
    known = set(tasks) if tasks is not None else None

    def is_task(name: str) -> bool:
        return name not in TRAIN_SECTIONS and (known is None or name in known)

    if split == "train" and parts[1] in TRAIN_SECTIONS:
        return "/".join([TRAIN_SECTIONS[parts[1]], *parts[2:]])
    if len(parts) == 3 and is_task(parts[1]):
        return f"{parts[1]}/{split}/{parts[2]}"
    if len(parts) == 4 and split in EPOCH_SPLITS and is_task(parts[2]):
        return f"{parts[2]}/{split}/{parts[1]}/{parts[3]}"
    return key


def metrics_table_rows(values: Mapping[str, float], tasks: Iterable[str] | None) -> list[list[Any]]:
    """The rows ``[task, source, metric, value]`` of the test-metrics table (source ``all``:
    every test sample that labels the task), sorted; totals (``test/loss``) left out."""
    known = set(tasks) if tasks is not None else None
    rows = []
    for key, value in values.items():
        parts = key.split("/")
        if parts[0] != "test":
            continue
        if len(parts) == 3 and (known is None or parts[1] in known):
            rows.append([parts[1], "all", parts[2], float(value)])
        elif len(parts) == 4 and (known is None or parts[2] in known):
            rows.append([parts[2], parts[1], parts[3], float(value)])
    return sorted(rows, key=lambda row: (row[0], row[1] != "all", row[1], row[2]))
