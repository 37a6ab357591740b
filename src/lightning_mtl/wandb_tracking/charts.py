"""The charts of a whole run: the task weights' history (bounded, kept in the checkpoints so that
a resumed run's chart starts at step 0) drawn as line charts, and the test metrics as a table."""

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
