"""What the entry points share once a config is composed: instantiating lists, extras, logging the
config, printing it."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

# where the configs and the project root are (light, for the console scripts), re-exported here
from lightning_mtl.utils.locations import CONFIG_DIR as CONFIG_DIR
from lightning_mtl.utils.locations import PROJECT_ROOT as PROJECT_ROOT
from lightning_mtl.utils.locations import configure_environment as configure_environment

log = logging.getLogger(__name__)


def apply_extras(cfg: DictConfig) -> None:
    """Optional behaviours selected in ``extras``: warnings filter, printed config tree."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config_tree(cfg, save_to=Path(cfg.paths.output_dir) / "config_tree.log")


def instantiate_mapping(cfg: Mapping[str, Any] | None, what: str) -> list[Any]:
    """Instantiate every entry of a ``callbacks:`` or ``logger:`` block that has a ``_target_``."""
    objects = []
    for key, entry in (cfg or {}).items():
        if entry is None:
            continue
        if isinstance(entry, DictConfig) and "_target_" not in entry:
            # e.g. `callbacks=none debug=overfit`: an override of a callback that is not there
            log.warning("Skipping %s.%s: it has no _target_ (%s)", what, key, dict(entry))
            continue
        if not isinstance(entry, DictConfig):
            raise ValueError(f"{what}.{key} must be a mapping with a _target_, got {entry!r}")
        log.info("Instantiating %s <%s>", what, entry._target_)
        objects.append(hydra.utils.instantiate(entry))
    return objects


# Callbacks that Lightning refuses without a logger (they only log).
LOGGER_ONLY_CALLBACKS = (LearningRateMonitor,)


def drop_callbacks_that_need_a_logger(callbacks: list[Any], loggers: list[Any]) -> list[Any]:
    """Without a logger (``logger=none``) leave out the callbacks that only log and that
    Lightning refuses then (the learning-rate monitor), with an info line; else all of them."""
    if loggers:
        return callbacks
    kept = []
    for callback in callbacks:
        if isinstance(callback, LOGGER_ONLY_CALLBACKS):
            log.info("No logger: %s left out (it only logs)", type(callback).__name__)
            continue
        kept.append(callback)
    return kept


def example_batch(datamodule: L.LightningDataModule) -> dict[str, Any]:
    """A small real batch to check the tasks against: ``datamodule.example_batch()`` if it has
    one, else the first validation batch."""
    if hasattr(datamodule, "example_batch"):
        return datamodule.example_batch()
    datamodule.setup("validate")
    return next(iter(datamodule.val_dataloader()))


@rank_zero_only
def log_hyperparameters(cfg: DictConfig, trainer: L.Trainer) -> None:
    """Send the whole resolved config to every logger. (The parameter counts come from the
    model report, after layer-wise training has frozen what it freezes.)"""
    if not trainer.loggers:
        return
    params = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(params, dict)
    for logger in trainer.loggers:
        logger.log_hyperparams(cast("dict[str, Any]", params))  # a config: string keys


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> None:
    """Print the resolved config as a rich tree, groups in the order of the batch path."""
    import rich
    import rich.syntax
    import rich.tree

    order = ["data", "model", "tasks", "weighting", "callbacks", "logger", "trainer", "paths"]
    fields = [f for f in order if f in cfg] + [f for f in cfg if f not in order]
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    for field in fields:
        branch = tree.add(str(field), style="bold", guide_style="dim")
        value = cfg[field]
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        with save_to.open("w") as file:
            rich.print(tree, file=file)


def set_float32_matmul_precision() -> None:
    """Use TF32 tensor cores for float32 matmuls on GPUs that have them."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
