"""The scan over the data: files readable, label values in range, dense labels the right size.

For each source and split it uses what the dataset offers cheaply, and reads samples only for
the rest:

* ``verify(index)`` (a source's cheap readability and size check of one sample's files, raising
  a DataError that names the file): every index in ``exhaustive`` mode, up to ``max_files``
  evenly spaced ones per split and source in ``fast`` mode (all of them on data of up to
  ``max_files`` samples; a bad file beyond them is met by ``data.on_bad_sample`` in training);
* ``label_values(key)`` (every value of a label from the source's label table, or None): the
  whole table is checked against the task's head;
* ``dataset[i]`` otherwise: ``max_samples`` evenly spaced samples per split and source
  (``fast``), or every sample (``exhaustive``), whose labels are checked and whose dense labels
  are compared with their image's size. A source without ``verify`` is also read this way, so
  that its files are opened at least once before training.

A progress bar (tqdm, on rank 0) follows the files and samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from tqdm import tqdm

from lightning_mtl.errors import ConfigError
from lightning_mtl.preflight.labels import LabelRule
from lightning_mtl.preflight.report import Problem, problem_from_error
from lightning_mtl.preflight.sources import SplitSource
from lightning_mtl.tasks import TaskSpec

MODES = ("fast", "exhaustive", "skip")


@dataclass(frozen=True)
class PreflightOptions:
    """``preflight:`` in the config: ``mode`` (fast | exhaustive | skip), ``max_samples`` read
    and ``max_files`` verified per split and source in fast mode, ``progress`` (a progress
    bar)."""

    mode: str = "fast"
    max_samples: int = 256
    max_files: int = 20000
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: DictConfig | None) -> PreflightOptions:
        block = dict(cfg.get("preflight") or {}) if cfg is not None else {}
        unknown = sorted(set(block) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(
                f"preflight has unknown keys {unknown}; accepted: mode, max_samples, max_files, "
                "progress"
            )
        return cls(**block)


@dataclass
class ScanStats:
    """What the scan did, for the log line that closes it."""

    files_verified: int = 0
    samples_read: int = 0
    tables_read: int = 0
    seconds: float = 0.0


@dataclass
class _Plan:
    """One source and split: the indices to verify and to read, the rules read from samples."""

    part: SplitSource
    verify: Callable[[int], Any] | None
    verify_indices: Sequence[int]
    read_indices: Sequence[int]
    rules: list[LabelRule]
    failed: set[int] = field(default_factory=set)


def sample_indices(length: int, limit: int | None) -> list[int]:
    """Every index (``limit`` None or >= length), else ``limit`` evenly spaced ones."""
    if limit is None or length <= limit:
        return list(range(length))
    if limit == 1:
        return [0]
    return sorted({round(i * (length - 1) / (limit - 1)) for i in range(limit)})


def scan_data(
    parts: Sequence[SplitSource], tasks: Sequence[TaskSpec], options: PreflightOptions
) -> tuple[list[Problem], ScanStats]:
    """Scan every source and split; all problems found, and what was read."""
    start = time.perf_counter()
    stats = ScanStats()
    problems: list[Problem] = []
    rules = [LabelRule(task) for task in tasks]
    plans = [_plan(part, rules, options, problems, stats) for part in parts]
    total = sum(len(p.verify_indices) + len(p.read_indices) for p in plans)
    # Lightning sets ``rank`` on the function (this process's global rank)
    show = options.progress and rank_zero_only.rank == 0 and total > 0  # type: ignore[attr-defined]
    with tqdm(total=total, desc="pre-flight", unit="sample", disable=not show, leave=False) as bar:
        for plan in plans:
            _run(plan, problems, stats, bar)
    for rule in rules:
        problems.extend(rule.problems())
    stats.seconds = time.perf_counter() - start
    return problems, stats


def _plan(
    part: SplitSource,
    rules: list[LabelRule],
    options: PreflightOptions,
    problems: list[Problem],
    stats: ScanStats,
) -> _Plan:
    """Check the label tables the source offers; decide what to verify and what to read."""
    try:
        keys = set(part.label_keys())
        length = len(part.dataset)  # type: ignore[arg-type]
    except Exception as error:  # any failure of a source is reported, not raised
        problems.append(problem_from_error(part.where, error, "a readable dataset"))
        return _Plan(part, None, [], [], [])
    here = [r for r in rules if r.task.target in keys]
    label_values = getattr(part.dataset, "label_values", None)
    to_read = []
    for rule in here:
        values = None
        if callable(label_values):
            try:
                values = label_values(part.raw_key(rule.task.target))
            except Exception as error:
                problems.append(problem_from_error(part.where, error, "a readable label table"))
                continue
        if values is None:
            to_read.append(rule)
        else:
            rule.check_table(part.where, values)
            stats.tables_read += 1
    verify = getattr(part.dataset, "verify", None)
    verify = verify if callable(verify) else None
    exhaustive = options.mode == "exhaustive"
    read = exhaustive or to_read or verify is None
    limit = None if exhaustive else options.max_samples
    return _Plan(
        part,
        verify,
        sample_indices(length, limit and options.max_files) if verify is not None else [],
        sample_indices(length, limit) if read else [],
        to_read,
    )


def _run(plan: _Plan, problems: list[Problem], stats: ScanStats, bar: tqdm) -> None:
    part = plan.part
    for index in plan.verify_indices:
        try:
            plan.verify(index)  # type: ignore[misc]
        except Exception as error:
            plan.failed.add(index)
            where = f"{part.where}, sample {index}"
            expected = "a readable file of the declared size"
            problems.append(problem_from_error(where, error, expected, sample=True))
        stats.files_verified += 1
        bar.update()
    for index in plan.read_indices:
        bar.update()
        if index in plan.failed:
            continue
        try:
            item = part.dataset[index]
        except Exception as error:
            where = f"{part.where}, sample {index}"
            problems.append(problem_from_error(where, error, "a readable sample", sample=True))
            continue
        stats.samples_read += 1
        targets, present = item["targets"], item.get("mask", {})
        for rule in plan.rules:
            key = part.raw_key(rule.task.target)
            if key not in targets or not bool(present.get(key, True)):
                continue
            rule.check(part.where, targets[key], index)
            rule.check_shape(part.where, targets[key], item["image"], index)
