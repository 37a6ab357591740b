"""Train a multi-task model: the recipe, top to bottom.

mtl-train                                   # the default experiment (5 Shapes tasks)
mtl-train weighting=uncertainty task=[segmentation,depth] trainer=ddp_sim
python -m lightning_mtl.train experiment=shapes_convnext ckpt_path=logs/.../last.ckpt
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from lightning_mtl.data.inputs import share_backbone_inputs
from lightning_mtl.utils.setup import (
    apply_extras,
    configure_environment,
    example_batch,
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
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    set_float32_matmul_precision()

    log.info("Instantiating data <%s>", cfg.data._target_)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info("Instantiating model <%s>", cfg.model._target_)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    # The backbone's normalisation and input size reach the data transforms (no data read yet).
    share_backbone_inputs(datamodule, model)
    # Heads against labels on one real batch: a wrong task config stops here, not mid-epoch.
    model.check_against_batch(example_batch(datamodule))

    callbacks = instantiate_mapping(cfg.get("callbacks"), "callbacks")
    callbacks += instantiate_mapping({"finetune": cfg.get("finetune")}, "config")  # layer-wise
    loggers = instantiate_mapping(cfg.get("logger"), "logger")
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    log_hyperparameters(cfg, trainer)

    if cfg.get("train"):
        log.info("Training")
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics: dict[str, Any] = dict(trainer.callback_metrics)

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        # Without a best checkpoint (no training, or no checkpoint callback): the given one.
        ckpt_path = best or cfg.get("ckpt_path")
        log.info("Testing %s", ckpt_path or "the current weights")
        trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(trainer.callback_metrics)

    scalars = {key: float(value) for key, value in metrics.items()}
    return scalars, {"datamodule": datamodule, "model": model, "trainer": trainer}


def main() -> None:
    def run(cfg: DictConfig) -> float | None:
        metrics, _ = train(cfg)
        # A Hydra sweeper (e.g. Optuna) optimises the metric named by `optimized_metric`.
        name = cfg.get("optimized_metric")
        return metrics.get(name) if name else None

    hydra.main(version_base="1.3", config_path=configure_environment(), config_name="train")(run)()


if __name__ == "__main__":
    main()
