"""Evaluate a checkpoint on the validation and test splits.

    mtl-eval ckpt_path=logs/train/runs/<date>/checkpoints/last.ckpt
    mtl-eval ckpt_path=logs/train/runs/<date>      # the run's newest complete checkpoint

The backbone, architecture, tasks and weighting are those saved in the checkpoint's
hyperparameters, so no training override needs repeating; data, trainer and logger come from the eval config. The
weights (the balancer's state included) are loaded strictly, with ``weights_only=True``; a file
that is not a checkpoint of this template stops the run with one message naming it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from lightning_mtl.checkpointing import read_checkpoint, resolve_ckpt_path, with_safe_checkpoint_io
from lightning_mtl.cli import evaluate as main  # the console script: mtl-eval
from lightning_mtl.data.inputs import share_backbone_inputs, share_task_targets
from lightning_mtl.errors import ConfigError
from lightning_mtl.module import MultiTaskModule
from lightning_mtl.utils.setup import (
    apply_extras,
    instantiate_mapping,
    log_hyperparameters,
    set_float32_matmul_precision,
)

log = logging.getLogger(__name__)


SAVED_KEYS = ("backbone", "architecture", "tasks", "weighting")


def saved_model(ckpt_path: str) -> dict[str, Any]:
    """The backbone, architecture, tasks and weighting a checkpoint was trained with (from its
    hyperparameters). They override the eval config's, so ``mtl-eval ckpt_path=...`` needs no
    training overrides."""
    saved = read_checkpoint(ckpt_path, mmap=True)["hyper_parameters"]
    missing = set(SAVED_KEYS) - set(saved)
    if missing:
        log.warning("%s has no %s hyperparameters: using the config's", ckpt_path, sorted(missing))
    return {key: saved[key] for key in SAVED_KEYS if key in saved}


def checkpoint_model(cfg: DictConfig, command: str) -> tuple[MultiTaskModule, str]:
    """The model of ``cfg.ckpt_path`` (a file or a run folder), built from the checkpoint's saved
    backbone, architecture, tasks and weighting, without its weights yet (:func:`load_weights`).
    Returns the model and the checkpoint file."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.get("ckpt_path") is None:
        raise ConfigError(
            f"ckpt_path is required: {command} ckpt_path=logs/train/runs/<date_time> (a run "
            "folder) or a .ckpt file"
        )
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir, for_training=False)
    if ckpt_path is None or not Path(ckpt_path).is_file():
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path!r}: expected a checkpoint file or a run folder"
        )
    model: MultiTaskModule = hydra.utils.instantiate(cfg.model, **saved_model(ckpt_path))
    return model, ckpt_path


def load_weights(model: L.LightningModule, ckpt_path: str) -> None:
    """The checkpoint's weights into ``model``, strictly (read with ``weights_only=True``,
    memory-mapped: the optimizer states a training checkpoint also holds are not loaded)."""
    model.load_state_dict(read_checkpoint(ckpt_path, mmap=True)["state_dict"])


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validate and test the checkpoint ``cfg.ckpt_path``; return the metrics."""
    # A file or a run folder (its newest complete checkpoint), checked before anything else.
    model, ckpt_path = checkpoint_model(cfg, "mtl-eval")
    apply_extras(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    set_float32_matmul_precision()

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    share_backbone_inputs(datamodule, model)  # the backbone's normalisation and input size
    share_task_targets(datamodule, model)  # merged data: the sources that label the tasks
    loggers = instantiate_mapping(cfg.get("logger"), "logger")
    plugins = with_safe_checkpoint_io(hydra.utils.instantiate(cfg.trainer.get("plugins")))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers, plugins=plugins)
    log_hyperparameters(cfg, trainer)

    metrics: dict[str, float] = {}
    for run in (trainer.validate, trainer.test):
        for results in run(model=model, datamodule=datamodule, ckpt_path=ckpt_path):
            metrics.update({key: float(value) for key, value in results.items()})
    return metrics


if __name__ == "__main__":
    main()
