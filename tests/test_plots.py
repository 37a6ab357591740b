"""The run's figures and diagnostics from ``csv/metrics.csv``: the reader (a resumed run's file
included), the cosine and affinity summaries against hand-computed values, every figure and the
report on a synthetic run, and a short CSV-only training that leaves its plots behind."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from matplotlib.image import imread
from omegaconf import DictConfig

from lightning_mtl.diagnostics.history import (
    cosine_matrix,
    cosine_statistics,
    mean_affinity,
    read_history,
    task_metrics,
    task_names,
)
from lightning_mtl.diagnostics.plots import plot_run

TASKS = ["count", "depth", "segmentation"]
COSINE_STEPS = [0, 4, 8, 12]
# per pair, the cosines at COSINE_STEPS: count/depth conflicts in 3 of 4 measurements
COSINES = {
    ("count", "depth"): [0.5, -0.25, -0.5, -0.75],  # mean -0.25, in conflict 0.75, min -0.75
    ("count", "segmentation"): [0.5, 0.25, 0.25, 0.0],  # mean 0.25; 0 is no conflict
    ("depth", "segmentation"): [1.0, 0.5, 0.5, 0.0],  # mean 0.5
}
# the affinity at steps 0 and 8; None: not logged at that step; segmentation → count never
AFFINITY = {
    0: [[0.5, 0.25, -0.125], [0.125, 0.5, 0.0], [None, -0.25, 0.75]],
    8: [[0.25, None, -0.375], [0.375, 0.25, 0.5], [None, -0.5, 0.25]],
}
MEAN_AFFINITY = [[0.375, 0.25, -0.25], [0.25, 0.375, 0.25], [math.nan, -0.375, 0.5]]


def write_metrics(path: Path, rows: list[dict[str, float]]) -> Path:
    """``rows`` as Lightning's CSV logger writes them: columns sorted, empty cells."""
    columns = sorted({key for row in rows for key in row})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def synthetic_rows() -> list[dict[str, float]]:
    """Two epochs of 8 steps of a 3-task run with every column the figures draw."""
    rows: list[dict[str, float]] = []
    for step in range(16):
        epoch = step // 8
        row: dict[str, float] = {"epoch": epoch, "step": step, "train/loss": 3.0 - 0.1 * step}
        for k, task in enumerate(TASKS):
            row[f"train/{task}/loss"] = 1.0 - 0.05 * step + 0.01 * k
            row[f"train/weight/{task}"] = 1.0 + 0.1 * k * step / 16
        rows.append(row)
        if step in COSINE_STEPS:
            m = COSINE_STEPS.index(step)
            cos = {f"train/grad_cos/{a}/{b}": v[m] for (a, b), v in COSINES.items()}
            norms = {f"train/grad_norm/{t}": 2.0 ** (k - m) for k, t in enumerate(TASKS)}
            rows.append({"step": step, **cos, **norms})
        if step in AFFINITY:
            values = {
                f"train/affinity/{a}/{b}": AFFINITY[step][i][j]
                for i, a in enumerate(TASKS)
                for j, b in enumerate(TASKS)
                if AFFINITY[step][i][j] is not None
            }
            rows.append({"step": step, **values})
        if step % 8 == 7:  # the epoch's validation, at the epoch's last step
            val = {"epoch": epoch, "step": step, "val/loss": 2.0 - epoch}
            for task in TASKS:
                val[f"val/{task}/loss"] = 0.7 - 0.1 * epoch
            val["val/segmentation/miou"] = 0.25 + 0.25 * epoch
            val["val/segmentation/pixel_accuracy"] = 0.5 + 0.125 * epoch
            val["val/depth/abs_rel"] = 0.5 - 0.125 * epoch
            val["val/count/mae"] = 1.5 - 0.5 * epoch
            rows.append(val)
    rows.append({"epoch": 2, "step": 16, "test/segmentation/miou": 0.625, "test/count/mae": 0.75})
    return rows


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    write_metrics(tmp_path / "run" / "csv" / "metrics.csv", synthetic_rows())
    return tmp_path / "run"


def test_reader_and_task_names(run_dir: Path) -> None:
    history = read_history(run_dir)  # the run folder: its csv/metrics.csv
    assert task_names(history) == TASKS
    assert task_metrics(history) == {
        "count": ["mae"],
        "depth": ["abs_rel"],
        "segmentation": ["miou", "pixel_accuracy"],
    }
    val = history["val/segmentation/miou"]
    assert val.steps.tolist() == [7, 15] and val.epochs.tolist() == [0, 1]
    assert len(history["train/count/loss"]) == 16
    assert history["train/grad_cos/count/depth"].steps.tolist() == COSINE_STEPS


def test_cosine_statistics_are_exact(run_dir: Path) -> None:
    stats = cosine_statistics(read_history(run_dir))
    assert list(stats) == list(COSINES)
    conflict = stats["count", "depth"]
    assert conflict.mean == -0.25 and conflict.conflict_fraction == 0.75
    assert conflict.min == -0.75 and conflict.count == 4
    assert stats["count", "segmentation"].mean == 0.25
    assert stats["count", "segmentation"].conflict_fraction == 0.0  # a zero cosine: no conflict
    assert stats["depth", "segmentation"].mean == 0.5
    names, mean = cosine_matrix(read_history(run_dir))
    assert names == TASKS
    np.testing.assert_array_equal(mean, [[1, -0.25, 0.25], [-0.25, 1, 0.5], [0.25, 0.5, 1]])
    _, last = cosine_matrix(read_history(run_dir), step=12)
    assert last[0, 1] == last[1, 0] == -0.75


def test_mean_affinity_is_exact(run_dir: Path) -> None:
    names, matrix = mean_affinity(read_history(run_dir))
    assert names == TASKS
    np.testing.assert_array_equal(matrix, MEAN_AFFINITY)  # NaN where never measured


def test_plot_run_writes_every_figure_and_the_report(run_dir: Path) -> None:
    written = plot_run(run_dir, steps=[5])
    names = [p.name for p in written]
    assert names == [
        "losses.png",
        "metrics.png",
        "weights.png",
        "grad_norms.png",
        "grad_cosine.png",
        "grad_conflict.png",
        "affinity.png",
    ]
    for path in written:
        assert path.parent == run_dir / "plots" and path.stat().st_size > 0
        image = imread(path)  # a valid PNG
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    report = (run_dir / "plots" / "diagnostics.md").read_text()
    assert "| count / depth | -0.250 | 0.75 | -0.750 | 4 |" in report
    assert "| depth / segmentation | +0.500 | 0.00 | +0.000 | 4 |" in report
    assert "0.375" in report and "-0.375" in report and "n/a" in report  # affinity table
    assert "2 groups" in report  # the grouping suggestion


def test_missing_columns_skip_figures(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"epoch": 0, "step": s, "train/loss": 1.0, "train/a/loss": 1.0} for s in range(3)]
    write_metrics(tmp_path / "csv" / "metrics.csv", rows)
    with caplog.at_level(logging.INFO, logger="lightning_mtl.diagnostics.plots"):
        written = plot_run(tmp_path)
    assert [p.name for p in written] == ["losses.png"]
    assert not (tmp_path / "plots" / "diagnostics.md").exists()
    assert "grad_conflict.png skipped" in caplog.text


def test_no_metrics_file_names_the_path_and_the_logger(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.csv.*logger=csv"):
        plot_run(tmp_path)


def test_resumed_run_layout_keeps_the_last_value(tmp_path: Path) -> None:
    """Steps 2 and 3 logged again after a resume, under a second header with a new column; a
    cut-off last line."""
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train/loss\n"
        "0,0,1.0\n0,1,0.9\n0,2,0.8\n0,3,0.7\n"
        "epoch,step,train/a/loss,train/loss\n"
        "0,2,0.4,0.75\n0,3,0.3,0.65\n1,4,0.2,0.6\n1,4,,0.55\n"
        "1,5,0.1,0.5\n1,"
    )
    history = read_history(path)
    loss = history["train/loss"]
    assert loss.steps.tolist() == [0, 1, 2, 3, 4, 5]
    assert loss.values.tolist() == [1.0, 0.9, 0.75, 0.65, 0.55, 0.5]
    assert loss.epochs.tolist() == [0, 0, 0, 0, 1, 1]
    assert history["train/a/loss"].steps.tolist() == [2, 3, 4, 5]
    assert history["train/a/loss"].values.tolist() == [0.4, 0.3, 0.2, 0.1]


def test_a_resumed_run_continues_its_metrics_csv(tmp_path: Path) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv; the template's continues it (a
    new column rewrites the file under the wider header, the old rows kept)."""
    from lightning_mtl.loggers import CSVLogger as ResumingCSVLogger

    first = ResumingCSVLogger(tmp_path, name="csv", version="")
    for step in range(3):
        first.log_metrics({"train/loss": 1.0 - step / 10}, step=step)
    first.save()
    resumed = ResumingCSVLogger(tmp_path, name="csv", version="")  # the run resumed at step 2
    resumed.log_metrics({"train/loss": 0.75}, step=2)
    resumed.save()
    resumed.log_metrics({"train/loss": 0.7, "train/a/loss": 0.3}, step=3)
    resumed.save()
    history = read_history(tmp_path / "csv" / "metrics.csv")
    assert history["train/loss"].steps.tolist() == [0, 1, 2, 3]
    assert history["train/loss"].values.tolist() == [1.0, 0.9, 0.75, 0.7]
    assert history["train/a/loss"].values.tolist() == [0.3]
    assert isinstance(resumed, CSVLogger)  # still Lightning's logger for every isinstance check


class RecordingWandb(WandbLogger):
    """A W&B logger that records the images it is given instead of starting a run."""

    def __init__(self) -> None:
        self.images: dict[str, list[Any]] = {}

    def log_image(
        self, key: str, images: list[Any], step: int | None = None, **kwargs: Any
    ) -> None:
        self.images[key] = images


def test_callback_sends_the_plots_to_wandb_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lightning_mtl.callbacks.run_plots import RunPlots

    run_dir = tmp_path / "run"
    wandb = RecordingWandb()
    csv_logger = CSVLogger(run_dir, name="csv", version="")
    for row in synthetic_rows():  # buffered, not saved: the callback flushes them
        csv_logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    assert not (run_dir / "csv" / "metrics.csv").exists()
    trainer = SimpleNamespace(is_global_zero=True, loggers=[csv_logger, wandb])
    callback = RunPlots()
    callback.on_fit_end(trainer, None)  # type: ignore[arg-type]
    assert [p.name for p in callback.written][:2] == ["losses.png", "metrics.png"]
    assert set(wandb.images) == {f"plots/{p.stem}" for p in callback.written}
    assert wandb.images["plots/losses"] == [str(run_dir / "plots" / "losses.png")]
    # no metrics.csv: a warning naming the run folder, no error
    empty = CSVLogger(tmp_path / "empty", name="csv", version="")
    with caplog.at_level(logging.WARNING, logger="lightning_mtl.callbacks.run_plots"):
        RunPlots().on_test_end(SimpleNamespace(is_global_zero=True, loggers=[empty]), None)  # type: ignore[arg-type]
    assert str(tmp_path / "empty") in caplog.text and "metrics.csv" in caplog.text
    # other ranks and enabled=False draw nothing
    idle = RunPlots(enabled=False)
    idle.on_fit_end(trainer, None)  # type: ignore[arg-type]
    assert idle.written == []


def test_csv_training_run_leaves_its_plots(make_cfg: Callable[..., DictConfig]) -> None:
    from lightning_mtl.callbacks.run_plots import RunPlots
    from lightning_mtl.train import train

    cfg = make_cfg(
        # the default callbacks have it; the fast test config turns it off
        "callbacks.run_plots={_target_: lightning_mtl.callbacks.run_plots.RunPlots}",
        # two tasks, two steps (a cosine measured at each), one batch of validation and test
        "task=[segmentation,depth]",
        "data.train_size=16",
        "callbacks.gradient_conflict.every_n_steps=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "preflight.mode=skip",
    )
    _, objects = train(cfg)
    plotters = [cb for cb in objects["trainer"].callbacks if isinstance(cb, RunPlots)]
    assert len(plotters) == 1 and plotters[0].written
    out = Path(cfg.paths.output_dir)
    for name in ("losses", "metrics", "weights", "grad_conflict"):
        path = out / "plots" / f"{name}.png"
        assert path.is_file() and imread(path).ndim == 3, name
    assert "test/" in (out / "csv" / "metrics.csv").read_text()  # drawn again after the test
    assert "mean cosine" in (out / "plots" / "diagnostics.md").read_text()
