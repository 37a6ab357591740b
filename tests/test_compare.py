"""The architecture comparison: the table from a sweep directory (numbers, ratios, best per
metric in the metric's direction, missing jobs, the CSV round-trip), the experiment config, the
step timer, and (slow) one real two-architecture multirun."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from hydra.utils import get_class
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl import compare
from lightning_mtl.callbacks.step_timer import StepTimer, batch_size
from lightning_mtl.metrics import METRICS
from lightning_mtl.models.architectures import ARCHITECTURES
from lightning_mtl.utils.setup import CONFIG_DIR, PROJECT_ROOT
from tests.conftest import FAST, compose_config

TASKS = ["depth", "count"]
EXPERIMENT = "experiment=compare_architectures"


# ---------------------------------------------------------------------------- a fake sweep dir
def write_job(
    sweep: Path,
    job: str,
    architecture: Any,
    overrides: list[str],
    test: dict[str, float] | None,
    step_ms: float | None = None,
    params: int = 1000,
    metrics_file: bool = True,
) -> Path:
    """A job directory as Hydra and the CSV logger leave it: ``.hydra/config.yaml``,
    ``.hydra/overrides.yaml`` and ``csv/metrics.csv`` (written by Lightning's CSVLogger, with
    the model report at step 0, train/val rows, the step time per epoch, test at the end)."""
    job_dir = sweep / job
    hydra_dir = job_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    config = {
        "model": {"architecture": architecture},
        "tasks": {t: {"metrics": []} for t in TASKS},
    }
    OmegaConf.save(OmegaConf.create(config), hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), hydra_dir / "overrides.yaml")
    if not metrics_file:
        return job_dir
    logger = CSVLogger(save_dir=job_dir, name="csv", version="")
    logger.log_metrics(
        {
            "model/params/total": params,
            "model/params/trainable": params // 2,
            "model/flops_per_image": 10 * params,
        },
        step=0,
    )
    for epoch in range(2):
        logger.log_metrics({"epoch": epoch, "train/loss": 3.0 - epoch}, step=epoch * 6 + 5)
        logger.log_metrics(
            {"epoch": epoch, "val/depth/mae": 1.0 - 0.1 * epoch, "val/loss": 2.0},
            step=epoch * 6 + 5,
        )
        if step_ms is not None:
            # the first epoch's value is not the one kept: the table takes the last
            value = step_ms * (3.0 if epoch == 0 else 1.0)
            logger.log_metrics(
                {"epoch": epoch, "perf/step_ms": value, "perf/samples_per_s": 8e3 / value},
                step=epoch * 6 + 5,
            )
    if test is not None:
        logger.log_metrics(
            {"epoch": 2, "test/loss": 9.0, "test/depth/loss": 4.0, "test/count/loss": 5.0, **test},
            step=12,
        )
    logger.save()
    return job_dir


def write_multirun_yaml(sweep: Path, values: str, task: list[str] | None = None) -> None:
    """The basic sweeper's ``multirun.yaml``: its params and the command line's task overrides."""
    cfg = {
        "hydra": {
            "sweeper": {
                "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                "max_batch_size": None,
                "params": {"model.architecture": values},
            },
            "overrides": {"task": task or [EXPERIMENT]},
        }
    }
    OmegaConf.save(OmegaConf.create(cfg), sweep / "multirun.yaml")


def metrics(depth_mae: float, delta1: float, count_mae: float, r2: float) -> dict[str, float]:
    return {
        "test/depth/mae": depth_mae,
        "test/depth/delta1": delta1,
        "test/count/mae": count_mae,
        "test/count/r2": r2,
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """hard, mtan (as a mapping), ple without metrics.csv, mmoe that never ran."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    write_multirun_yaml(sweep, "hard,mtan,ple,mmoe")
    write_job(
        sweep, "0", "hard", ["model.architecture=hard", EXPERIMENT], metrics(0.5, 0.8, 0.4, 0.7),
        step_ms=100.0, params=1000,
    )  # fmt: skip
    write_job(
        sweep, "1", {"name": "mtan", "reduction": 4}, ["model.architecture=mtan", EXPERIMENT],
        metrics(0.4, 0.8, 0.6, 0.9), step_ms=150.0, params=2000,
    )  # fmt: skip
    write_job(sweep, "2", "ple", ["model.architecture=ple", EXPERIMENT], None, metrics_file=False)
    return sweep


def by_run(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["run"]: r for r in records}


# --------------------------------------------------------------------------------- the table
def test_read_metrics_takes_each_columns_last_non_empty_value(sweep: Path) -> None:
    values = compare.read_metrics(sweep / "0" / "csv" / "metrics.csv")
    assert values["perf/step_ms"] == 100.0  # epoch 1's, not epoch 0's 300
    assert values["val/depth/mae"] == pytest.approx(0.9)
    assert values["model/params/total"] == 1000.0  # logged at step 0 only
    assert values["test/depth/mae"] == 0.5


def test_runs_are_collected_in_sweep_order_with_missing_jobs(sweep: Path) -> None:
    runs = compare.collect_runs(sweep)
    assert [(r.label, r.job) for r in runs] == [
        ("hard", "0"),
        ("mtan", "1"),
        ("ple", "2"),
        ("mmoe", "-"),
    ]
    assert runs[1].architecture == "mtan"  # from {name: mtan, ...}
    assert runs[0].problem is None and runs[1].problem is None
    assert "no csv/metrics.csv" in runs[2].problem
    assert "never ran" in runs[3].problem
    assert runs[0].tasks == TASKS


def test_table_numbers_ratios_and_best_per_metric(sweep: Path) -> None:
    table = compare.build_table(compare.collect_runs(sweep), baseline="hard")
    # task order of the config (depth before count), losses left out
    assert table.metrics == [
        "test/depth/delta1",
        "test/depth/mae",
        "test/count/mae",
        "test/count/r2",
    ]
    rows = by_run(table.records)
    hard, mtan = rows["hard"], rows["mtan"]
    assert hard["test/depth/mae"] == 0.5 and mtan["test/count/r2"] == 0.9
    assert (hard["params_total"], hard["params_trainable"], hard["flops_per_image"]) == (
        1000, 500, 10000,
    )  # fmt: skip
    assert hard["step_ms"] == 100.0 and mtan["step_ms"] == 150.0
    assert hard["step_time_x"] == 1.0 and mtan["step_time_x"] == pytest.approx(1.5)
    assert table.baseline == "hard"
    # lower is better for mae, higher for r2 and delta1 (a tie marks both)
    assert table.best == {
        "test/depth/mae": ["mtan"],
        "test/count/mae": ["hard"],
        "test/count/r2": ["mtan"],
        "test/depth/delta1": ["hard", "mtan"],
    }
    assert hard["best_at"] == "test/depth/delta1;test/count/mae"
    assert rows["ple"]["status"].startswith("missing: no csv/metrics.csv")
    assert rows["ple"]["step_time_x"] is None and rows["ple"]["test/depth/mae"] is None
    assert rows["mmoe"]["status"] == "missing: the job never ran (no job directory)"
    assert hard["status"] == "ok"


def test_markdown_marks_best_and_lists_missing_jobs(sweep: Path) -> None:
    text = compare.build_table(compare.collect_runs(sweep)).markdown()
    lines = text.splitlines()
    assert lines[0].startswith("| run | depth/delta1 ↑ | depth/mae ↓ | count/mae ↓ | count/r2 ↑ |")
    assert "time ×hard" in lines[0]
    hard = next(line for line in lines if line.startswith("| hard |"))
    mtan = next(line for line in lines if line.startswith("| mtan |"))
    assert "**0.4000**" in hard and "| 0.5000 |" in hard  # count mae best, depth mae not
    assert "**0.4000**" in mtan and "**0.9000**" in mtan  # depth mae, r2
    assert "| 100.0 | 1.00 |" in hard and "| 150.0 | 1.50 |" in mtan
    assert "| best | hard, mtan | mtan | hard | mtan |" in text
    assert "missing: ple (job 2): no csv/metrics.csv" in text
    assert "missing: mmoe (job -): the job never ran" in text


def test_csv_round_trip(sweep: Path, tmp_path: Path) -> None:
    table = compare.build_table(compare.collect_runs(sweep))
    markdown, path = compare.write_table(table, tmp_path / "out")
    assert markdown.read_text() == table.markdown()
    back = compare.read_table_csv(path)
    assert [r["run"] for r in back] == ["hard", "mtan", "ple", "mmoe"]
    for written, read in zip(table.records, back, strict=True):
        assert set(read) == set(table.columns)
        for key in table.columns:
            assert read[key] == written[key], key  # floats at full precision, None as empty


def test_a_failed_job_with_partial_metrics_and_its_error(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_job(sweep, "0", "hard", ["model.architecture=hard"], metrics(0.5, 0.8, 0.4, 0.7), 80.0)
    failed = write_job(sweep, "1", "ple", ["model.architecture=ple"], None, step_ms=90.0)
    runs = compare.collect_runs(sweep, failures={str(failed): "RuntimeError: out of memory"})
    table = compare.build_table(runs)
    ple = by_run(table.records)["ple"]
    assert ple["status"].startswith("missing: no test metrics")
    assert ple["status"].endswith("job failed: RuntimeError: out of memory")
    assert ple["step_ms"] == 90.0 and ple["step_time_x"] == pytest.approx(90 / 80)  # kept
    assert table.best["test/depth/mae"] == ["hard"]


def test_labels_are_the_differing_overrides_when_the_architecture_is_shared(
    tmp_path: Path,
) -> None:
    sweep = tmp_path / "sweep"
    common = "experiment=compare_architectures"
    for job, backbone, ms in (("0", "resnet18", 50.0), ("1", "convnext_atto", 75.0)):
        overrides = [f"model.backbone.name={backbone}", common]
        write_job(sweep, job, "hard", overrides, metrics(0.5, 0.8, 0.4, 0.7), ms)
    table = compare.build_table(compare.collect_runs(sweep))  # baseline "hard" is no label
    labels = [r["run"] for r in table.records]
    assert labels == ["model.backbone.name=resnet18", "model.backbone.name=convnext_atto"]
    assert table.baseline == labels[0]
    assert by_run(table.records)[labels[1]]["step_time_x"] == 1.5
    assert any("no run 'hard'" in note for note in table.notes)
    with pytest.raises(ValueError, match="not a run"):
        compare.build_table(compare.collect_runs(sweep), baseline="hard", strict=True)


def test_expected_jobs_follow_the_basic_sweeper(tmp_path: Path) -> None:
    write_multirun_yaml(tmp_path, "hard,mtan", task=[EXPERIMENT, "seed=1,2"])
    jobs = compare.expected_jobs(tmp_path)
    assert jobs is not None and len(jobs) == 4
    assert jobs[0] == ["model.architecture=hard", EXPERIMENT, "seed=1"]
    # the command line wins over the experiment's params for the same key
    write_multirun_yaml(tmp_path, "hard,mtan", task=[EXPERIMENT, "model.architecture=ple"])
    assert compare.expected_jobs(tmp_path) == [["model.architecture=ple", EXPERIMENT]]


def test_cli_rebuilds_the_table(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert compare.main([str(sweep), "--name", "table"]) == 0
    printed = capsys.readouterr().out
    assert "| hard |" in printed and "missing: mmoe" in printed
    assert (sweep / "table.md").is_file() and (sweep / "table.csv").is_file()
    assert compare.main([str(sweep), "--baseline", "nope"]) == 2
    assert compare.main([str(sweep / "absent")]) == 2


def test_hydra_callback_writes_the_table_after_the_last_job(sweep: Path) -> None:
    callback = compare.CompareCallback(name="architectures", baseline="hard")

    def job_end(num: int, status: JobStatus, error: Exception | None = None) -> None:
        cfg = OmegaConf.create(
            {
                "hydra": {
                    "mode": RunMode.MULTIRUN,
                    "sweep": {"dir": str(sweep)},
                    "runtime": {"output_dir": str(sweep / str(num))},
                    "job": {"num": num},
                }
            }
        )
        job_return = JobReturn(status=status)
        job_return.return_value = error
        callback.on_job_end(cfg, job_return)

    job_end(2, JobStatus.FAILED, RuntimeError("boom"))
    assert not (sweep / "architectures.csv").exists()  # 4 jobs expected: not the last one
    job_end(3, JobStatus.COMPLETED)
    rows = by_run(compare.read_table_csv(sweep / "architectures.csv"))
    assert rows["ple"]["status"].endswith("job failed: RuntimeError: boom")
    # the error stays in the job's directory, for the command line's rebuilds
    assert (sweep / "2" / compare.ERROR_FILE).read_text() == "RuntimeError: boom\n"
    rebuilt = by_run(compare.build_table(compare.collect_runs(sweep)).records)
    assert rebuilt["ple"]["status"].endswith("job failed: RuntimeError: boom")
    (sweep / "architectures.csv").unlink()
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert not (sweep / "architectures.csv").exists()  # already reported for this sweep


# ------------------------------------------------------------------------------- directions
def test_every_metric_has_a_direction_that_agrees_with_torchmetrics() -> None:
    head = SimpleNamespace(out_features=3)
    for kind, factories in METRICS.items():
        for name, factory in factories.items():
            assert name in compare.HIGHER_IS_BETTER, f"{kind} metric {name!r} has no direction"
            metric = factory(head)
            if metric.higher_is_better is not None:
                assert compare.HIGHER_IS_BETTER[name] == metric.higher_is_better, name
    for name in ("mae", "rmse", "abs_rel", "mse", "mean_angle"):
        assert compare.higher_is_better(f"test/depth/{name}") is False
    for name in ("miou", "accuracy", "f1", "map", "r2", "delta1", "pixel_accuracy"):
        assert compare.higher_is_better(f"test/t/{name}") is True
    assert compare.higher_is_better("test/t/unknown") is None
    assert compare.is_test_metric("test/src/depth/mae")
    assert not compare.is_test_metric("test/depth/loss") and not compare.is_test_metric("test/loss")


# ------------------------------------------------------------------------------ the experiment
def test_experiment_composes_and_sweeps_every_architecture(tmp_path: Path) -> None:
    cfg = compose_config("train", [EXPERIMENT], tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True)
    default = OmegaConf.to_container(compose_config("train", [], tmp_path), resolve=True)
    # the same budget as the default run: data, trainer, tasks, weighting, seed
    for key in ("data", "trainer", "tasks", "weighting", "seed", "model"):
        assert container[key] == default[key], key

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        full = compose("train", overrides=[EXPERIMENT], return_hydra_config=True)
    swept = str(full.hydra.sweeper.params["model.architecture"]).split(",")
    assert sorted(swept) == ARCHITECTURES.names()
    assert swept[0] == "hard"
    callback = full.hydra.callbacks.compare
    assert get_class(callback._target_) is compare.CompareCallback
    assert callback.baseline == "hard"


# ------------------------------------------------------------------------------ the step timer
class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_tiny(tmp_path: Path, timer: StepTimer, epochs: int = 2) -> L.Trainer:
    data = DataLoader(TensorDataset(torch.randn(20, 4)), batch_size=4)  # 5 steps per epoch
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", callbacks=[timer], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="csv", version=""),
    )  # fmt: skip
    trainer.fit(Tiny(), data)
    return trainer


def test_step_timer_logs_the_median_step_time_per_epoch(tmp_path: Path) -> None:
    timer = StepTimer(warmup_steps=3)
    fit_tiny(tmp_path, timer)
    assert len(timer.times) == 5  # the second epoch: all measured
    values = compare.read_metrics(tmp_path / "csv" / "metrics.csv")
    step_ms = values["perf/step_ms"]
    assert step_ms == pytest.approx(sorted(timer.times)[2] * 1e3, rel=1e-4)
    rate = values["perf/samples_per_s"]
    assert rate == pytest.approx(4 / (step_ms / 1e3), rel=1e-4)
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        header = handle.readline()
    assert "perf/step_ms" in header


def test_step_timer_skips_warm_up_epochs_and_reads_batch_sizes(tmp_path: Path) -> None:
    timer = StepTimer(warmup_steps=5)
    fit_tiny(tmp_path, timer, epochs=1)  # 5 steps, all warm-up
    assert timer.times == []
    written = tmp_path / "csv" / "metrics.csv"  # nothing logged, or no step time in it
    assert not written.is_file() or "perf/step_ms" not in compare.read_metrics(written)
    with pytest.raises(ValueError):
        StepTimer(warmup_steps=-1)
    image = torch.zeros(6, 3, 2, 2)
    assert batch_size({"image": image, "targets": {}}) == 6
    assert batch_size([torch.zeros(()), (image,)]) == 6
    assert batch_size({"x": "text"}) == 0


def test_step_timer_is_a_default_callback(tmp_path: Path) -> None:
    cfg = compose_config("train", [], tmp_path)
    assert get_class(cfg.callbacks.step_timer._target_) is StepTimer


# ----------------------------------------------------------------------- a real multirun, slow
@pytest.mark.slow
def test_compare_architectures_multirun_end_to_end(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "lightning_mtl.train", "-m", EXPERIMENT,
        "model.architecture=hard,mtan",  # the command line narrows the experiment's sweep
        *FAST,
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| hard |" in done.stdout and "| mtan |" in done.stdout
    assert (sweep / "architectures.md").is_file()
    rows = compare.read_table_csv(sweep / "architectures.csv")
    assert [r["run"] for r in rows] == ["hard", "mtan"]
    hard, mtan = rows
    assert hard["status"] == "ok" and mtan["status"] == "ok"
    assert hard["step_time_x"] == 1.0 and mtan["step_time_x"] > 0
    assert mtan["params_total"] > hard["params_total"]
    assert mtan["flops_per_image"] > hard["flops_per_image"]
    assert math.isfinite(hard["test/segmentation/miou"])
    assert {"test/depth/abs_rel", "test/colors/map"} <= set(hard)
