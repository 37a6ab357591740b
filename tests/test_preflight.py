"""The pre-flight check: a catalogue of bad configs and files, each stopped before training with
the key or file named, every problem of a run in one error; its modes and its speed."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import Dataset

from lightning_mtl.data import MergedDataModule
from lightning_mtl.data.inputs import share_backbone_inputs
from lightning_mtl.data.sources.csv_folder import CsvImageFolder
from lightning_mtl.errors import ConfigError, DataError
from lightning_mtl.preflight import config_problems, headers, run_preflight
from lightning_mtl.preflight.scan import sample_indices
from lightning_mtl.train import train
from lightning_mtl.utils.setup import CONFIG_DIR
from tests.conftest import FAST, compose_config
from tests.test_sources_images import COLUMNS, write_csv


class TinySource(Dataset):
    """``length`` 32×32 images labelled ``label`` (class ``i % classes``) and ``size`` (a
    regression value, NaN at ``nan_at``); item ``broken_at`` cannot be read."""

    target_names = ("label", "size")

    def __init__(
        self,
        split: str = "train",
        num_classes: int = 3,
        classes: int = 3,
        length: int = 6,
        nan_at: int | None = None,
        broken_at: int | None = None,
    ) -> None:
        self.num_classes = {"label": num_classes}
        self.classes, self.length, self.nan_at, self.broken_at = classes, length, nan_at, broken_at

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i == self.broken_at:
            raise OSError(f"tiny/{i}.png: cannot identify image file")
        size = float("nan") if i == self.nan_at else float(i)
        targets = {"label": torch.tensor(i % self.classes), "size": torch.tensor([size])}
        return {
            "image": torch.rand(3, 32, 32),
            "targets": targets,
            "mask": {k: torch.tensor(True) for k in targets},
        }


class TableSource(TinySource):
    """A TinySource that offers a label table and a cheap file check, like the real sources."""

    def label_values(self, key: str) -> torch.Tensor | None:
        return torch.arange(self.length) % self.classes if key == "label" else None

    def verify(self, index: int) -> None:
        if index == self.broken_at:
            raise DataError(f"tiny/{index}.png is truncated")


def error_of(call: Callable[[], Any], kind: type[Exception] = ConfigError) -> str:
    with pytest.raises(kind) as info:
        call()
    return str(info.value)


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    """A model with a class task on ``label`` and a regression task on ``size``."""
    cfg = compose_config("train", [*FAST, "task=[dominant_color,count]"])
    with open_dict(cfg):
        cfg.tasks.dominant_color.target = "label"
        cfg.tasks.dominant_color.head.num_classes = 3
        cfg.tasks.count.target = "size"
    return hydra.utils.instantiate(cfg.model)


def merged(**sources: dict[str, Any]) -> MergedDataModule:
    factories = {name: functools.partial(TinySource, **kw) for name, kw in sources.items()}
    return MergedDataModule(factories, batch_size=2)


# ------------------------------------------------------------------------- the config alone


@pytest.fixture(scope="module")
def fast_cfg() -> DictConfig:
    return compose_config("train", FAST)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("data.batch_size", 0, "data.batch_size: 0; expected an integer >= 1"),
        ("data.batch_size", -1, "data.batch_size: -1; expected an integer >= 1"),
        ("model.optimizer.lr", -0.001, "model.optimizer.lr: -0.001; expected a number > 0"),
        ("tasks.colors.head.dropout", 1.5, "tasks.colors.head.dropout: 1.5; expected a number"),
        ("model.scheduler.warmup_fraction", 2, "model.scheduler.warmup_fraction: 2; expected"),
        ("trainer.precision", 17, "trainer.precision: 17; expected one of 64, 32, 16"),
        ("trainer.precision", "fp8", "trainer.precision: 'fp8'; expected one of"),
        ("trainer.devices", 0, "trainer.devices: 0; expected"),
        ("data.num_workers", -2, "data.num_workers: -2; expected an integer >= 0"),
        ("trainer.max_epochs", 1.5, "trainer.max_epochs: 1.5; expected"),
        ("trainer.accumulate_grad_batches", 0, "trainer.accumulate_grad_batches: 0; expected"),
        ("preflight.mode", "quick", "preflight.mode: 'quick'; expected one of fast, exhaustive"),
    ],
)
def test_schema_names_key_value_and_expectation(
    fast_cfg: DictConfig, key: str, value: Any, named: str
) -> None:
    cfg = fast_cfg.copy()
    OmegaConf.update(cfg, key, value, force_add=True)
    problems = [str(p) for p in config_problems(cfg)]
    assert len(problems) == 1 and named in problems[0], problems


def test_shipped_defaults_break_no_rule() -> None:
    assert config_problems(compose_config("train", [])) == []


def _compose_from(config_dir: Path, overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
        return compose(config_name="train", overrides=overrides)


def test_task_file_without_its_package_line_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    body = (CONFIG_DIR / "task" / "count.yaml").read_text().replace("# @package tasks\n", "")
    (configs / "task" / "volume.yaml").write_text(body.replace("count:", "volume:", 1))
    monkeypatch.setattr(headers, "config_dirs", lambda: [configs])
    cfg = _compose_from(configs, [*FAST, "task=[segmentation,volume]"])
    assert list(cfg.tasks) == ["segmentation"] and "volume" in cfg.task  # what Hydra does
    message = error_of(lambda: train(cfg))
    assert str(configs / "task" / "volume.yaml") in message and "# @package tasks" in message
    assert "volume" in message and not (tmp_path / "csv").exists()


# ------------------------------------------------------------------------- config and data


def test_every_problem_of_a_run_in_one_error_before_training(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """The issue's case (dominant_color has 6 classes, the head 5) with two config mistakes."""
    cfg = make_cfg(
        "tasks.dominant_color.head.num_classes=5",
        "model.optimizer.lr=-1",
        "trainer.precision=17",
    )
    message = error_of(lambda: train(cfg))
    assert "model.optimizer.lr: -1" in message and "trainer.precision: 17" in message
    assert "tasks.dominant_color.head.num_classes: 5, but the data declares 6" in message
    assert "tasks.dominant_color: label 'dominant_color' of source" in message
    assert "holds 5" in message and "expected class ids in [0, 5)" in message
    assert not (tmp_path / "csv").exists() and not (tmp_path / "checkpoints").exists()


def test_label_key_missing_from_the_data(tiny_model: Any) -> None:
    data = merged(a={})
    tasks = tiny_model.tasks
    old = tasks[1].target
    tasks[1].target = "volume"
    try:
        message = error_of(lambda: run_preflight(None, data, tiny_model))
    finally:
        tasks[1].target = old
    assert "tasks.count.target: 'volume' is not a label of the data" in message
    assert "expected one of the data's labels: label, size" in message


def test_sources_that_disagree_on_a_class_count(tiny_model: Any) -> None:
    message = error_of(lambda: run_preflight(None, merged(a={}, b={"num_classes": 4}), tiny_model))
    assert "label 'label' has num_classes=3 in source 'a' but 4 in 'b'" in message


def test_scan_finds_class_ids_nan_and_unreadable_samples_in_every_split(tiny_model: Any) -> None:
    data = merged(a={"classes": 5, "nan_at": 2}, b={"broken_at": 4})
    message = error_of(lambda: run_preflight(None, data, tiny_model), DataError)
    for split in ("train", "val", "test"):
        where = f"label 'label' of source 'a' ({split} split), sample 3: holds 3 .. 4"
        assert where in message
        assert f"label 'size' of source 'a' ({split} split), sample 2: holds nan" in message
        assert f"source 'b' ({split} split), sample 4: tiny/4.png: cannot identify" in message
    assert "expected finite values" in message


def test_bad_samples_are_a_warning_under_on_bad_sample_skip(
    tiny_model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Training leaves them out (data.on_bad_sample=skip); a class id past the head still stops."""
    broken = functools.partial(TinySource, nan_at=2, broken_at=4)
    with caplog.at_level(logging.WARNING, logger="lightning_mtl.preflight"):
        run_preflight(None, MergedDataModule({"b": broken}, on_bad_sample="skip"), tiny_model)
    assert "6 bad sample(s), left out during training" in caplog.text
    assert "source 'b' (val split), sample 4: tiny/4.png" in caplog.text
    wrong = functools.partial(TinySource, classes=4, broken_at=4)
    data = MergedDataModule({"b": wrong}, on_bad_sample="skip")
    assert "holds 3" in error_of(lambda: run_preflight(None, data, tiny_model))


def test_corrupt_image_in_a_source_is_named(tmp_path: Path, tiny_model: Any) -> None:
    write_csv(tmp_path)
    (tmp_path / "faces" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    factory = functools.partial(
        CsvImageFolder,
        root=tmp_path,
        columns=COLUMNS,
        image_size=32,
        normalization={"mean": [0.5] * 3, "std": [0.5] * 3},
    )
    data = MergedDataModule({"faces": {"dataset": factory, "rename": {"gender": "label"}}})
    tasks = tiny_model.tasks
    tiny_model.tasks = [tasks[0]]  # the class task only (csv's 'gender', renamed 'label')
    try:
        message = error_of(lambda: run_preflight(None, data, tiny_model), DataError)
    finally:
        tiny_model.tasks = tasks
    assert "source 'faces' (train split), sample 0" in message and "faces/a.jpg" in message


def test_label_tables_and_file_checks_of_a_source_are_used(tiny_model: Any) -> None:
    data = MergedDataModule({"t": functools.partial(TableSource, classes=5, broken_at=4)})
    cfg = OmegaConf.create({"preflight": {"mode": "fast", "max_samples": 2, "progress": False}})
    message = error_of(lambda: run_preflight(cfg, data, tiny_model), DataError)
    assert (
        "label 'label' of source 't' (val split), row 3 of its label table: holds 3 .. 4" in message
    )
    assert "source 't' (test split), sample 4: tiny/4.png is truncated" in message


# ------------------------------------------------------------------------- modes and speed


def test_modes_read_what_they_say(tiny_model: Any) -> None:
    options = {"max_samples": 4, "progress": False}
    data = merged(a={"length": 10})
    cfg = OmegaConf.create({"preflight": {"mode": "fast", **options}})
    assert run_preflight(cfg, data, tiny_model).samples_read == 3 * 4
    cfg.preflight.mode = "exhaustive"
    assert run_preflight(cfg, data, tiny_model).samples_read == 3 * 10
    cfg.preflight.mode = "skip"
    assert run_preflight(cfg, merged(a={"classes": 5, "length": 10}), tiny_model) is None
    assert sample_indices(10, 4) == [0, 3, 6, 9] and sample_indices(3, 4) == [0, 1, 2]


def test_default_run_preflight_takes_seconds() -> None:
    cfg = compose_config("train", ["data.num_workers=0", "preflight.progress=false"])
    data, model = hydra.utils.instantiate(cfg.data), hydra.utils.instantiate(cfg.model)
    share_backbone_inputs(data, model)
    start = time.perf_counter()
    stats = run_preflight(cfg, data, model)
    seconds = time.perf_counter() - start
    print(f"pre-flight on the default run: {seconds:.2f} s ({stats})")
    assert stats is not None and stats.samples_read == 3 * 256
    assert seconds < 60


@pytest.mark.slow  # a fresh interpreter imports torch, Lightning and timm (~10-20 s)
def test_cli_exits_non_zero_with_the_message_and_no_trace(tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    body = (CONFIG_DIR / "task" / "count.yaml").read_text().replace("# @package tasks\n", "")
    (extra / "task").mkdir(parents=True)
    (extra / "task" / "volume.yaml").write_text(body.replace("count:", "volume:", 1))
    command = [
        sys.executable,
        "-m",
        "lightning_mtl.train",
        "data.batch_size=0",
        "task=[count,volume]",
        "extras.print_config=false",
        f"hydra.searchpath=[file://{extra}]",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "data.batch_size: 0; expected an integer >= 1" in result.stderr
    assert str(extra / "task" / "volume.yaml") in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_split_where_no_row_labels_a_task_passes_the_label_check() -> None:
    """A CSV whose test split leaves a task's cells empty (the README's own-data example): its
    label table has no row for the task, which is nothing to check, not a crash."""
    from lightning_mtl.models.backbone import FeatureInfo
    from lightning_mtl.preflight.labels import LabelRule
    from lightning_mtl.tasks import build_tasks

    tasks = build_tasks(
        {
            "cls": {
                "head": {"name": "classification", "num_classes": 3},
                "loss": "cross_entropy",
                "metrics": ["accuracy"],
            }
        },
        FeatureInfo((8,), (32,)),
    )
    rule = LabelRule(tasks[0])
    rule.check_table("csv/test", torch.empty(0, dtype=torch.long))
    assert rule.findings == {}
    rule.check_table("csv/train", torch.tensor([0, 2, 3]))  # 3 is out of range
    assert rule.findings["csv/train"].count == 1 and rule.findings["csv/train"].sample == 2
