"""Checkpoints you can trust: bad files refused with one message, atomic writes that survive a
crash mid-write, last.ckpt from the first steps on and on SIGTERM, resuming in the same run
folder with the run's checkpoint history (the true best checkpoint). Tiny Lightning models:
the kill/resume runs of the real template are in test_kill_resume.py (slow)."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from lightning_mtl.callbacks.last_checkpoint import LastCheckpoint
from lightning_mtl.checkpointing import (
    SafeCheckpointIO,
    atomic_save,
    newest_checkpoint,
    read_checkpoint,
    resolve_ckpt_path,
    run_folder,
    with_safe_checkpoint_io,
)
from lightning_mtl.checkpointing import files as checkpoint_files
from lightning_mtl.checkpointing.resume import output_dir
from lightning_mtl.errors import ConfigError, DataError
from lightning_mtl.eval import evaluate
from lightning_mtl.train import train


class Foreign:
    """A class a checkpoint of another program might pickle."""


class TinyModel(BoringModel):
    """BoringModel with this template's hyperparameter keys and a logged ``val/loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters({"backbone": {"name": "tiny"}, "tasks": {}, "weighting": {}})

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.step(batch))


def tiny_trainer(dirpath: Path, *callbacks: L.Callback, **options: Any) -> L.Trainer:
    """A CPU trainer with the template's two checkpoint callbacks and the safe checkpoint I/O
    (BoringModel: 64 training batches per epoch, we keep 6, and 2 validation batches)."""
    monitored = ModelCheckpoint(
        dirpath, "epoch_{epoch:03d}", monitor="val/loss", auto_insert_metric_name=False
    )
    return L.Trainer(
        accelerator="cpu",
        max_epochs=options.pop("max_epochs", 2),
        limit_train_batches=6,
        limit_val_batches=2,
        callbacks=[monitored, LastCheckpoint(dirpath, every_n_train_steps=2), *callbacks],
        plugins=with_safe_checkpoint_io(None),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two epochs of 6 steps: last.ckpt, epoch_NNN.ckpt and a copy of last.ckpt at step 4."""
    folder = tmp_path_factory.mktemp("tiny")
    seen: dict[int, int] = {}

    class ReadLast(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            last = folder / "checkpoints" / "last.ckpt"
            if last.is_file():
                seen[trainer.global_step] = torch.load(last, weights_only=True)["global_step"]

    L.seed_everything(0)
    trainer = tiny_trainer(folder / "checkpoints", ReadLast())
    trainer.fit(TinyModel())
    return {"folder": folder, "seen": seen, "trainer": trainer}


@pytest.fixture
def good(tiny_run: dict[str, Any]) -> Path:
    return tiny_run["folder"] / "checkpoints" / "last.ckpt"


def broken_files(folder: Path, good: Path) -> dict[str, Path]:
    """Files that are not checkpoints of this template, by what is wrong with them."""
    data = good.read_bytes()
    files = {
        "text": "not a torch checkpoint archive",
        "empty": "empty (0 bytes",
        "truncated": "not a torch checkpoint archive",
        "foreign": "holds a pickled Python object (tests.test_checkpoints.Foreign)",
        "other_program": "not a checkpoint of this template: no ['state_dict', 'hyper_parameters'",
    }
    paths = {name: folder / f"{name}.ckpt" for name in files}
    paths["text"].write_text("model weights: see the README\n")
    paths["empty"].write_bytes(b"")
    paths["truncated"].write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Foreign()}}, paths["foreign"])
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, paths["other_program"])
    return {files[name]: path for name, path in paths.items()}


def assert_one_clear_message(error: BaseException, path: Path, problem: str) -> None:
    message = str(error)
    assert str(path) in message and problem in message, message
    assert "mtl-train" in message  # what was expected
    assert "weights_only=False" not in message and "Traceback" not in message
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_files_that_are_not_checkpoints_are_refused_with_one_clear_message(
    good: Path, tmp_path: Path
) -> None:
    for problem, path in broken_files(tmp_path, good).items():
        with pytest.raises(DataError) as caught:
            read_checkpoint(path)
        assert_one_clear_message(caught.value, path, problem)
        with pytest.raises(DataError) as caught:  # Lightning's own load path (fit/test/validate)
            SafeCheckpointIO().load_checkpoint(path)
        assert_one_clear_message(caught.value, path, problem)
    weights_only = tmp_path / "weights_only.ckpt"
    saved = torch.load(good, weights_only=True)
    torch.save({k: v for k, v in saved.items() if k != "optimizer_states"}, weights_only)
    read_checkpoint(weights_only)  # evaluates
    with pytest.raises(DataError, match=r"no \['optimizer_states'\].*save_weights_only"):
        read_checkpoint(weights_only, for_training=True)  # does not resume training
    with pytest.raises(ConfigError, match="weights_only=True"):
        SafeCheckpointIO().load_checkpoint(good, weights_only=False)
    assert read_checkpoint(good, for_training=True)["global_step"] == 12


def test_train_and_eval_stop_on_a_bad_checkpoint_before_reading_data(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_cfg: Callable[..., DictConfig]
) -> None:
    text = broken_files(tmp_path, good)["not a torch checkpoint archive"]

    def no_data(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the data module was built before the checkpoint was checked")

    monkeypatch.setattr("lightning_mtl.data.ShapesDataModule.__init__", no_data)
    for name in ("train", "eval"):
        with pytest.raises(DataError, match="not a torch checkpoint archive"):
            (train if name == "train" else evaluate)(make_cfg(f"ckpt_path={text}", name=name))
    with pytest.raises(ConfigError, match="no such checkpoint file or run folder"):
        train(make_cfg(f"ckpt_path={tmp_path / 'nowhere'}"))


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer dies after writing part of the new checkpoint (with $TMPDIR on another
    filesystem): the previous file is untouched and loads, no partial file is left."""
    if Path("/dev/shm").is_dir():
        monkeypatch.setenv("TMPDIR", "/dev/shm")
    target = tmp_path / "checkpoints" / "last.ckpt"
    atomic_save(torch.load(good, weights_only=True), target)
    before = target.read_bytes()
    written: list[Path] = []

    def dies_mid_write(obj: Any, file: Any) -> None:
        written.append(Path(file.name))
        file.write(before[: len(before) // 3])
        file.flush()
        raise OSError("killed mid-write")

    monkeypatch.setattr(checkpoint_files.torch, "save", dies_mid_write)
    new = {**torch.load(good, weights_only=True), "global_step": 99}
    with pytest.raises(OSError, match="killed mid-write"):
        SafeCheckpointIO().save_checkpoint(new, target)
    assert written and written[0].parent == target.parent  # next to the target, not in $TMPDIR
    assert target.read_bytes() == before
    assert read_checkpoint(target, for_training=True)["global_step"] == 12
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    monkeypatch.undo()
    SafeCheckpointIO().save_checkpoint(new, target)
    assert read_checkpoint(target)["global_step"] == 99


def test_newest_complete_checkpoint_of_a_run_folder(
    good: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    older = folder / "epoch_000.ckpt"
    older.write_bytes(good.read_bytes())
    (folder / "last.ckpt").write_bytes(good.read_bytes()[:1000])  # newest, truncated
    (folder / ".last.ckpt.123.abc.tmp").write_bytes(b"partial")  # a write that was killed
    os.utime(older, ns=(1, 1))
    with caplog.at_level(logging.WARNING):
        assert newest_checkpoint(run) == older
    assert "last.ckpt" in caplog.text and "tmp" in caplog.text
    for given in (run, folder):
        assert resolve_ckpt_path(str(given), tmp_path / "new", for_training=True) == str(older)
    assert resolve_ckpt_path("last", run, for_training=True) == str(older)
    assert resolve_ckpt_path("last", tmp_path / "fresh", for_training=True) is None
    assert resolve_ckpt_path(None, run, for_training=True) is None
    older.unlink()
    with pytest.raises(DataError, match="no complete checkpoint"):
        resolve_ckpt_path(str(run), tmp_path, for_training=True)


def test_a_resumed_training_run_continues_in_its_run_folder(good: Path, tmp_path: Path) -> None:
    run = tmp_path / "logs" / "train" / "runs" / "2026-01-01_00-00-00"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(good.read_bytes())
    assert run_folder(str(run / "checkpoints" / "last.ckpt")) == run
    assert run_folder(str(run)) == run == run_folder(str(run / "checkpoints"))
    assert run_folder(str(good.parent.parent / "elsewhere.ckpt")) is None
    assert run_folder("last") is None
    for ckpt in (run / "checkpoints" / "last.ckpt", run):
        root = OmegaConf.create({"train": True, "ckpt_path": str(ckpt)})
        assert output_dir("new", _root_=root) == str(run)
    for root in ({"train": True, "ckpt_path": None}, {"ckpt_path": str(run)}, {"ckpt_path": "???"}):
        assert output_dir("new", _root_=OmegaConf.create(root)) == "new"  # fresh, eval (any)
    # composed as `mtl-train` composes it: Hydra's run dir is the resumed run's folder
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_mtl.utils.setup import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        for name, expected in (("train", str(run)), ("eval", None)):
            cfg = compose(name, [f"ckpt_path={run}"], return_hydra_config=True)
            resolved = str(cfg.hydra.run.dir)
            assert resolved == expected if expected else "/runs/" in resolved


def test_last_checkpoint_from_the_first_steps_and_at_every_epoch_end(
    tiny_run: dict[str, Any],
) -> None:
    """Every 2 steps before any validation (epoch 0 included), and the final state at the end;
    no last-v1.ckpt, and the monitored callback keeps its best file."""
    assert tiny_run["seen"][3] == 2 and tiny_run["seen"][5] == 4  # before the first validation
    folder = tiny_run["folder"] / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and names[0].startswith("epoch_") and names[1] == "last.ckpt"
    last = read_checkpoint(folder / "last.ckpt", for_training=True)
    assert last["global_step"] == 12 and last["epoch"] == 1
    monitored = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert Path(monitored["best_model_path"]).parent == folder


def test_resume_in_the_same_folder_keeps_the_best_checkpoint(
    tiny_run: dict[str, Any], tmp_path: Path
) -> None:
    """Crashed in epoch 1, resumed in the same folder from last.ckpt (epoch 0's end): the
    monitored callback's best path and score come back, no last-v1.ckpt, and the end equals the
    uninterrupted run's (BoringModel's loader is not resumable mid-epoch: resumed at an epoch
    end here; the template's mid-epoch resume is test_kill_resume.py's)."""

    class Crash(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 7:
                raise RuntimeError("crash")  # nothing saved now: last.ckpt is from step 6

    L.seed_everything(0)
    with pytest.raises(RuntimeError, match="crash"):
        tiny_trainer(tmp_path, Crash()).fit(TinyModel())
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 6
    restored: dict[str, Any] = {}

    class Restored(L.Callback):
        def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
            callback = trainer.checkpoint_callback
            restored.update(path=callback.best_model_path, score=callback.best_model_score)

    L.seed_everything(0)
    resumed = tiny_trainer(tmp_path, Restored())
    resumed.fit(TinyModel(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert restored["path"] == str(tmp_path / "epoch_000.ckpt") and restored["score"] is not None
    whole = tiny_run["trainer"]
    best, best_whole = resumed.checkpoint_callback, whole.checkpoint_callback
    assert Path(best.best_model_path).name == Path(best_whole.best_model_path).name
    assert best.best_model_score == best_whole.best_model_score
    whole_files = sorted(p.name for p in (tiny_run["folder"] / "checkpoints").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == whole_files
    for a, b in zip(
        resumed.lightning_module.parameters(), whole.lightning_module.parameters(), strict=True
    ):
        assert torch.equal(a, b)


def test_sigterm_saves_last_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    """SIGTERM mid-epoch: Lightning stops at the step boundary with exit code 0 and last.ckpt
    holds that step; resuming from it finishes the run like an uninterrupted one."""

    class Term(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    L.seed_everything(0)
    with pytest.raises(SystemExit) as caught:
        tiny_trainer(tmp_path, Term()).fit(TinyModel())
    assert caught.value.code in (None, 0)
    assert read_checkpoint(tmp_path / "last.ckpt", for_training=True)["global_step"] == 3
    L.seed_everything(0)
    resumed = tiny_trainer(tmp_path)
    resumed.fit(TinyModel(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.global_step == 12


def test_the_safe_checkpoint_io_is_added_unless_the_user_chose_one() -> None:
    assert isinstance(with_safe_checkpoint_io(None)[-1], SafeCheckpointIO)
    mine = TorchCheckpointIO()
    assert with_safe_checkpoint_io([mine]) == [mine]
    precision = L.pytorch.plugins.precision.Precision()
    plugins = with_safe_checkpoint_io(precision)
    assert plugins[0] is precision and isinstance(plugins[1], SafeCheckpointIO)
    with pytest.raises(ConfigError, match="every_n_train_steps=0"):
        LastCheckpoint("x", every_n_train_steps=0)
