"""Every config file composes, resolves, and selects what its name says."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lightning_mtl.utils.setup import CONFIG_DIR
from tests.conftest import compose_config

GROUPS = ["data", "model", "weighting", "trainer", "callbacks", "logger", "debug", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_option_of_every_eval_group_composes_and_resolves(tmp_path: Path) -> None:
    """The evaluation config; train.yaml's groups: tests/test_switches.py (with the schema)."""
    composed = 0
    for group in (g for g in GROUPS if g not in {"callbacks", "debug"}):
        for option in options(group):
            cfg = compose_config("eval", [f"{group}={option}", "ckpt_path=x.ckpt"], tmp_path)
            container = OmegaConf.to_container(cfg, resolve=True)
            assert isinstance(container, dict)
            assert container["tasks"], f"eval {group}={option} has no tasks"
            assert container["model"]["tasks"] == container["tasks"]
            composed += 1
    assert composed >= 25


def test_task_group_is_a_multi_select_of_task_files(tmp_path: Path) -> None:
    cfg = compose_config("train", [], tmp_path)
    assert list(cfg.tasks) == ["segmentation", "depth", "count", "dominant_color", "colors"]
    cfg = compose_config("train", ["task=[depth,colors]"], tmp_path)
    assert list(cfg.tasks) == ["depth", "colors"]
    assert cfg.tasks.depth.head.name == "dense_regression"
    cfg = compose_config("train", ["experiment=single_task"], tmp_path)
    assert list(cfg.tasks) == ["segmentation"]
    cfg = compose_config("train", ["experiment=single_task", "task=[count]"], tmp_path)
    assert list(cfg.tasks) == ["count"]


def test_switches_select_what_they_name(tmp_path: Path) -> None:
    cfg = compose_config("train", ["weighting=uncertainty", "trainer=ddp_sim"], tmp_path)
    assert cfg.model.weighting.name == "uncertainty"
    assert (cfg.trainer.strategy, cfg.trainer.accelerator, cfg.trainer.devices) == ("ddp", "cpu", 2)
    cfg = compose_config(
        "train", ["trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"], tmp_path
    )
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 2)
    cfg = compose_config("train", ["debug=fdr"], tmp_path)
    assert cfg.trainer.fast_dev_run is True and cfg.data.num_workers == 0
    cfg = compose_config("train", ["experiment=shapes_priority"], tmp_path)
    assert cfg.weighting.name == "static" and cfg.weighting.weights.segmentation == 2.0
    cfg = compose_config("train", ["logger=wandb"], tmp_path)
    assert set(cfg.logger) == {"csv", "wandb"} and list(cfg.logger.wandb.tags) == ["shapes"]


def test_unknown_group_option_lists_the_accepted_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("train", ["weighting=nope"], tmp_path)
    message = str(err.value) + str(err.value.__cause__ or "")
    assert "weighting/nope" in message
    for accepted in ("equal", "static", "uncertainty"):
        assert accepted in message


def test_eval_requires_a_checkpoint(tmp_path: Path) -> None:
    cfg = compose_config("eval", [], tmp_path)
    assert OmegaConf.is_missing(cfg, "ckpt_path")


def test_override_of_an_absent_callback_is_skipped_not_fatal(tmp_path: Path) -> None:
    from lightning_mtl.utils.setup import instantiate_mapping

    cfg = compose_config("train", ["callbacks=none", "debug=overfit"], tmp_path)
    assert "_target_" not in cfg.callbacks.model_checkpoint  # only debug's `monitor` is there
    assert instantiate_mapping(cfg.callbacks, "callbacks") == []
    cfg = compose_config("train", ["weighting=static", "weighting.weights={depth: 0.3}"], tmp_path)
    assert cfg.model.weighting.weights.depth == 0.3
