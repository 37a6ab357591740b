"""The model report at the start of every fit: parameters shared by all tasks, by groups of tasks
and specific to each task, trainable and frozen, the balancer's own, and the forward FLOPs per
image (see :mod:`lightning_mtl.model_report` for how each is measured).

Where it goes: printed to the console and the run's log; sent to every logger as metrics at the
current step (``model/params/...``, ``model/flops_per_image``: columns of the CSV logger's
``metrics.csv``; in W&B also the run's summary); written as ``model_report.md`` in the run
directory (``trainer.default_root_dir``).

It also gives the module an ``example_input_array`` (one image of the data's size) in ``setup``,
so that Lightning's model summary shows each layer's FLOPs and input/output sizes instead of
"Total FLOPs: 0".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_mtl.model_report import ModelReport as Report
from lightning_mtl.model_report import backbone_stages, build_report
from lightning_mtl.utils.setup import example_batch

log = logging.getLogger(__name__)


class ModelReport(L.Callback):
    """Measure, print, log and save the model report once per fit, on global rank 0.

    Args:
        filename: the Markdown file written in ``dirpath`` (``None``: no file).
        dirpath: where to write it (``None``: ``trainer.default_root_dir``, the run directory).
        flops: also count the forward FLOPs per image (one extra forward of one image).
        summary_input: set ``pl_module.example_input_array`` (unless the module has one) so
            that Lightning's model summary counts FLOPs; off for a module that compiles its
            network (the summary's forward would compile it for a batch of one).
    """

    def __init__(
        self,
        filename: str | None = "model_report.md",
        dirpath: str | None = None,
        flops: bool = True,
        summary_input: bool = True,
    ) -> None:
        self.filename = filename
        self.dirpath = dirpath
        self.flops = flops
        self.summary_input = summary_input
        #: the last report measured (``None`` before the first fit, and on other ranks)
        self.report: Report | None = None
        self._image: torch.Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._image = _example_image(trainer, pl_module)
        if self._image is None or not self.summary_input:
            return
        if pl_module.example_input_array is None and not _compiles(pl_module):
            pl_module.example_input_array = self._image.clone()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Other callbacks freeze in ``setup``; this runs after all of them. Rank 0 only, and no
        # collective operation: the network is called directly, outside any DDP wrapper.
        if not trainer.is_global_zero:
            return
        net, tasks = getattr(pl_module, "net", None), getattr(pl_module, "tasks", None)
        image = self._image  # read in `setup`, which Lightning runs before every fit
        if net is None or tasks is None or image is None:
            log.info("model report: no network, tasks or example batch to measure; skipped")
            return
        names = [getattr(task, "name", task) for task in tasks]
        balancer = getattr(pl_module, "weighting", None)
        try:
            report = build_report(
                net, names, image, balancer, flops=self.flops, stages=backbone_stages(net)
            )
        except Exception as error:  # a diagnostic must not stop the run
            log.warning("model report skipped: %s: %s", type(error).__name__, error)
            return
        self.report = report
        log.info("\n%s", report.format())
        self._send(trainer, report)
        if self.filename:
            path = Path(self.dirpath or trainer.default_root_dir) / self.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(report.markdown())
            log.info("model report written to %s", path)

    def _send(self, trainer: L.Trainer, report: Report) -> None:
        """The numbers to every logger at the current step; W&B also keeps them in the run's
        summary (shown in its runs table)."""
        metrics: dict[str, float] = dict(report.as_metrics())  # the loggers' type: int counts
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(metrics)
            logger.save()


def _example_image(trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor | None:
    """One image (a batch of one) from the data module's example batch (its first source for
    merged data), else the module's ``example_input_array`` if it is an image tensor."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        batch = example_batch(datamodule)
        first = batch if isinstance(batch, Mapping) else batch[0]
        images = first.get("image") if isinstance(first, Mapping) else None
        if isinstance(images, torch.Tensor):
            return images[:1].detach().cpu()
    given = pl_module.example_input_array
    if isinstance(given, torch.Tensor) and given.dim() == 4:
        return given[:1].detach().cpu()
    return None


def _compiles(pl_module: L.LightningModule) -> bool:
    """Whether the module compiles its network (``model.compile=true``)."""
    hparams = getattr(pl_module, "hparams", {})
    return bool(hparams.get("compile", False)) if isinstance(hparams, Mapping) else False
