"""The charts of a whole run: the task weights' history (bounded, kept in the checkpoints so that
a resumed run's chart starts at step 0) drawn as line charts, and the test metrics as a table.
:class:`RunCharts` gathers both from the logged metrics; the logger draws them at the end of a
stage."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from lightning_mtl.wandb_tracking.keys import WEIGHT_CHART, WEIGHT_PREFIX, metrics_table_rows

#: the most points per task kept for the weight chart (older points are thinned, evenly)
MAX_CHART_POINTS = 1000
#: the most rows of one chart's table (W&B's limit for a logged table)
MAX_CHART_ROWS = 10_000


class SeriesHistory:
    """The (step, value) points of one logged series, at most ``limit`` of them: past that,
    every second point is dropped and only every second new point kept (an even thinning that
    keeps the first point and memory bounded over any length of run)."""

    def __init__(self, limit: int = MAX_CHART_POINTS) -> None:
        self.limit = max(2, limit)
        self.steps: list[int] = []
        self.values: list[float] = []
        self.stride = 1
        self._seen = 0

    def add(self, step: int, value: float) -> None:
        self._seen += 1
        if (self._seen - 1) % self.stride:
            return
        self.steps.append(int(step))
        self.values.append(float(value))
        if len(self.steps) > self.limit:
            self.steps, self.values = self.steps[::2], self.values[::2]
            self.stride *= 2

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of it (plain lists and numbers: a weights-only load)."""
        return {
            "steps": list(self.steps),
            "values": list(self.values),
            "stride": self.stride,
            "seen": self._seen,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], limit: int = MAX_CHART_POINTS) -> SeriesHistory:
        history = cls(limit)
        history.steps = [int(s) for s in state.get("steps", [])]
        history.values = [float(v) for v in state.get("values", [])]
        history.stride = int(state.get("stride", 1))
        history._seen = int(state.get("seen", len(history.steps)))
        return history


def weight_charts(weights: Mapping[str, SeriesHistory]) -> Iterator[tuple[str, Any]]:
    """The task weights' line charts, each with its W&B name: ``weights/all_tasks`` with all
    tasks in it (and ``weights/<place>/all_tasks`` for a method that weighs each meeting
    place), each task thinned evenly to fit W&B's table limit."""
    import wandb

    groups: dict[str, dict[str, SeriesHistory]] = {}
    for key, history in weights.items():
        place, _, task = key.removeprefix(WEIGHT_PREFIX).rpartition("/")
        groups.setdefault(place, {})[task] = history
    for place, series in groups.items():
        keep = max(2, MAX_CHART_ROWS // max(1, len(series)))
        xs, ys = [], []
        for history in series.values():
            stride = -(-len(history.steps) // keep)  # ceil: at most `keep` points
            xs.append(history.steps[::stride])
            ys.append(history.values[::stride])
        title = "Task weights" + (f" at {place}" if place else "")
        chart = wandb.plot.line_series(
            xs=xs, ys=ys, keys=list(series), title=title, xname="trainer/global_step"
        )
        yield "/".join(p for p in ("weights", place, WEIGHT_CHART) if p), chart


def metrics_table(values: Mapping[str, float], tasks: Iterable[str] | None) -> Any | None:
    """The test metrics as a W&B Table with the columns task, source (``all``, or a source of
    merged data), metric and value (:func:`metrics_table_rows`); None when there are none."""
    import wandb

    rows = metrics_table_rows(values, tasks)
    if not rows:
        return None
    return wandb.Table(columns=["task", "source", "metric", "value"], data=rows)


class RunCharts:
    """What the charts of a run are drawn from, gathered from the logged metrics: each task
    weight's history (``train/weight/...``, kept in checkpoints) and the latest test values.

    Each drawing returns only what is new: the weight charts when weights came since they were
    last drawn, the test table when test values came since the last table."""

    def __init__(self) -> None:
        self.weights: dict[str, SeriesHistory] = {}
        self._weights_stale = False  # weights came since the charts were last drawn
        self.test_values: dict[str, float] = {}
        self._test_stale = False

    def observe(self, metrics: Mapping[str, Any], step: int | None) -> None:
        """Keep the task weights (for the charts) and the test values (for the table)."""
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if key.startswith(WEIGHT_PREFIX) and step is not None:
                self.weights.setdefault(key, SeriesHistory()).add(step, number)
                self._weights_stale = True
            elif key.startswith("test/"):
                self.test_values[key] = number
                self._test_stale = True

    def new_weight_charts(self) -> list[tuple[str, Any]]:
        """The weight charts (:func:`weight_charts`) if weights came since the last drawing
        (call :meth:`weights_drawn` once they are logged: a failed drawing is tried again)."""
        if not self.weights or not self._weights_stale:
            return []
        return list(weight_charts(self.weights))

    def weights_drawn(self) -> None:
        self._weights_stale = False

    def new_test_table(self, tasks: Iterable[str] | None) -> Any | None:
        """The test table (:func:`metrics_table`) if test values came since the last one."""
        if not self._test_stale:
            return None
        self._test_stale = False
        return metrics_table(self.test_values, tasks)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the weights' history."""
        return {key: history.state() for key, history in self.weights.items()}

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Take a checkpoint's weights' history when resuming (not when this process has its
        own history already: a test reading the best checkpoint after fitting)."""
        if self.weights:
            return
        self.weights = {key: SeriesHistory.from_state(s) for key, s in saved.items()}
        self._weights_stale = bool(self.weights)  # not drawn by this process yet
