"""A run's figures and diagnostics report, drawn from its ``csv/metrics.csv`` alone (no W&B).

:func:`plot_run` writes into ``<run dir>/plots/``, each figure only when its columns exist:

=======================  ==================================================================
``losses.png``           per task: the training loss per step (raw, light, and a trailing
                         moving average) and the validation loss per epoch (markers at the
                         step where it was logged); a last panel for the total
                         (``train/loss``, ``val/loss``)
``metrics.png``          per task: its validation metrics per epoch, and each test value as
                         a dashed horizontal line of the same colour
``weights.png``          the loss weighting's task weights over training (one panel for
                         ``train/weight/<task>``, one per meeting place for
                         ``train/weight/<place>/<task>``)
``grad_norms.png``       each task's gradient norm at the monitored place (log scale)
``grad_cosine.png``      each pair's task-gradient cosine over training, zero line marked
``grad_conflict.png``    the cosine matrix averaged over training, then the matrices measured
                         at the chosen steps, side by side in one file
``affinity.png``         the mean look-ahead affinity (row i stepped on → column j), diverging
                         colours centred at 0, annotated
``diagnostics.md``       the cosine statistics per pair and the affinity table with the
                         suggested task groups
=======================  ==================================================================

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, without pyplot: no
display is needed, no global backend is switched and nothing has to be closed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_mtl.diagnostics.history import (
    History,
    affinity_steps,
    cosine_matrix,
    cosine_pairs,
    cosine_statistics,
    cosine_steps,
    mean_affinity,
    read_history,
    task_metrics,
    task_names,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

#: the folder of the figures, inside the run folder
PLOTS_DIR = "plots"
#: the resolution of the PNG files
DPI = 110


def plot_run(
    run_dir: Path | str,
    steps: Sequence[int] | None = None,
    *,
    metrics_csv: Path | str | None = None,
) -> list[Path]:
    """Draw a run's figures into ``<run_dir>/plots/`` and write ``plots/diagnostics.md``.

    Args:
        run_dir: the run folder (the one holding ``csv/``).
        steps: the steps of the per-step cosine matrices in ``grad_conflict.png`` (each one
            shown at the nearest measuring step); default: the first, middle and last
            measurement.
        metrics_csv: the CSV logger's file, when it is not ``<run_dir>/csv/metrics.csv``.

    Returns the PNG files written, in the order above. A figure whose columns the file lacks is
    skipped (one info line); ``diagnostics.md`` is written when the run has gradient cosines or
    affinities. Raises FileNotFoundError when there is no metrics file.
    """
    run_dir = Path(run_dir)
    source = Path(metrics_csv) if metrics_csv is not None else run_dir / "csv" / "metrics.csv"
    history = read_history(source)
    out = run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    drawers = [
        ("losses", "train/<task>/loss or val/<task>/loss", _losses),
        ("metrics", "val/<task>/<metric> or test/<task>/<metric>", _metrics),
        ("weights", "train/weight/<task>", _weights),
        ("grad_norms", "train/grad_norm/<task>", _grad_norms),
        ("grad_cosine", "train/grad_cos/<a>/<b>", _grad_cosine),
        ("grad_conflict", "train/grad_cos/<a>/<b>", lambda h: _grad_conflict(h, steps)),
        ("affinity", "train/affinity/<i>/<j>", _affinity),
    ]
    written = []
    for name, columns, draw in drawers:
        figure = draw(history)
        if figure is None:
            log.info("plots: no %s column in %s: %s.png skipped", columns, source, name)
            continue
        path = out / f"{name}.png"
        figure.savefig(path, dpi=DPI)
        written.append(path)
    report = diagnostics_markdown(history)
    if report:
        (out / "diagnostics.md").write_text(report)
    else:
        log.info("plots: no gradient cosines or affinities in %s: no diagnostics.md", source)
    return written


# ---------------------------------------------------------------------------------- the report
def diagnostics_markdown(history: History) -> str:
    """The Markdown report: the cosine statistics per task pair and the mean affinity table
    with the suggested groups; empty when the run has neither."""
    sections = []
    stats = cosine_statistics(history)
    if stats:
        lines = [
            "# Task-gradient cosines",
            "",
            f"Over {len(cosine_steps(history))} measuring steps of the gradient-conflict "
            "monitor. In conflict: cosine < 0 (a step for one task raises the other's loss, to "
            "first order).",
            "",
            "| pair | mean cosine | fraction in conflict | min | measurements |",
            "|---|---:|---:|---:|---:|",
        ]
        for (a, b), s in stats.items():
            lines.append(
                f"| {a} / {b} | {s.mean:+.3f} | {s.conflict_fraction:.2f} | {s.min:+.3f} "
                f"| {s.count} |"
            )
        sections.append("\n".join(lines) + "\n")
    names, matrix = mean_affinity(history)
    if names:
        from lightning_mtl.diagnostics.affinity import format_affinity

        sections.append(format_affinity(names, matrix, measurements=len(affinity_steps(history))))
    return "\n".join(sections)


# ---------------------------------------------------------------------------------- figures
def _losses(history: History) -> Figure | None:
    panels = []
    for task in task_names(history):
        train, val = f"train/{task}/loss", f"val/{task}/loss"
        if train in history or val in history:
            panels.append((task, train, val))
    if "train/loss" in history or "val/loss" in history:
        panels.append(("total", "train/loss", "val/loss"))
    if not panels:
        return None
    figure, axes = _grid(len(panels))
    for ax, (title, train, val) in zip(axes, panels, strict=False):
        if train in history:
            series = history[train].finite()
            window = max(1, min(50, len(series) // 10))
            raw: dict[str, Any] = {"alpha": 0.3, "lw": 0.8} if window > 1 else {}
            (line,) = ax.plot(series.steps, series.values, label="train", **raw)
            if window > 1:
                ax.plot(
                    series.steps,
                    _moving_average(series.values, window),
                    color=line.get_color(),
                    label=f"train (mean of {window})",
                )
        if val in history:
            series = history[val].finite()
            ax.plot(series.steps, series.values, "o-", color="C3", ms=4, label="val")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    return _finish(figure, "losses")


def _metrics(history: History) -> Figure | None:
    val, test = task_metrics(history, "val"), task_metrics(history, "test")
    tasks = [t for t in task_names(history) if t in val or t in test]
    if not tasks:
        return None
    figure, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks, strict=False):
        metrics = list(dict.fromkeys([*val.get(task, []), *test.get(task, [])]))
        for index, metric in enumerate(metrics):
            colour = f"C{index % 10}"
            column = f"val/{task}/{metric}"
            if column in history:
                series = history[column].finite()
                # per-epoch values: by epoch where the rows have one, else by step
                x = series.epochs if not np.isnan(series.epochs).any() else series.steps
                ax.plot(x, series.values, "o-", ms=3, color=colour, label=metric)
            column = f"test/{task}/{metric}"
            if column in history and len(history[column].finite()):
                value = float(history[column].finite().values[-1])
                ax.axhline(value, ls="--", lw=1, color=colour, label=f"{metric} (test)")
        ax.set_title(task)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    return _finish(figure, "validation metrics (dashed: test)")


def _weights(history: History) -> Figure | None:
    groups: dict[str, list[tuple[str, str]]] = {}
    for column, (task,) in history.parts("train/weight", 1):
        groups.setdefault("", []).append((task, column))
    for column, (place, task) in history.parts("train/weight", 2):
        groups.setdefault(place, []).append((task, column))
    if not groups:
        return None
    figure, axes = _grid(len(groups))
    for ax, (place, lines) in zip(axes, groups.items(), strict=False):
        for task, column in lines:
            series = history[column].finite()
            ax.plot(series.steps, series.values, lw=1, label=task)
        ax.set_title(f"at {place}" if place else "loss weights")
        ax.set_xlabel("step")
        ax.set_ylabel("weight")
        ax.legend(fontsize=7)
    return _finish(figure, "task weights")


def _grad_norms(history: History) -> Figure | None:
    lines = list(history.parts("train/grad_norm", 1))
    if not lines:
        return None
    figure, (ax,) = _grid(1, width=6.0)
    for column, (task,) in lines:
        series = history[column].finite()
        keep = series.values > 0  # a log scale shows positive values only
        ax.plot(series.steps[keep], series.values[keep], ".-", lw=1, label=task)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm")
    ax.legend(fontsize=7)
    return _finish(figure, "task-gradient norms")


def _grad_cosine(history: History) -> Figure | None:
    pairs = cosine_pairs(history)
    if not pairs:
        return None
    figure, (ax,) = _grid(1, width=6.0)
    for (a, b), series in pairs.items():
        ax.plot(series.steps, series.values, ".-", lw=1, label=f"{a} / {b}")
    ax.axhline(0.0, color="black", lw=1, ls="--")
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("cosine")
    ax.legend(fontsize=7, ncols=2)
    return _finish(figure, "task-gradient cosines (below 0: conflict)")


def _grad_conflict(history: History, steps: Sequence[int] | None) -> Figure | None:
    measured = cosine_steps(history)
    if not measured:
        return None
    shown = _chosen_steps(measured, steps)
    names, mean = cosine_matrix(history)
    panels: list[tuple[np.ndarray, str]] = [(mean, f"mean over {len(measured)} steps")]
    for step in shown:
        _, matrix = cosine_matrix(history, step)
        panels.append((matrix, f"step {step}"))
    size = 1.2 + 0.6 * len(names)
    figure = Figure(figsize=(size * len(panels) + 1.0, size + 0.6), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (matrix, title) in zip(axes, panels, strict=True):
        image = draw_conflict(ax, names, matrix, title)
    assert image is not None  # panels holds the mean matrix at least
    figure.colorbar(image, ax=list(axes), fraction=0.03)
    figure.suptitle("task-gradient cosine")
    FigureCanvasAgg(figure)
    return figure


def _affinity(history: History) -> Figure | None:
    names, matrix = mean_affinity(history)
    if not names:
        return None
    finite = matrix[np.isfinite(matrix)]
    limit = float(np.abs(finite).max()) if finite.size else 1.0
    limit = limit if limit > 0 else 1.0
    size = 1.5 + 0.8 * len(names)
    figure = Figure(figsize=(size + 1.5, size), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="RdBu", vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("j: the task whose loss moved")
    ax.set_ylabel("i: the task stepped on")
    for i in range(len(names)):
        for j in range(len(names)):
            value = matrix[i, j]
            text = "n/a" if math.isnan(value) else f"{value:+.2g}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=_ink(value, limit))
    count = len(affinity_steps(history))
    ax.set_title(
        f"look-ahead affinity Z[i → j], mean of {count} steps\n(> 0: a step on i lowers j)"
    )
    figure.colorbar(image, ax=ax, fraction=0.046)
    FigureCanvasAgg(figure)
    return figure


# ---------------------------------------------------------------------------------- cosines
def draw_conflict(ax: Axes, names: Sequence[str], cosine: Any, title: str) -> Any:
    """Draw a task-gradient cosine matrix on ``ax`` as an annotated heatmap (red: conflict,
    blue: agreement, on the fixed scale -1..1; blank where not measured). Returns the image,
    for a colour bar."""
    cosine = np.asarray(cosine, dtype=np.float64)
    image = ax.imshow(cosine, cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            value = cosine[i, j]
            text = "n/a" if math.isnan(value) else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=_ink(value, 1.0))
    ax.set_title(title)
    return image


def conflict_figure(names: list[str], cosine: Any, step: int) -> Figure:
    """A figure of one task-gradient cosine matrix (the one measured at ``step``), annotated
    with its values: what the gradient-conflict monitor logs to W&B."""
    size = 1.0 + 0.7 * len(names)
    figure = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = figure.subplots()
    image = draw_conflict(ax, names, cosine, f"task-gradient cosine, step {step}")
    figure.colorbar(image, ax=ax, fraction=0.046)
    FigureCanvasAgg(figure)
    return figure


def _chosen_steps(measured: list[int], steps: Sequence[int] | None) -> list[int]:
    """The measuring steps nearest to ``steps`` (default: the first, middle and last one),
    without repeats, in increasing order."""
    if steps is None:
        wanted = [measured[0], measured[len(measured) // 2], measured[-1]]
    else:
        wanted = list(steps)
    return sorted({_nearest(measured, s) for s in wanted})


def _nearest(measured: list[int], step: int) -> int:
    """The measuring step nearest to ``step`` (the earlier one of two equally near)."""
    return min(measured, key=lambda m: (abs(m - step), m))


# ---------------------------------------------------------------------------------- layout
def _grid(panels: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list[Axes]]:
    """A figure of ``panels`` axes, at most three a row; the unused cells hidden."""
    columns = min(3, panels)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(width * columns, height * rows + 0.4), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return figure, axes[:panels]


def _finish(figure: Figure, title: str) -> Figure:
    figure.suptitle(title)
    FigureCanvasAgg(figure)
    return figure


def _ink(value: float, limit: float) -> str:
    """White text on the dark ends of a diverging colour scale ±limit, black elsewhere."""
    return "white" if abs(value) > 0.6 * limit else "black"


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """The trailing mean of the last ``window`` values at each point (fewer at the start)."""
    if window <= 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)
