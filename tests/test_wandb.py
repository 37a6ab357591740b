"""Weights & Biases (offline, in-process): a training resumed from its run folder continues the
same W&B run; the run's config holds the composed config, the commit, the host and the world
size; val/test keys are drawn against the epoch and each task has its panel section; the task
weights chart spans the whole run and the test metrics arrive as a table; a run without an API
key or without a reachable server goes offline at once or after its short init timeout.

What W&B wrote is read back from the offline run's own files: ``run-<id>.wandb`` (a log of
protobuf records, read by :func:`records`) and the tables under ``files/media/table/``.
"""

from __future__ import annotations

import csv
import json
import logging
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_mtl.checkpointing import read_checkpoint
from lightning_mtl.results.identity import git_commit
from lightning_mtl.results.record import WANDB_KEY
from lightning_mtl.train import train
from lightning_mtl.utils.locations import PROJECT_ROOT
from lightning_mtl.wandb_tracking import (
    RUN_FILE,
    STATE_KEY,
    WandbLogger,
    metrics_table_rows,
    resumed_run_id,
    wandb_key,
)
from tests.conftest import FAST, compose_config

TASKS = ["segmentation", "depth", "count", "dominant_color", "colors"]
STEPS_PER_EPOCH = 6  # FAST: 48 training samples, batches of 8


# ------------------------------------------------------------------- the offline run's files
BLOCK = 32 * 1024  # W&B's transaction log: leveldb-style blocks of 32 KiB
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(run_file: Path) -> Iterator[Any]:
    """The protobuf records of a ``run-<id>.wandb`` file: a 7-byte file header (``:W&B``, magic,
    version), then chunks with a 7-byte header each (CRC, length, kind) that never cross a
    32 KiB block; a record is one FULL chunk or FIRST, MIDDLE..., LAST."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    position, pending = 7, b""
    while position + 7 <= len(data):
        room = BLOCK - position % BLOCK
        if room < 7:  # the block's tail is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # zeros: the rest of the block is padding
            position += room
            continue
        position += 7
        pending += data[position : position + length]
        position += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_run(folder: Path) -> dict[str, Any]:
    """What one offline session wrote: its run record, config, metric definitions, history
    keys and summary."""
    run_file = next(folder.glob("run-*.wandb"))
    found: dict[str, Any] = {
        "run": None,
        "config": {},
        "metrics": {},
        "history": set(),
        "summary": {},
    }
    for record in records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found["run"] = record.run
        elif kind == "config":
            for item in record.config.update:
                found["config"][item.key] = json.loads(item.value_json)
        elif kind == "metric":
            metric = record.metric
            found["metrics"][metric.name or metric.glob_name] = metric.step_metric
        elif kind == "history":
            found["history"].update(_name(item) for item in record.history.item)
        elif kind == "summary":
            for item in record.summary.update:
                found["summary"][_name(item)] = json.loads(item.value_json)
    return found


def _name(item: Any) -> str:
    """A history or summary item's key (a media value's parts are nested under it)."""
    return item.nested_key[0] if item.nested_key else item.key


def table(folder: Path, key: str) -> dict[str, Any]:
    """The last table logged under ``key`` in an offline session."""
    files = sorted((folder / "files" / "media" / "table").glob(f"{key}_*.table.json"))
    assert files, f"no table {key} in {folder}"
    return json.loads(files[-1].read_text())


def wandb_logger(objects: dict[str, Any]) -> WandbLogger:
    return next(lg for lg in objects["trainer"].loggers if isinstance(lg, WandbLogger))


# ----------------------------------------------------------------- a run, then its resume
@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One epoch with W&B offline (the gradient monitor every 2 steps), then the same run
    folder resumed for a second epoch and tested."""
    import wandb

    run = tmp_path_factory.mktemp("wandb_run")
    common = [
        *FAST,
        "logger=wandb",
        "tags=[ci,wandb]",
        "callbacks.gradient_conflict.every_n_steps=2",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.delenv("WANDB_RUN_ID", raising=False)
        _, first = train(compose_config("train", [*common, "test=false"], run))
        first_id = wandb_logger(first).experiment.id
        first_file = json.loads((run / RUN_FILE).read_text())
        resume = [*common, "trainer.max_epochs=2", f"ckpt_path={run}"]
        metrics, second = train(compose_config("train", resume, run))
        logger = wandb_logger(second)
        second_id = logger.experiment.id
        wandb.finish()
    return {
        "run": run,
        "ids": (first_id, second_id),
        "first_file": first_file,
        "metrics": metrics,
        "logger": logger,
        "trainer": second["trainer"],
    }


def sessions(resumed: dict[str, Any]) -> list[Path]:
    """The offline folders of the run, oldest first."""
    return sorted((resumed["run"] / "wandb").glob("offline-run-*"))


def test_a_resumed_training_continues_the_same_wandb_run(resumed: dict[str, Any]) -> None:
    run, (first_id, second_id) = resumed["run"], resumed["ids"]
    assert first_id == second_id
    assert resumed["first_file"]["id"] == first_id and resumed["first_file"]["mode"] == "offline"
    assert resumed["logger"].run_info["run_id_from"].startswith("checkpoint ")
    assert resumed["trainer"].global_step == 2 * STEPS_PER_EPOCH  # it did resume, at step 6
    folders = sessions(resumed)
    assert len(folders) == 2
    assert all(f.name.endswith(f"-{first_id}") for f in folders)
    stored = json.loads((run / RUN_FILE).read_text())
    assert stored["id"] == first_id
    assert stored["folders"] == [str(f) for f in folders]  # what `wandb sync` uploads
    # the id travels in the checkpoints too (a checkpoint copied elsewhere keeps its run)
    last = read_checkpoint(run / "checkpoints" / "last.ckpt", for_training=True)
    assert last["callbacks"][STATE_KEY]["run_id"] == first_id
    first, second = (read_run(f) for f in folders)
    assert first["run"].run_id == second["run"].run_id == first_id
    assert list(first["run"].tags) == ["ci", "wandb"]


def test_the_run_config_holds_the_config_commit_host_and_world_size(
    resumed: dict[str, Any],
) -> None:
    first, second = (read_run(f) for f in sessions(resumed))
    config = first["config"]
    assert config["model"]["backbone"]["name"] == "test_resnet"  # the composed config, resolved
    assert set(config["tasks"]) == set(TASKS) and config["tags"] == ["ci", "wandb"]
    info = config["run_info"]
    commit = git_commit(PROJECT_ROOT)
    assert info["git_commit"] == commit.removesuffix("+dirty") and len(info["git_commit"]) == 40
    assert info["git_dirty"] is commit.endswith("+dirty")
    assert info["host"] == socket.gethostname()
    assert (info["world_size"], info["devices"], info["num_nodes"]) == (1, 1, 1)
    assert info["run_dir"] == str(resumed["run"].resolve()) and info["run_id_from"] == "new"
    assert info["resumed_from"] is None
    last = resumed["run"] / "checkpoints" / "last.ckpt"
    assert second["config"]["run_info"]["resumed_from"] == str(last)
    # the results record that `mtl-report --wandb` reads is in the resumed run's summary
    record = json.loads(second["summary"][WANDB_KEY])
    assert record["run_dir"] == str(resumed["run"].resolve()) and record["tasks"] == TASKS


def test_task_sections_and_axes(resumed: dict[str, Any]) -> None:
    first, second = (read_run(f) for f in sessions(resumed))
    metrics, history = first["metrics"], first["history"]
    assert metrics["*"] == "trainer/global_step"  # step-level keys: the global step
    for task in TASKS:
        assert f"{task}/train/loss" in history and f"weights/{task}" in history
        assert f"train/{task}/loss" not in history and f"train/weight/{task}" not in history
        assert metrics[f"{task}/val/loss"] == "epoch"
        assert second["metrics"][f"{task}/test/loss"] == "epoch"
    assert metrics["segmentation/val/miou"] == "epoch" and metrics["val/loss"] == "epoch"
    assert "segmentation/val/miou" in second["summary"]
    assert {
        "gradients/conflict",
        "gradients/norm/depth",
        "gradients/cos/segmentation/depth",
    } <= history
    # the cosine heatmap (every 2 steps: 0, 2, 4) as images of the run
    images = (sessions(resumed)[0] / "files" / "media" / "images" / "gradients").glob("conflict_*")
    assert len(list(images)) == 3
    # the CSV logger keeps the template's keys
    with (resumed["run"] / "csv" / "metrics.csv").open() as file:
        header = next(csv.reader(file))
    assert {"train/segmentation/loss", "val/segmentation/miou", "train/weight/depth"} <= set(header)


def test_weight_chart_spans_the_resumed_run_and_test_metrics_are_a_table(
    resumed: dict[str, Any],
) -> None:
    first, second = sessions(resumed)
    chart = table(second, "weights/all_tasks_table")
    assert chart["columns"] == ["step", "lineKey", "lineVal"]
    steps: dict[str, set[int]] = {}
    for step, task, value in chart["data"]:
        steps.setdefault(task, set()).add(step)
        assert value == pytest.approx(1.0)  # equal weighting
    # steps 0-5 from the first session (restored from the checkpoint), 6-11 from the second
    assert steps == {t: set(range(2 * STEPS_PER_EPOCH)) for t in TASKS}
    assert "weights/all_tasks_table" in read_run(first)["history"]
    tested = table(second, "test/metrics")
    assert tested["columns"] == ["task", "source", "metric", "value"]
    metrics = resumed["metrics"]
    rows = {(task, metric): value for task, source, metric, value in tested["data"]}
    expected = {
        tuple(k.split("/")[1:]): v
        for k, v in metrics.items()
        if k.count("/") == 2 and k[:5] == "test/"
    }
    assert rows.keys() == expected.keys() and len(rows) == 18
    for key, value in expected.items():
        assert rows[key] == pytest.approx(value, rel=1e-6)
    assert {source for _, source, _, _ in tested["data"]} == {"all"}


# ------------------------------------------------------------------------- keys and ids
def test_wandb_keys() -> None:
    tasks = ["depth", "amazon", "webcam"]
    cases = {
        "train/depth/loss": "depth/train/loss",
        "val/depth/abs_rel": "depth/val/abs_rel",
        "test/depth/delta1": "depth/test/delta1",
        "val/nyu/depth/loss": "depth/val/nyu/loss",  # a source of merged data
        "test/amazon/amazon/accuracy": "amazon/test/amazon/accuracy",  # Office-31
        "val/amazon/webcam/accuracy": "webcam/val/amazon/accuracy",
        "train/weight/depth": "weights/depth",
        "train/weight/backbone/depth": "weights/backbone/depth",
        "train/grad_norm/depth": "gradients/norm/depth",
        "train/grad_cos/depth/amazon": "gradients/cos/depth/amazon",
        "train/grad_conflict": "gradients/conflict",
        "train/affinity/depth/amazon": "affinity/depth/amazon",
        "train/loss": "train/loss",
        "val/loss": "val/loss",
        "val/nyu/total_loss": "val/nyu/total_loss",
        "val/other/loss": "val/other/loss",  # not a task
        "perf/step_ms": "perf/step_ms",
        "model/params/total": "model/params/total",
        "results/record": "results/record",
        "epoch": "epoch",
    }
    assert {key: wandb_key(key, tasks) for key in cases} == cases
    assert wandb_key("val/other/loss", None) == "other/val/loss"  # tasks unknown: by shape
    logger = WandbLogger(save_dir=".", tasks=["depth"], group_by_task=False, offline=True)
    assert logger.key("val/depth/loss") == "val/depth/loss"
    values = {
        "test/depth/mae": 1.0,
        "test/nyu/depth/mae": 2.0,
        "test/loss": 3.0,
        "val/depth/mae": 4,
    }
    assert metrics_table_rows(values, ["depth"]) == [
        ["depth", "all", "mae", 1.0],
        ["depth", "nyu", "mae", 2.0],
    ]


def fake_checkpoint(path: Path, run_id: str | None) -> Path:
    """A checkpoint with the keys the template checks (and the W&B state when ``run_id``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint: dict[str, Any] = {
        "state_dict": {"w": torch.zeros(1)},
        "hyper_parameters": {"backbone": {}, "tasks": {}, "weighting": {}},
        "epoch": 0,
        "global_step": 1,
        "loops": {},
        "optimizer_states": [],
        "callbacks": {STATE_KEY: {"run_id": run_id}} if run_id else {},
    }
    torch.save(checkpoint, path)
    return path


def test_which_run_a_training_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_FILE).write_text(json.dumps({"id": "fromfile"}))
    # no checkpoint yet (`ckpt_path=last` starts fresh), an evaluation, no ckpt_path: a new run
    assert resumed_run_id("last", run, training=True) == (None, "new")
    assert resumed_run_id(None, run, training=True) == (None, "new")
    fake_checkpoint(run / "checkpoints" / "last.ckpt", None)
    assert resumed_run_id(str(run), run, training=False) == (None, "new")
    # a checkpoint without the W&B state (trained with logger=csv): the run folder's file
    assert resumed_run_id("last", run, training=True)[0] == "fromfile"
    # the checkpoint's own id first; a checkpoint outside the run folder keeps its run
    elsewhere = fake_checkpoint(tmp_path / "moved.ckpt", "fromckpt")
    assert resumed_run_id(str(elsewhere), tmp_path / "new_run", training=True)[0] == "fromckpt"
    # the logger: an explicit id (or $WANDB_RUN_ID) wins over the resumed one
    options = {"save_dir": run, "offline": True, "training": True, "ckpt_path": str(elsewhere)}
    assert WandbLogger(**options).run_id == "fromckpt"
    assert WandbLogger(**options, id="given").run_id == "given"
    monkeypatch.setenv("WANDB_RUN_ID", "fromenv")
    assert WandbLogger(**options).run_id == "fromenv"


# ----------------------------------------------------------------- offline, and no network
@pytest.fixture
def fresh_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """W&B set up again from the environment this test gives it (it reads it once per
    process), with no credentials from this machine; set up again after the test."""
    import wandb

    wandb.finish()
    wandb.teardown()
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)  # no workspace settings (`wandb offline` writes ./wandb/settings)
    names = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL")
    for name in (*names, "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    yield
    wandb.finish()
    monkeypatch.undo()
    wandb.teardown()


def test_offline_refuses_artifacts_instead_of_raising(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        logger = WandbLogger(save_dir=".", offline=True, log_model=True)
    assert logger._log_model is False and logger.mode == "offline"
    assert "log_model=True turned off" in caplog.text


def test_no_api_key_goes_offline_at_once(
    fresh_wandb: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        logger = WandbLogger(save_dir=tmp_path, project="p", log_model="all")
        run = logger.experiment
    assert time.monotonic() - start < 15
    assert logger.mode == "offline" and run.settings.mode == "offline"
    assert run.id == logger.run_id and logger._log_model is False
    assert "no API key" in caplog.text and "wandb login" in caplog.text
    assert f"wandb sync {tmp_path / 'wandb' / 'offline-run-*'}" in caplog.text
    assert json.loads((tmp_path / RUN_FILE).read_text())["mode"] == "offline"
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run.id}"))


def test_unreachable_server_falls_back_offline_after_the_init_timeout(
    fresh_wandb: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        logger = WandbLogger(
            save_dir=tmp_path, project="p", init_timeout=1, id="keepme", log_model=True
        )
        assert logger._log_model is True  # online asked for: artifacts kept until the fallback
        run = logger.experiment
    assert time.monotonic() - start < 20
    assert run.settings.mode == "offline" and logger.mode == "offline"
    assert logger._log_model is False and "log_model=True turned off" in caplog.text
    assert run.id == "keepme"  # the same id: `wandb sync` uploads it as that run
    assert "could not start the run online" in caplog.text and "wandb sync" in caplog.text
    assert list((tmp_path / "wandb").glob("offline-run-*-keepme"))
