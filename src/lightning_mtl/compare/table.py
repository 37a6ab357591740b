"""The comparison table: metric directions, the best run per metric, step time against a
baseline, Markdown and CSV (see :mod:`lightning_mtl.compare`)."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_mtl.compare.runs import (
    DEFAULT_BASELINE,
    EXTRA_COLUMNS,
    FLOPS,
    PARAMS_TOTAL,
    PARAMS_TRAINABLE,
    STEP_MS,
    Run,
)

log = logging.getLogger(__name__)

STEP_RATIO = "step_time_x"
DEFAULT_NAME = "architectures"

#: Which way each metric name (the last part of ``test/<task>/<metric>``) improves: True when
#: higher is better. The CSV holds names only, so this is the one place that knows; it agrees
#: with the ``higher_is_better`` of the torchmetrics objects behind the names (tested).
HIGHER_IS_BETTER: dict[str, bool] = {
    # classification, multi-label, segmentation
    "accuracy": True,
    "balanced_accuracy": True,
    "f1": True,
    "auroc": True,
    "map": True,
    "exact_match": True,
    "miou": True,
    "pixel_accuracy": True,
    "mean_class_accuracy": True,
    # regression and dense regression
    "mae": False,
    "mse": False,
    "rmse": False,
    "r2": True,
    "abs_rel": False,
    "delta1": True,
    # surface normals
    "mean_angle": False,
    "within_11_25": True,
    "within_22_5": True,
    "within_30": True,
    "loss": False,
}


def higher_is_better(column: str) -> bool | None:
    """The direction of ``test/<task>/<metric>`` from its metric name; ``None`` if unknown."""
    return HIGHER_IS_BETTER.get(column.rsplit("/", 1)[-1])


# ----------------------------------------------------------------------------------- the table
@dataclass
class Table:
    """The comparison: ``records`` (one dict per run, the CSV's rows), the metric columns, the
    best run(s) of each metric, and the baseline of the step-time ratio."""

    records: list[dict[str, Any]]
    metrics: list[str]
    best: dict[str, list[str]]
    baseline: str | None
    notes: list[str]

    @property
    def columns(self) -> list[str]:
        return [
            "run",
            "job",
            "architecture",
            "status",
            *self.metrics,
            *EXTRA_COLUMNS.values(),
            STEP_RATIO,
            "best_at",
            "overrides",
        ]

    def missing(self) -> list[str]:
        """``"<run> (job <job>): <why>"`` for every run that is not complete."""
        return [
            f"{r['run']} (job {r['job']}): {r['status'].removeprefix('missing: ')}"
            for r in self.records
            if r["status"] != "ok"
        ]

    def markdown(self) -> str:
        """A Markdown table: a row per run and a last ``best`` row, then notes and missing jobs."""
        ratio = f"time ×{self.baseline}" if self.baseline else "time ×baseline"
        header = ["run"]
        for metric in self.metrics:
            arrow = {True: " ↑", False: " ↓", None: ""}[higher_is_better(metric)]
            header.append(metric.removeprefix("test/") + arrow)
        header += ["params (M)", "trainable (M)", "MFLOPs/image", "ms/step", ratio]
        lines = [markdown_row(header), markdown_row([":---"] + ["---:"] * (len(header) - 1))]
        for record in self.records:
            cells = [record["run"]]
            for metric in self.metrics:
                text = _number(record.get(metric), "{:.4f}")
                best = record["run"] in self.best.get(metric, [])
                cells.append(f"**{text}**" if best else text)
            cells += [
                _number(record["params_total"], "{:.2f}", 1e-6),
                _number(record["params_trainable"], "{:.2f}", 1e-6),
                _number(record["flops_per_image"], "{:.1f}", 1e-6),
                _number(record["step_ms"], "{:.1f}"),
                _number(record[STEP_RATIO], "{:.2f}"),
            ]
            lines.append(markdown_row(cells))
        best_row = ["best"] + [", ".join(self.best.get(m, [])) or "—" for m in self.metrics]
        lines.append(markdown_row(best_row + [""] * 5))
        text = "\n".join(lines) + "\n\n"
        text += (
            "Test metrics (↑ higher is better, ↓ lower is better; bold: the best of the column). "
            "ms/step: median training-step time of the last epoch (perf/step_ms).\n"
        )
        text += "".join(f"\nnote: {note}" for note in self.notes)
        text += "".join(f"\nmissing: {line}" for line in self.missing())
        return text.rstrip() + "\n"

    def write_csv(self, path: Path) -> None:
        """The records as CSV (numbers at full precision, empty where there is no value)."""
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            for record in self.records:
                writer.writerow({k: _csv_value(record.get(k)) for k in self.columns})


def build_table(
    runs: Sequence[Run], baseline: str | None = DEFAULT_BASELINE, strict: bool = False
) -> Table:
    """The comparison of ``runs`` (see :class:`Table`).

    ``baseline``: the label of the row step times are relative to. When it is not among the
    rows (or ``None``), the first row with a step time is used, and a note says so; with
    ``strict``, a baseline that is not a row is an error instead.
    """
    labels = [run.label for run in runs]
    if baseline is not None and baseline not in labels and strict:
        raise ValueError(f"baseline {baseline!r} is not a run of the sweep; runs: {labels}")
    notes: list[str] = []
    timed = [run for run in runs if math.isfinite(run.values.get(STEP_MS, math.nan))]
    reference = next((run for run in runs if run.label == baseline), None)
    if reference is None and timed:
        reference = timed[0]
        if baseline is not None:
            notes.append(
                f"no run {baseline!r}: step times are relative to {reference.label!r} instead"
            )
    reference_ms = reference.values.get(STEP_MS, math.nan) if reference else math.nan
    if reference is not None and not math.isfinite(reference_ms):
        notes.append(f"the baseline {reference.label!r} has no step time: no ratios")

    metrics = _metric_columns(runs)
    best: dict[str, list[str]] = {}
    for metric in metrics:
        direction = higher_is_better(metric)
        scored = [
            (run.values[metric], run.label)
            for run in runs
            if math.isfinite(run.values.get(metric, math.nan))
        ]
        if direction is None:
            notes.append(f"{metric}: direction unknown (not in HIGHER_IS_BETTER), no best marked")
            continue
        if not scored:
            continue
        target = (max if direction else min)(value for value, _ in scored)
        best[metric] = [label for value, label in scored if value == target]

    records = []
    for run in runs:
        record: dict[str, Any] = {
            "run": run.label,
            "job": run.job,
            "architecture": run.architecture or "",
            "status": f"missing: {run.problem}" if run.problem else "ok",
        }
        record.update({metric: run.values.get(metric) for metric in metrics})
        for column, name in EXTRA_COLUMNS.items():
            value = run.values.get(column)
            counts = column in (PARAMS_TOTAL, PARAMS_TRAINABLE, FLOPS)
            record[name] = (
                int(value) if counts and value is not None and value.is_integer() else value
            )
        step = run.values.get(STEP_MS, math.nan)
        finite = math.isfinite(step) and math.isfinite(reference_ms) and reference_ms > 0
        record[STEP_RATIO] = step / reference_ms if finite else None
        record["best_at"] = ";".join(m for m in metrics if run.label in best.get(m, []))
        record["overrides"] = " ".join(run.overrides)
        records.append(record)
    return Table(records, metrics, best, reference.label if reference else None, notes)


def read_table_csv(path: Path | str) -> list[dict[str, Any]]:
    """The records of a table written by :meth:`Table.write_csv` (numbers as floats, empty
    cells as ``None``, text as text)."""
    text_columns = {"run", "job", "architecture", "status", "best_at", "overrides"}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        {
            key: value if key in text_columns else (float(value) if value != "" else None)
            for key, value in row.items()
        }
        for row in rows
    ]


def write_table(table: Table, directory: Path, name: str = DEFAULT_NAME) -> tuple[Path, Path]:
    """Write ``<name>.md`` and ``<name>.csv`` in ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    markdown, table_csv = directory / f"{name}.md", directory / f"{name}.csv"
    markdown.write_text(table.markdown())
    table.write_csv(table_csv)
    return markdown, table_csv


def _metric_columns(runs: Iterable[Run]) -> list[str]:
    """Every test metric any run logged, grouped by task in the runs' task order."""
    order: list[str] = []
    columns: set[str] = set()
    for run in runs:
        order += [t for t in run.tasks if t not in order]
        columns.update(run.metrics)

    def key(column: str) -> tuple[int, str]:
        task = column.split("/")[-2]
        return (order.index(task) if task in order else len(order), column)

    return sorted(columns, key=key)


def _number(value: float | None, spec: str, scale: float = 1.0) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return spec.format(value * scale)


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else value


def markdown_row(cells: Sequence[str]) -> str:
    """One row of a Markdown table (`|` in a cell escaped)."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


# ------------------------------------------------------------------------------ hydra callback
