"""Train a multi-task model: the recipe, top to bottom.

mtl-train                                   # the default experiment (5 Shapes tasks)
mtl-train weighting=uncertainty task=[segmentation,depth] trainer=ddp_sim
python -m lightning_mtl.train experiment=shapes_convnext ckpt_path=logs/train/runs/<date_time>
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from lightning_mtl.checkpointing import resolve_ckpt_path, with_safe_checkpoint_io
from lightning_mtl.cli import train as main  # the console script: mtl-train
from lightning_mtl.data.inputs import share_backbone_inputs, share_task_targets
from lightning_mtl.preflight import check_config, run_preflight
from lightning_mtl.results.record import record_run
from lightning_mtl.utils.setup import (
    apply_extras,
    drop_callbacks_that_need_a_logger,
    instantiate_mapping,
    log_hyperparameters,
    set_float32_matmul_precision,
)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit (and test) the model described by ``cfg``.

    Returns the final metrics and the objects of the run (``datamodule``, ``model``, ``trainer``).
    """
    apply_extras(cfg)
    # The config's values and task files, before anything is built (pre-flight, part 1).
    check_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    set_float32_matmul_precision()
    # A file, a run folder or `last` -> the checkpoint to resume from, checked now: a bad file
    # stops the run before any data is read or any step is trained.
    ckpt_path = resolve_ckpt_path(
        cfg.get("ckpt_path"), cfg.paths.output_dir, for_training=bool(cfg.get("train"))
    )

    log.info("Instantiating data <%s>", cfg.data._target_)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info("Instantiating model <%s>", cfg.model._target_)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    # The backbone's normalisation and input size reach the data transforms (no data read yet).
    share_backbone_inputs(datamodule, model)
    # Merged data reads only the sources that label the run's tasks (single-task baselines).
    share_task_targets(datamodule, model)
    # Pre-flight, part 2: labels, class counts, files and the heads on one real batch; every
    # problem is reported at once, before the trainer exists.
    run_preflight(cfg, datamodule, model)

    callbacks = instantiate_mapping(cfg.get("callbacks"), "callbacks")
    callbacks += instantiate_mapping({"finetune": cfg.get("finetune")}, "config")  # layer-wise
    loggers = instantiate_mapping(cfg.get("logger"), "logger")
    callbacks = drop_callbacks_that_need_a_logger(callbacks, loggers)  # `logger=none`
    # Atomic checkpoint writes next to the target, weights-only validated reads.
    plugins = with_safe_checkpoint_io(hydra.utils.instantiate(cfg.trainer.get("plugins")))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=plugins
    )
    log_hyperparameters(cfg, trainer)

    if cfg.get("train"):
        log.info("Training")
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics: dict[str, Any] = dict(trainer.callback_metrics)

    if cfg.get("test"):
        # Lightning's checkpoint_callback is its first ModelCheckpoint (typed as Checkpoint)
        callback = trainer.checkpoint_callback
        best = callback.best_model_path if isinstance(callback, ModelCheckpoint) else ""
        # Without a best checkpoint: the weights just trained, or the given checkpoint.
        ckpt_path = best or (None if cfg.get("train") else ckpt_path)
        log.info("Testing %s", ckpt_path or "the current weights")
        trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(trainer.callback_metrics)

    scalars = {key: float(value) for key, value in metrics.items()}
    # The run's identity and final metrics in the results store, for `mtl-report`.
    record_run(cfg, scalars, trainer)
    return scalars, {"datamodule": datamodule, "model": model, "trainer": trainer}


def optimized_metric(cfg: DictConfig) -> float | None:
    """Train, and return the metric named by ``optimized_metric`` (for a sweeper such as
    Optuna; None when the config names none)."""
    metrics, _ = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
