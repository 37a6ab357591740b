"""The results table across methods and seeds: mean ± std of every task metric, Δm against the
matching single-task baselines, mean rank and step time.

Runs are grouped into **comparisons**: the multi-task runs with the same setup (data, backbone,
optimizer, budget: :mod:`lightning_mtl.results.identity`) and the same tasks. Within one, a
**method** is the weighting (with its level when it is ``params``, and the architecture when it
is not ``hard``), and its runs are its seeds. Runs of one method label that differ in anything
else (a learning rate, a method option) are separate rows, labelled with what differs: a table
never averages two recipes as if they were seeds of one.

The **baseline** of a task is the mean of the single-task runs (one task, any weighting) of the
same setup and the same task definition. A comparison whose tasks lack a baseline gets no Δm, and
a note says which single-task runs exist and how they differ (budget, data, backbone), or the
command that makes them. Other notes: methods with different seed sets, runs of several commits.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_mtl.compare.table import higher_is_better
from lightning_mtl.results.delta_m import delta_m
from lightning_mtl.results.identity import UNSET, RunRecord, differences, differing_keys

STEP_MS = "perf/step_ms"
REFERENCE_METHOD = "equal"
SINGLE_TASK = "single-task"


@dataclass
class Summary:
    """Mean, sample standard deviation (``None`` with one value) and count of some numbers."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary | None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return None
        std = statistics.stdev(finite) if len(finite) > 1 else None
        return cls(statistics.fmean(finite), std, len(finite))

    def text(self, spec: str = "{:.4f}", std_spec: str | None = None) -> str:
        """``mean ± std`` (``std_spec``: the std's format, by default ``spec``)."""
        mean = spec.format(self.mean)
        return mean if self.std is None else f"{mean} ± {(std_spec or spec).format(self.std)}"


@dataclass
class MethodRow:
    """One method of a comparison: its runs (seeds) and their statistics."""

    label: str
    runs: list[RunRecord]
    metrics: dict[str, Summary | None] = field(default_factory=dict)
    deltas: list[float | None] = field(default_factory=list)
    delta: Summary | None = None
    rank: float | None = None
    step_ms: float | None = None
    time_ratio: float | None = None

    @property
    def seeds(self) -> list[int | None]:
        """The runs' seeds, each once (a baseline row holds one run per task and seed)."""
        return sorted({r.seed for r in self.runs}, key=lambda s: (s is None, s or 0))


@dataclass
class Comparison:
    """The multi-task runs of one setup and task set, their baselines and the notes."""

    tasks: list[str]
    setup: dict[str, Any]
    setup_hash: str
    baseline: MethodRow | None
    rows: list[MethodRow]
    columns: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        budget = ", ".join(
            f"{k.split('.')[-1]}={v}"
            for k, v in self.setup.items()
            if k.startswith("trainer.max_") or k in ("data.batch_size", "data.train_size")
        )
        return f"{', '.join(self.tasks)} (setup {self.setup_hash}; {budget})"


def build_report(
    records: Sequence[RunRecord],
    split: str = "test",
    experiment: str | None = None,
) -> list[Comparison]:
    """The comparisons of ``records`` (see the module docstring), on ``split``'s metrics.

    ``experiment``: only the multi-task runs of this ``run_name`` (baselines of any name).
    """
    latest = {r.config_hash: r for r in records}  # oldest first: the last one of a hash wins
    repeated = [r.run_dir for r in records if latest[r.config_hash] is not r]
    records = [r for r in records if latest[r.config_hash] is r]
    singles = [r for r in records if r.is_single_task]
    multis = [r for r in records if not r.is_single_task and experiment in (None, r.experiment)]
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[RunRecord]] = {}
    for record in multis:
        key = (record.setup_hash, tuple(sorted(record.task_specs.items())))
        groups.setdefault(key, []).append(record)
    comparisons = [_comparison(runs, singles, split) for runs in groups.values()]
    if repeated:  # the same recipe and seed trained twice: one result per seed, not two
        for comparison in comparisons:
            comparison.notes.append(
                f"{len(repeated)} run(s) repeat the config and seed of a later run and are left "
                f"out: {', '.join(repeated[:3])}{' ...' if len(repeated) > 3 else ''}"
            )
    return comparisons


def _comparison(runs: list[RunRecord], singles: list[RunRecord], split: str) -> Comparison:
    first = runs[0]
    comparison = Comparison(
        tasks=list(first.tasks),
        setup=first.setup,
        setup_hash=first.setup_hash,
        baseline=None,
        rows=[MethodRow(label, members) for label, members in _methods(runs).items()],
        columns=_metric_columns(runs, split),
    )
    baseline_runs = _baselines(runs, singles, comparison.notes)
    if baseline_runs:
        comparison.baseline = MethodRow(SINGLE_TASK, baseline_runs)
        comparison.baseline.metrics = {
            c: Summary.of(r.values.get(c, math.nan) for r in baseline_runs if _task(c) in r.tasks)
            for c in comparison.columns
        }
        step = [_median_step(r for r in baseline_runs if t in r.tasks) for t in first.tasks]
        if all(s is not None for s in step):  # the k single-task networks, one step of each
            comparison.baseline.step_ms = sum(s for s in step if s is not None)
    reference = {
        c: s.mean
        for c, s in (comparison.baseline.metrics.items() if comparison.baseline else [])
        if s is not None
    }
    stl = _by_task(reference)
    for task in first.tasks:
        if comparison.baseline and any(task in r.tasks for r in baseline_runs) and task not in stl:
            comparison.notes.append(
                f"the single-task runs of {task!r} have no finite {split}/ metric: no Δm"
            )
    skipped: set[str] = set()
    for row in comparison.rows:
        row.metrics = {
            c: Summary.of(r.values.get(c, math.nan) for r in row.runs) for c in comparison.columns
        }
        for run in row.runs:
            if not stl or any(c not in run.values for c in comparison.columns):
                row.deltas.append(None)  # a metric missing: not comparable with the others
                continue
            result = delta_m(
                _by_task({c: run.values[c] for c in comparison.columns}), stl, higher_is_better
            )
            row.deltas.append(result.value)
            skipped.update(f"{t}/{m}: {why}" for (t, m), why in result.skipped.items())
        row.delta = Summary.of(d for d in row.deltas if d is not None)
        row.step_ms = _median_step(row.runs)
    _rank(comparison.rows, comparison.columns)
    _time_ratios(comparison)
    _notes(comparison, runs, stl, split)
    comparison.notes += [f"left out of Δm: {line}" for line in sorted(skipped)]
    return comparison


# -------------------------------------------------------------------------------- the methods
def method_label(record: RunRecord) -> str:
    """``weighting``, ``weighting@params`` at the params level, ``…/architecture`` when not hard."""
    label = record.weighting or "?"
    if record.level == "params":
        label += "@params"
    if record.architecture != "hard":
        label += f"/{record.architecture}"
    return label


def _methods(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs by method label; a label whose runs differ in more than the seed splits by recipe,
    each part labelled with the settings that differ."""
    by_label: dict[str, list[RunRecord]] = {}
    for run in runs:
        by_label.setdefault(method_label(run), []).append(run)
    methods: dict[str, list[RunRecord]] = {}
    for label, members in by_label.items():
        recipes: dict[str, list[RunRecord]] = {}
        for run in members:
            recipes.setdefault(run.recipe_hash, []).append(run)
        if len(recipes) == 1:
            methods[label] = members
            continue
        varying = sorted(
            {
                k
                for part in recipes.values()
                for other in members
                for k in differing_keys(part[0].recipe, other.recipe)
            }
        )
        for part in recipes.values():
            shown = ", ".join(f"{k}={part[0].recipe.get(k, UNSET)}" for k in varying[:3])
            name = f"{label} ({shown})"
            if name in methods:  # they differ beyond the keys shown: tell them apart by hash
                name = f"{label} ({shown}; recipe {part[0].recipe_hash})"
            methods[name] = part
    return methods


# ------------------------------------------------------------------------------ the baselines
def _baselines(
    runs: list[RunRecord], singles: list[RunRecord], notes: list[str]
) -> list[RunRecord]:
    """The single-task runs of the comparison's setup and task definitions, one recipe per task;
    a note for each task without one (saying how the single-task runs that exist differ)."""
    first = runs[0]
    seeds = ",".join(str(s) for s in sorted({r.seed for r in runs if r.seed is not None}))
    found: list[RunRecord] = []
    for task in first.tasks:
        spec = first.task_specs[task]
        same_task = [s for s in singles if s.tasks == [task]]
        matching = [
            s for s in same_task if s.setup_hash == first.setup_hash and s.task_specs[task] == spec
        ]
        if matching:
            found += _one_recipe(task, matching, notes)
            continue
        if not same_task:
            notes.append(
                f"no single-task baseline of {task!r}: train the comparison's own command with "
                f"`task={task}` (one task per job), e.g. for the default experiment "
                f"`mtl-train -m experiment=single_task task={task} seed={seeds or '1,2'}`"
            )
            continue
        other = same_task[-1]
        why = differences(other.setup, first.setup)
        if other.setup_hash == first.setup_hash:
            why = ["the task's definition (head, loss or metrics) differs"]
        notes.append(
            f"no single-task baseline of {task!r} with this setup: {len(same_task)} single-task "
            f"run(s) of it differ (baseline vs this comparison), e.g. {'; '.join(why[:4])}"
        )
    return found


def _one_recipe(task: str, runs: list[RunRecord], notes: list[str]) -> list[RunRecord]:
    """The baseline runs of one recipe (their seeds): the plain one (``equal`` weighting on the
    ``hard`` architecture) when there is one, else the one with the most runs; a note names
    the single-task recipes left out (a weighting or an architecture changes a single task's
    training too: uncertainty weighting rescales its loss)."""
    recipes: dict[str, list[RunRecord]] = {}
    for run in runs:
        recipes.setdefault(run.recipe_hash, []).append(run)
    chosen = max(
        recipes.values(),
        key=lambda part: (
            part[0].weighting == REFERENCE_METHOD and part[0].architecture == "hard",
            len(part),
        ),
    )
    if len(recipes) > 1:
        others = [p for p in recipes.values() if p is not chosen]
        keys = sorted(
            {k for p in others for run in chosen for k in differing_keys(p[0].recipe, run.recipe)}
        )
        notes.append(
            f"baseline of {task!r}: {len(chosen)} run(s) of one recipe; {sum(map(len, others))} "
            f"single-task run(s) of other recipes left out (they differ in {', '.join(keys[:4])})"
        )
    return chosen


# -------------------------------------------------------------------------- ranks and times
def _rank(rows: list[MethodRow], columns: list[str]) -> None:
    """Each row's mean rank over the metric columns (1: best; ties share the mean rank)."""
    ranks: dict[str, list[float]] = {row.label: [] for row in rows}
    for column in columns:
        direction = higher_is_better(column)
        scored = [(summary.mean, row.label) for row in rows if (summary := row.metrics.get(column))]
        if direction is None or len(scored) < 2:
            continue
        ordered = sorted(scored, key=lambda item: -item[0] if direction else item[0])
        position = 0
        while position < len(ordered):
            end = position
            while end + 1 < len(ordered) and ordered[end + 1][0] == ordered[position][0]:
                end += 1
            shared = (position + end) / 2 + 1
            for _, label in ordered[position : end + 1]:
                ranks[label].append(shared)
            position = end + 1
    for row in rows:
        row.rank = statistics.fmean(ranks[row.label]) if ranks[row.label] else None


def _time_ratios(comparison: Comparison) -> None:
    reference = next((r for r in comparison.rows if r.label == REFERENCE_METHOD), None)
    if reference is None or reference.step_ms is None:
        comparison.notes.append(
            f"no {REFERENCE_METHOD!r} run with a step time: no step-time ratios"
        )
        return
    rows = [*comparison.rows, *([comparison.baseline] if comparison.baseline else [])]
    for row in rows:
        if row.step_ms is not None:
            row.time_ratio = row.step_ms / reference.step_ms


def _median_step(runs: Iterable[RunRecord]) -> float | None:
    times = [r.values[STEP_MS] for r in runs if math.isfinite(r.values.get(STEP_MS, math.nan))]
    return statistics.median(times) if times else None


def _notes(
    comparison: Comparison, runs: list[RunRecord], stl: dict[str, dict[str, float]], split: str
) -> None:
    seeds = {row.label: tuple(row.seeds) for row in comparison.rows}
    if len(set(seeds.values())) > 1:
        listed = "; ".join(f"{label}: {list(s)}" for label, s in seeds.items())
        comparison.notes.append(f"methods ran with different seeds ({listed})")
    commits = sorted({r.git_commit for r in runs})
    if len(commits) > 1:
        comparison.notes.append(f"runs of {len(commits)} commits: {', '.join(commits)}")
    if not comparison.columns:
        comparison.notes.append(f"no {split}/ metrics in these runs (test=false?)")
    for row in comparison.rows:
        for run, delta in zip(row.runs, row.deltas, strict=True):
            if delta is None and stl and all(stl.get(t) for t in comparison.tasks):
                comparison.notes.append(
                    f"{row.label}: no Δm for {run.run_dir} (a {split} metric missing or not finite)"
                )


def _metric_columns(runs: list[RunRecord], split: str) -> list[str]:
    """``<split>/<task>/<metric>`` of the comparison's tasks (losses left out), task order."""
    tasks = runs[0].tasks
    found = {
        c
        for r in runs
        for c in r.values
        if c.startswith(f"{split}/") and len(c.split("/")) == 3 and not c.endswith("/loss")
    }
    return sorted((c for c in found if _task(c) in tasks), key=lambda c: (tasks.index(_task(c)), c))


def _task(column: str) -> str:
    return column.split("/")[1]


def _by_task(values: dict[str, float]) -> dict[str, dict[str, float]]:
    nested: dict[str, dict[str, float]] = {}
    for column, value in values.items():
        _, task, metric = column.split("/")
        nested.setdefault(task, {})[metric] = value
    return nested
