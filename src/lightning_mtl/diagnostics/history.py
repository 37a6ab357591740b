"""A run's history as written by Lightning's CSV logger (``<run dir>/csv/metrics.csv``), read
into one series per column, and the summaries drawn from it: gradient-cosine statistics per
task pair and the mean inter-task affinity matrix. Pure functions (NumPy, no matplotlib), so
that a notebook or a report can use them without drawing anything.

The file has one row per logging call: the columns ``epoch`` and ``step`` and one column per
metric name, with empty cells where a row has no value. The reader copes with what a long or
interrupted run leaves behind:

* a step logged twice in the same column (a run resumed from a checkpoint older than its last
  logged step logs the steps in between again): the last value in the file is kept;
* a second header line in the middle of the file (logs of two processes appended into one
  file): the rows after it are read with the new header. The template's CSV logger
  (:mod:`lightning_mtl.loggers`) continues the file of a resumed run and rewrites it under one
  wider header when a new column appears (Lightning's own logger would delete it);
* a cut-off last line (a killed process): cells that are not numbers are skipped.

Task order, wherever a matrix is built: the order in which the tasks first appear in the
header(s), the per-task loss columns first (:func:`task_names`). Lightning sorts its columns by
name, so for its files this is alphabetical order.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: ``train/<this>/...`` columns that are not a task's
DIAGNOSTIC_GROUPS = frozenset({"weight", "grad_norm", "grad_cos", "affinity"})
#: the split prefixes of per-task columns
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Series:
    """One column of the history: its values by increasing step, one per step, and the epoch
    of the row each value came from (NaN where the row had no epoch)."""

    steps: np.ndarray
    values: np.ndarray
    epochs: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    def finite(self) -> Series:
        """The same series without its NaN and infinite values (a non-finite loss step)."""
        keep = np.isfinite(self.values)
        return Series(self.steps[keep], self.values[keep], self.epochs[keep])

    def at(self, step: int) -> float:
        """The value logged at ``step`` (NaN if none)."""
        index = np.searchsorted(self.steps, step)
        if index < len(self.steps) and self.steps[index] == step:
            return float(self.values[index])
        return math.nan


@dataclass(frozen=True)
class History:
    """Every column of a ``metrics.csv`` as a :class:`Series` (``epoch`` and ``step`` excepted:
    they are each series' coordinates), in the order the columns first appear."""

    path: Path
    series: Mapping[str, Series]

    @property
    def columns(self) -> list[str]:
        return list(self.series)

    def __contains__(self, column: object) -> bool:
        return column in self.series

    def __getitem__(self, column: str) -> Series:
        return self.series[column]

    def parts(self, prefix: str, count: int) -> Iterator[tuple[str, list[str]]]:
        """``(column, the names after prefix)`` for each column ``<prefix>/<a>/.../<z>`` with
        exactly ``count`` names after the prefix, in column order."""
        start = prefix.rstrip("/") + "/"
        for column in self.series:
            if column.startswith(start):
                rest = column[len(start) :].split("/")
                if len(rest) == count and all(rest):
                    yield column, rest


@dataclass(frozen=True)
class CosineStats:
    """The summary of one task pair's gradient cosines over a run: the mean, the fraction of
    measurements in conflict (cosine < 0), the minimum and the number of measurements."""

    mean: float
    conflict_fraction: float
    min: float
    count: int


# ---------------------------------------------------------------------------------- reading
def read_history(path: Path | str) -> History:
    """Read a CSV logger's ``metrics.csv`` (or ``<run dir>/csv/metrics.csv`` when ``path`` is a
    folder) into one series per column. Raises FileNotFoundError when there is no such file."""
    path = Path(path)
    if path.is_dir():
        path = path / "csv" / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no metrics file; it is written by the CSV logger (`logger=csv`, or "
            "`logger=wandb`, which keeps the CSV logger beside W&B)"
        )
    # column -> step -> (value, epoch); a later row overwrites an earlier one at the same step
    cells: dict[str, dict[int, tuple[float, float]]] = {}
    header: list[str] = []
    with path.open(newline="") as handle:
        for row in csv.reader(handle):
            if not row:
                continue
            if _is_header(row):
                header = row
                for column in header:
                    if column not in ("epoch", "step"):
                        cells.setdefault(column, {})
                continue
            record = dict(zip(header, row, strict=False))
            step = _number(record.get("step", ""))
            if step is None or not math.isfinite(step):
                continue  # no step: a cut-off line
            epoch = _number(record.get("epoch", ""))
            epoch = math.nan if epoch is None else epoch
            for column, text in record.items():
                if column in ("epoch", "step") or not text:
                    continue
                value = _number(text)
                if value is not None:
                    cells[column][int(step)] = (value, epoch)
    series = {}
    for column, by_step in cells.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        values = np.array([by_step[s][0] for s in steps], dtype=np.float64)
        epochs = np.array([by_step[s][1] for s in steps], dtype=np.float64)
        series[column] = Series(steps, values, epochs)
    return History(path, series)


def _is_header(row: list[str]) -> bool:
    """A header names a ``step`` column and holds no number (a data row holds at least its
    step)."""
    return "step" in row and all(_number(cell) is None for cell in row if cell)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------- tasks
def task_names(history: History) -> list[str]:
    """The tasks of a run: every ``<t>`` of a ``<split>/<t>/loss`` column (each task logs its
    loss), then those found only in the weight, gradient-norm, gradient-cosine and affinity
    columns, each group in column order (alphabetical for Lightning's files)."""
    names: dict[str, None] = {}
    for column in history.columns:
        parts = column.split("/")
        is_loss = len(parts) == 3 and parts[0] in SPLITS and parts[2] == "loss"
        if is_loss and parts[1] not in DIAGNOSTIC_GROUPS:
            names[parts[1]] = None
    for column in history.columns:
        parts = column.split("/")
        if parts[0] != "train" or len(parts) < 3 or parts[1] not in DIAGNOSTIC_GROUPS:
            continue
        if parts[1] in ("grad_cos", "affinity") and len(parts) == 4:
            names.update(dict.fromkeys(parts[2:]))
        elif parts[1] == "grad_norm" and len(parts) == 3:
            names[parts[2]] = None
        elif parts[1] == "weight" and len(parts) in (3, 4):
            names[parts[-1]] = None  # train/weight/<task> and train/weight/<place>/<task>
    return list(names)


def task_metrics(history: History, split: str = "val") -> dict[str, list[str]]:
    """``task -> [metric, ...]``: the ``<split>/<task>/<metric>`` columns of each task other
    than its loss, in column order (per-source columns ``<split>/<source>/<task>/<metric>`` of
    merged data sets are left out)."""
    tasks = set(task_names(history))
    found: dict[str, list[str]] = {}
    for _, (task, metric) in history.parts(split, 2):
        if task in tasks and metric != "loss":
            found.setdefault(task, []).append(metric)
    return found


# ---------------------------------------------------------------------------------- cosines
def cosine_pairs(history: History) -> dict[tuple[str, str], Series]:
    """``(a, b) -> series`` of the ``train/grad_cos/<a>/<b>`` columns (without NaN values)."""
    return {
        (a, b): history[column].finite() for column, (a, b) in history.parts("train/grad_cos", 2)
    }


def cosine_statistics(history: History) -> dict[tuple[str, str], CosineStats]:
    """Per task pair with at least one measurement: the mean cosine of the two task gradients,
    the fraction of measurements in conflict (cosine < 0), the minimum and the number of
    measurements."""
    stats = {}
    for pair, series in cosine_pairs(history).items():
        values = series.values
        if len(values):
            stats[pair] = CosineStats(
                mean=float(values.mean()),
                conflict_fraction=float((values < 0).mean()),
                min=float(values.min()),
                count=len(values),
            )
    return stats


def cosine_steps(history: History) -> list[int]:
    """The steps at which the task-gradient cosines were measured, increasing."""
    return _steps(history, "train/grad_cos")


def cosine_matrix(history: History, step: int | None = None) -> tuple[list[str], np.ndarray]:
    """The k×k task-gradient cosine matrix: averaged over all measurements (``step=None``) or
    the one measured at ``step``. The diagonal is 1 for a task measured at all, NaN where a pair
    was never measured (at that step)."""
    pairs = cosine_pairs(history)
    names = _ordered(history, pairs)
    index = {name: i for i, name in enumerate(names)}
    matrix = np.full((len(names), len(names)), np.nan)
    for (a, b), series in pairs.items():
        value = series.at(step) if step is not None else _mean(series.values)
        i, j = index[a], index[b]
        matrix[i, j] = matrix[j, i] = value
        if math.isfinite(value):
            matrix[i, i] = matrix[j, j] = 1.0
    return names, matrix


# ---------------------------------------------------------------------------------- affinity
def mean_affinity(history: History) -> tuple[list[str], np.ndarray]:
    """The k×k mean of the look-ahead affinities ``train/affinity/<i>/<j>`` over their
    measurements (row i: the task stepped on; column j: the task whose loss moved; > 0: a step
    on i lowers j's loss). Tasks in the run's order (:func:`task_names`: order of appearance in
    the columns); NaN where a pair was never measured. Empty when the run has no affinity columns."""
    pairs = {
        (i, j): history[column].finite() for column, (i, j) in history.parts("train/affinity", 2)
    }
    names = _ordered(history, pairs)
    index = {name: k for k, name in enumerate(names)}
    matrix = np.full((len(names), len(names)), np.nan)
    for (i, j), series in pairs.items():
        matrix[index[i], index[j]] = _mean(series.values)
    return names, matrix


def affinity_steps(history: History) -> list[int]:
    """The steps at which the look-ahead affinities were measured, increasing."""
    return _steps(history, "train/affinity")


def _steps(history: History, prefix: str) -> list[int]:
    steps: set[int] = set()
    for column, _ in history.parts(prefix, 2):
        steps.update(int(s) for s in history[column].finite().steps)
    return sorted(steps)


def _ordered(history: History, pairs: Mapping[tuple[str, str], object]) -> list[str]:
    """The tasks named in ``pairs``, in the run's task order (:func:`task_names`)."""
    named = {name for pair in pairs for name in pair}
    return [name for name in task_names(history) if name in named]


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else math.nan
