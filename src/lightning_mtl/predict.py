"""Predict with a trained checkpoint: every task's output for a folder of images or a data split.

    mtl-predict ckpt_path=logs/train/runs/<date_time> input=path/to/images
    mtl-predict ckpt_path=logs/train/runs/<date_time>/checkpoints/last.ckpt   # the data's test split
    python -m lightning_mtl.predict ckpt_path=... input=... +class_names.dominant_color=[r,g,b,y,m,c]

The backbone, architecture and tasks are the checkpoint's (:func:`lightning_mtl.eval.saved_model`),
so no training override needs repeating; ``ckpt_path`` is a file or a run folder
(:func:`lightning_mtl.checkpointing.resolve_ckpt_path`). The batches run through
``trainer.predict`` and the module's ``predict_step``; :class:`~lightning_mtl.prediction.PredictionWriter`
writes each task's outputs under ``<output_dir>/predictions/`` in the form its kind calls for
(:mod:`lightning_mtl.prediction`), with ``summary.json`` naming the files, the inputs and the
checkpoint.

**Inputs.** ``input=<folder>`` reads every image below it (``.jpg .jpeg .png .bmp .webp .gif
.tif .tiff``, recursively; a single image file works too) with the reader of the training
sources (:func:`~lightning_mtl.data.sources.images.load_image`): RGB, the whole image resized
to the input size by the same interpolation (no crop), normalised with the statistics
``preprocess`` resolves. So the model sees an image as evaluation prepared it, and dense
outputs map back onto the image and are written at its own size. ``input=null`` predicts on the
data config's ``split`` (``test`` or ``val``), prepared as in evaluation.

**Preprocessing** (``configs/preprocess/default.yaml``, shared with ``mtl-export``): the mean, std
and size are those the model was trained with. ``data`` (the default) takes them from the data
config's evaluation split, after the backbone has handed the data its inputs
(:func:`~lightning_mtl.data.inputs.share_backbone_inputs`), exactly as training did: the
Shapes scenes' own statistics, or the backbone's for natural-image sources. So compose with the
data overrides the run was trained with, as for ``mtl-eval`` (a warning names the settings that
differ from the checkpoint's). ``backbone`` needs no data at all: the backbone's
(:func:`~lightning_mtl.data.inputs.backbone_input_config`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from lightning_mtl.checkpointing import with_safe_checkpoint_io
from lightning_mtl.cli import predict as main  # the console script: mtl-predict
from lightning_mtl.errors import ConfigError
from lightning_mtl.eval import checkpoint_model, load_weights
from lightning_mtl.prediction import (
    ImageFolder,
    InputSpec,
    PredictionWriter,
    SplitData,
    WriterOptions,
    reads_data,
    resolve_inputs,
    trained_datamodule,
    write_summary,
    writer_class,
)
from lightning_mtl.tasks import plain_container
from lightning_mtl.utils.setup import (
    apply_extras,
    set_float32_matmul_precision,
)

log = logging.getLogger(__name__)

SPLITS = ("test", "val")


# ------------------------------------------------------------------------------------ the run
@dataclass
class PredictResult:
    """Where the predictions went: ``folder``, each task's file or folder (``written``), the
    number of images, and ``trainer.predict``'s return value (with ``return_predictions``)."""

    folder: Path
    written: dict[str, str]
    samples: int
    inputs: InputSpec | None
    predictions: list[Any] | None = field(default=None, repr=False)


def writer_options(cfg: DictConfig) -> WriterOptions:
    names = plain_container(cfg.get("class_names")) or {}
    thresholds = plain_container(cfg.get("thresholds")) or {}
    for key, value in (("class_names", names), ("thresholds", thresholds)):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping task -> value, got {value!r}")
    for task, values in names.items():
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise ConfigError(f"class_names.{task}={values!r}: expected a list of names")
    return WriterOptions(class_names=names, thresholds=thresholds)


def predict(cfg: DictConfig, return_predictions: bool = False) -> PredictResult:
    """Predict every task of ``cfg.ckpt_path`` on ``cfg.input`` (a folder of images) or, when it
    is null, on the data config's ``cfg.split``; write the outputs under
    ``<paths.output_dir>/predictions``."""
    # The options and the input first: a mistake there stops before anything is built.
    split = str(cfg.get("split", "test"))
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: accepted values: {', '.join(SPLITS)}")
    options = writer_options(cfg)
    source = cfg.get("input")
    images = ImageFolder(source) if source is not None else None
    model, ckpt_path = checkpoint_model(cfg, "mtl-predict")
    apply_extras(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    set_float32_matmul_precision()

    folder = Path(cfg.paths.output_dir) / "predictions"
    preprocess = cfg.get("preprocess") or {}
    datamodule = None
    if source is None or reads_data(preprocess):
        datamodule = trained_datamodule(cfg, model, ckpt_path)

    inputs: InputSpec | None = None
    loaders: Any = None
    data: L.LightningDataModule | None = None
    if images is not None:
        inputs = resolve_inputs(preprocess, model, datamodule)
        images.inputs = inputs
        if any(not writer_class(task).table for task in model.tasks):
            images.check_distinct_stems()
        log.info("predicting %d images of %s (inputs %s)", len(images), source, inputs.as_dict())
        loaders = DataLoader(
            images,
            batch_size=int(cfg.batch_size),
            num_workers=int(cfg.num_workers),
            shuffle=False,
        )
        writer = PredictionWriter(folder, options)
    else:
        assert datamodule is not None
        data = SplitData(datamodule, split)
        names = getattr(datamodule, "names", None)
        writer = PredictionWriter(folder, options, names=names, split=split)
        log.info("predicting the %s split of %s", split, type(datamodule).__name__)

    writer.prepare(model.tasks)  # class names and thresholds checked before any work
    plugins = with_safe_checkpoint_io(hydra.utils.instantiate(cfg.trainer.get("plugins")))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=[writer], logger=False, plugins=plugins
    )
    # The weights only (weights_only=True, strict): prediction restores no training state.
    load_weights(model, ckpt_path)
    with warnings.catch_warnings():
        # the writer names samples from the batches themselves, not from Lightning's indices
        warnings.filterwarnings("ignore", "Couldn't infer the batch indices")
        predictions = trainer.predict(
            model=model, dataloaders=loaders, datamodule=data, return_predictions=return_predictions
        )
    if trainer.is_global_zero:
        summary = {
            "checkpoint": str(Path(ckpt_path).resolve()),
            "input": str(Path(source).expanduser().resolve()) if source is not None else None,
            "split": None if source is not None else split,
            "samples": writer.samples,
            "inputs": inputs.as_dict()
            if inputs is not None
            else f"the data config's {split} split",
            "tasks": {
                t.name: {
                    "kind": t.head.metric_kind,
                    "output": Path(writer.written[t.name]).relative_to(folder).as_posix(),
                }
                for t in model.tasks
            },
        }
        write_summary(folder / "summary.json", summary)
    kept = predictions if return_predictions else None
    return PredictResult(folder, dict(writer.written), writer.samples, inputs, kept)


if __name__ == "__main__":
    main()
