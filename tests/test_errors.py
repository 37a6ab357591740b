"""Bad task, backbone, head, metric or weighting configs stop before training, naming the key."""

from __future__ import annotations

from collections.abc import Callable

import hydra
import pytest
from omegaconf import DictConfig, open_dict

from lightning_mtl.errors import ConfigError
from lightning_mtl.train import train


def build_and_check(cfg: DictConfig) -> None:
    """What train() does before creating the trainer."""
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    model.check_against_batch(datamodule.example_batch())


def config_error(cfg: DictConfig) -> str:
    with pytest.raises(Exception) as info:  # hydra wraps errors raised inside _target_ calls
        build_and_check(cfg)
    error = info.value
    while not isinstance(error, ConfigError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, ConfigError), f"expected a ConfigError, got {info.value!r}"
    return str(error)


def test_unknown_names_fail_with_the_key_and_accepted_values(
    make_cfg: Callable[..., DictConfig],
) -> None:
    message = config_error(make_cfg("model.backbone.name=resnet19"))
    assert "model.backbone.name='resnet19'" in message and "resnet18" in message

    message = config_error(make_cfg("tasks.segmentation.head.name=segmenter"))
    assert "tasks.segmentation.head.name='segmenter'" in message
    assert (
        "classification, dense_regression, multilabel, normals, regression, segmentation" in message
    )

    message = config_error(make_cfg("tasks.depth.metrics=[mae,miou]"))
    assert "tasks.depth.metrics='miou'" in message and "abs_rel, delta1, mae, rmse" in message

    message = config_error(make_cfg("tasks.count.loss.name=huber"))
    assert "tasks.count.loss.name='huber'" in message and "smooth_l1" in message

    message = config_error(make_cfg("weighting.name=gradnrom"))
    assert "weighting.name='gradnrom'" in message and "Did you mean 'gradnorm'" in message
    assert (
        "mgda_ub, modo, nash_mtl, pcd, pcgrad, rlw, sdmgrad, static, stch, uncertainty" in message
    )

    message = config_error(make_cfg("+tasks.segmentation.head.num_class=4"))
    assert "tasks.segmentation.head.name" in message and "num_class" in message


def test_task_without_loss_or_with_unknown_keys(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg()
    with open_dict(cfg):
        del cfg.tasks.count.loss
    message = config_error(cfg)
    assert "tasks.count.loss is missing" in message and "cross_entropy" in message
    cfg = make_cfg("+tasks.count.wieght=2")
    assert "tasks.count has unknown keys ['wieght']" in config_error(cfg)
    cfg = make_cfg(
        "+tasks.extra={head: {name: regression}, loss: mse, metrics: [mae], target: volume}"
    )
    message = config_error(cfg)
    assert (
        "tasks.extra.target='volume'" in message
        and "colors, count, depth, dominant_color, segmentation" in message
    )


def test_head_output_that_does_not_match_labels(make_cfg: Callable[..., DictConfig]) -> None:
    message = config_error(make_cfg("tasks.colors.head.num_labels=5"))
    assert "tasks.colors" in message and "(5,)" in message and "(6,)" in message
    message = config_error(make_cfg("tasks.count.head.out_dim=3"))
    assert "tasks.count" in message and "(3,)" in message and "(1,)" in message
    message = config_error(make_cfg("tasks.segmentation.head.num_classes=3"))
    assert "holds class 3" in message and "num_classes=3" in message
    message = config_error(make_cfg("tasks.depth.target=segmentation"))
    assert "tasks.depth" in message and "(1, 32, 32)" in message


def test_train_stops_before_the_trainer_exists(
    make_cfg: Callable[..., DictConfig], tmp_path
) -> None:
    with pytest.raises(ConfigError, match=r"tasks\.colors: the MultiLabelHead outputs \(4,\)"):
        train(make_cfg("tasks.colors.head.num_labels=4"))
    assert not (tmp_path / "csv").exists()  # no logger, no trainer, no step ran


def test_config_error_is_found_inside_hydra_wrappers(make_cfg: Callable[..., DictConfig]) -> None:
    """What `mtl-train` prints (no trace) when a `_target_` raises a ConfigError."""
    from lightning_mtl.errors import config_error_in

    with pytest.raises(Exception) as info:
        hydra.utils.instantiate(make_cfg("model.backbone.name=resnet19").model)
    assert not isinstance(info.value, ConfigError)  # Hydra's InstantiationException
    assert "resnet19" in str(config_error_in(info.value))
    assert config_error_in(ValueError("a library's own error")) is None
