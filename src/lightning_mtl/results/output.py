"""The results table as text: Markdown (printed, ``results.md``) and CSV (``results.csv``), from
the comparisons of :mod:`lightning_mtl.results.report`."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_mtl.compare.table import higher_is_better, markdown_row
from lightning_mtl.results.report import REFERENCE_METHOD, Comparison, Summary


def markdown(comparisons: Sequence[Comparison], metrics: Sequence[str] | None = None) -> str:
    """Every comparison as a Markdown table (``metrics``: only these ``task/metric`` columns)."""
    parts = []
    for comparison in comparisons:
        columns = _shown(comparison.columns, metrics)
        header = ["method", "seeds", "Δm % ↓", "mean rank"]
        header += [_column_title(c) for c in columns] + ["ms/step", f"time ×{REFERENCE_METHOD}"]
        lines = [markdown_row(header), markdown_row([":---"] + ["---:"] * (len(header) - 1))]
        rows = [*([comparison.baseline] if comparison.baseline else []), *comparison.rows]
        for row in rows:
            is_baseline = row is comparison.baseline
            delta = "0 (reference)" if is_baseline else _text(row.delta, "{:+.2f}", "{:.2f}")
            cells = [row.label, ",".join(str(s) for s in row.seeds), delta]
            cells.append("—" if row.rank is None else f"{row.rank:.2f}")
            cells += [_text(row.metrics.get(c)) for c in columns]
            cells.append("—" if row.step_ms is None else f"{row.step_ms:.0f}")
            cells.append("—" if row.time_ratio is None else f"{row.time_ratio:.2f}")
            lines.append(markdown_row(cells))
        text = f"### {comparison.title}\n\n" + "\n".join(lines) + "\n\n"
        text += (
            "Δm: mean over every task metric of the signed relative change against the "
            "single-task baselines, in % (negative: better than single-task), mean ± std over "
            "seeds; mean rank over the metric columns; ms/step: median training-step time "
            f"(single-task: the sum of its {len(comparison.tasks)} networks' steps).\n"
        )
        text += "".join(f"\nnote: {note}" for note in comparison.notes)
        parts.append(text.rstrip() + "\n")
    return "\n".join(parts) if parts else "No multi-task run among the recorded runs.\n"


def write_csv(comparisons: Sequence[Comparison], path: Path) -> None:
    """One row per method (and baseline) of every comparison, full precision."""
    columns = sorted({c for comparison in comparisons for c in comparison.columns})
    header = [
        "setup",
        "tasks",
        "method",
        "runs",
        "seeds",
        "delta_m",
        "delta_m_std",
        "delta_m_per_run",
        "mean_rank",
        "step_ms",
        "time_ratio",
    ]
    header += [f"{c}{suffix}" for c in columns for suffix in ("", "_std")]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for comparison in comparisons:
            rows = [*([comparison.baseline] if comparison.baseline else []), *comparison.rows]
            for row in rows:
                delta = row.delta
                cells: list[Any] = [
                    comparison.setup_hash,
                    ";".join(comparison.tasks),
                    row.label,
                    len(row.runs),
                    ";".join(str(s) for s in row.seeds),
                    0.0 if row is comparison.baseline else _value(delta.mean if delta else None),
                    _value(delta.std if delta else None),
                    ";".join("" if d is None else repr(d) for d in row.deltas),
                    _value(row.rank),
                    _value(row.step_ms),
                    _value(row.time_ratio),
                ]
                for column in columns:
                    summary = row.metrics.get(column)
                    if summary is None:
                        cells += [_value(None), _value(None)]
                    else:
                        cells += [_value(summary.mean), _value(summary.std)]
                writer.writerow(cells)


def _shown(columns: list[str], metrics: Sequence[str] | None) -> list[str]:
    if not metrics:
        return columns
    wanted = [m.strip("/") for m in metrics]
    return [c for c in columns if c.split("/", 1)[1] in wanted]


def _column_title(column: str) -> str:
    arrow = {True: " ↑", False: " ↓", None: ""}[higher_is_better(column)]
    return column.split("/", 1)[1] + arrow


def _text(summary: Summary | None, spec: str = "{:.4f}", std_spec: str | None = None) -> str:
    return "—" if summary is None else summary.text(spec, std_spec)


def _value(value: float | None) -> Any:
    return "" if value is None else repr(float(value))
