"""Kill, resume, compare (slow): ``python -m lightning_mtl.train`` killed with SIGKILL at a
random step (epoch 0 included, and once in the middle of a checkpoint write with ``$TMPDIR``
on another filesystem), resumed from its run folder, ends with the parameters, balancer and
optimizer state and test metrics of an uninterrupted run (within 1e-6), for ``equal`` and the
stateful ``famo``, on merged data and on the default Shapes data; and SIGTERM saves a
checkpoint, exits 0, and the run resumes from it in the same folder.

Why subprocesses: only a real process can be killed at an arbitrary moment. The uninterrupted
references (trained while the process to kill runs) and the resumes run in-process, cheaper;
the run folder a resumed ``mtl-train`` picks is tested in test_checkpoints.py. Set
``KILL_SEED`` to replay a run's kill points.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_mtl.checkpointing import read_checkpoint
from lightning_mtl.train import train
from tests.conftest import FAST, compose_config
from tests.test_merged_data import SMALL

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("KILL_SEED", random.SystemRandom().randrange(10_000)))
# A small backbone (6 MB checkpoints) written after every step: a kill finds one to resume.
COMMON = [
    *(o for o in FAST if not o.startswith(("trainer.max_epochs", "data."))),
    "trainer.max_epochs=2",
    "model.backbone.name=test_resnet",
    "callbacks.last_checkpoint.every_n_train_steps=1",
    "callbacks.model_report=null",
]
MERGED = SMALL  # 56 training samples: 7 steps per epoch
SHAPES = [o for o in FAST if o.startswith("data.")]  # the default data: 48 samples, 6 steps
DATA = {"merged": MERGED, "shapes": SHAPES}
STEPS = {"merged": 14, "shapes": 12}
# (data, weighting, when): the kill after a random number of checkpoint writes within epoch 0
# or epoch 1, or while a checkpoint is being written.
CASES = [
    ("merged", "equal", "mid_write"),
    ("merged", "famo", "epoch_0"),
    ("shapes", "equal", "epoch_1"),
    ("shapes", "famo", "epoch_0"),
]


def overrides(data: str, weighting: str) -> list[str]:
    return [*COMMON, *DATA[data], f"weighting={weighting}"]


@pytest.fixture(scope="module")
def tmpdir_elsewhere() -> Iterator[str]:
    """A ``$TMPDIR`` on another filesystem than the run folder (tmpfs where there is one)."""
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=base) as folder:
        yield folder


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    """The uninterrupted runs, in-process, computed once per (data, weighting) on demand."""

    class Lazy(dict):
        def __missing__(self, key: tuple[str, str]) -> dict[str, Any]:
            out = tmp_path_factory.mktemp(f"reference_{key[0]}_{key[1]}")
            metrics, _ = train(compose_config("train", overrides(*key), out))
            self[key] = {"out": out, "metrics": metrics}
            return self[key]

    return Lazy()


def launch(run: Path, args: list[str], tmpdir: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "lightning_mtl.train", *args, f"hydra.run.dir={run}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TMPDIR": tmpdir}
    log = (run.parent / f"{run.name}.out").open("w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def tail(run: Path) -> str:
    return (run.parent / f"{run.name}.out").read_text()[-3000:]


def kill_after_writes(process: subprocess.Popen, run: Path, writes: int, mid_write: bool) -> None:
    """SIGKILL once ``last.ckpt`` has been replaced ``writes`` times; with ``mid_write``, at the
    next write after that while its temporary file exists (the process is stopped with SIGSTOP
    first, then checked to be inside the write)."""
    folder, seen = run / "checkpoints", set()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended before the kill:\n{tail(run)}"
        with contextlib.suppress(FileNotFoundError):
            stat = (folder / "last.ckpt").stat()  # every write is a new file (inodes are reused)
            seen.add((stat.st_ino, stat.st_mtime_ns))
        if len(seen) >= writes and not mid_write:
            process.kill()
            break
        if len(seen) >= writes and list(folder.glob(".last.ckpt.*.tmp")):
            process.send_signal(signal.SIGSTOP)
            if list(folder.glob(".last.ckpt.*.tmp")):  # stopped inside the write
                process.kill()
                break
            process.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    assert process.wait(timeout=60) == -signal.SIGKILL, tail(run)


def assert_same_end(run: Path, metrics: dict[str, float], reference: dict[str, Any]) -> None:
    """The final checkpoints hold the same weights, balancer and optimizer state, and the test
    metrics (of the run's best checkpoint) agree, within 1e-6."""
    ours = read_checkpoint(run / "checkpoints" / "last.ckpt", for_training=True)
    theirs = read_checkpoint(reference["out"] / "checkpoints" / "last.ckpt", for_training=True)
    assert ours["global_step"] == theirs["global_step"]
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for key, value in ours["state_dict"].items():
        torch.testing.assert_close(value, theirs["state_dict"][key], rtol=0, atol=1e-6, msg=key)
    for mine, other in zip(ours["optimizer_states"], theirs["optimizer_states"], strict=True):
        torch.testing.assert_close(mine["state"], other["state"], rtol=0, atol=1e-6)
    tested = {k: v for k, v in reference["metrics"].items() if k.startswith("test/")}
    assert tested
    for key, value in tested.items():
        assert abs(metrics[key] - value) <= 1e-6 * max(1.0, abs(value)), (key, metrics[key], value)


@pytest.mark.parametrize(("data", "weighting", "when"), CASES)
def test_sigkill_then_resume_ends_like_the_uninterrupted_run(
    data: str,
    weighting: str,
    when: str,
    references: dict,
    tmpdir_elsewhere: str,
    tmp_path: Path,
) -> None:
    steps_per_epoch = STEPS[data] // 2
    rng = random.Random(f"{SEED}-{data}-{weighting}")
    # every step writes last.ckpt, an epoch's last step twice (its epoch end): writes ~ steps
    writes = {
        "epoch_0": rng.randint(1, steps_per_epoch - 1),
        "epoch_1": rng.randint(steps_per_epoch + 2, 2 * steps_per_epoch),
        "mid_write": rng.randint(1, 2 * steps_per_epoch),
    }[when]
    run = tmp_path / "run"
    args = overrides(data, weighting)
    process = launch(run, args, tmpdir_elsewhere)
    with ThreadPoolExecutor(1) as pool:  # the reference trains while the process runs
        killing = pool.submit(kill_after_writes, process, run, writes, when == "mid_write")
        reference = references[(data, weighting)]
        killing.result()
    killed = f"KILL_SEED={SEED}: killed after {writes} writes ({when})"
    if when == "mid_write":  # the write in progress was lost, the previous file is whole
        assert list((run / "checkpoints").glob(".last.ckpt.*.tmp")), killed
    start = read_checkpoint(run / "checkpoints" / "last.ckpt", for_training=True)
    assert start["global_step"] < STEPS[data], killed
    if when == "epoch_0":
        assert start["epoch"] == 0, killed
    # resume from the run folder (its newest complete checkpoint), in the same folder
    metrics, objects = train(compose_config("train", [*args, f"ckpt_path={run}"], run))
    assert objects["trainer"].global_step == STEPS[data], killed
    assert_same_end(run, metrics, reference)


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes(
    references: dict, tmpdir_elsewhere: str, tmp_path: Path
) -> None:
    """SIGTERM once training runs: exit code 0, last.ckpt at the step it stopped, and the run
    resumed from its folder ends like the uninterrupted one, in the same W&B run (offline)."""
    run = tmp_path / "run"
    args = [*overrides("merged", "equal"), "logger=wandb"]
    process = launch(run, args, tmpdir_elsewhere)

    def terminate_once_training() -> None:
        while not (run / "checkpoints" / "last.ckpt").is_file():
            assert process.poll() is None, tail(run)
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 0, tail(run)

    with ThreadPoolExecutor(1) as pool:  # the reference trains while the process runs
        terminating = pool.submit(terminate_once_training)
        reference = references[("merged", "equal")]
        terminating.result()
    assert "SIGTERM: saved" in tail(run)
    saved = read_checkpoint(run / "checkpoints" / "last.ckpt", for_training=True)
    assert 0 < saved["global_step"] < STEPS["merged"]
    killed_run = json.loads((run / "wandb_run.json").read_text())["id"]
    metrics, objects = train(compose_config("train", [*args, f"ckpt_path={run}"], run))
    assert_same_end(run, metrics, reference)
    # the W&B run id survives the kill: one run, two offline sessions
    logger = next(lg for lg in objects["trainer"].loggers if type(lg).__name__ == "WandbLogger")
    assert logger.experiment.id == killed_run
    sessions = sorted((run / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith(f"-{killed_run}") for s in sessions)
    logger.finish()
