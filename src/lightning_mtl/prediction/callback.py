"""The Lightning callback of ``mtl-predict``: :class:`PredictionWriter` names each batch's samples
and hands every task's outputs to the writer of its kind; under DDP each rank writes its own
per-image files and rank 0 gathers the table rows (see :mod:`lightning_mtl.prediction`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_mtl.errors import ConfigError
from lightning_mtl.prediction.files import write_table
from lightning_mtl.prediction.writers import Sample, TaskWriter, WriterOptions, writer_class
from lightning_mtl.tasks import TaskSpec

log = logging.getLogger(__name__)


def batch_samples(
    batch: Mapping[str, Any], names: Sequence[str] | None, split: str
) -> list[Sample]:
    """The samples of a batch: a folder batch carries ``file`` and ``size``; a data-split batch
    (merged data) carries ``source`` and ``index`` and keeps its images' size."""
    images = batch["image"]
    if "file" in batch:
        return [
            Sample(str(file), (int(size[0]), int(size[1])))
            for file, size in zip(batch["file"], batch["size"], strict=True)
        ]
    if "source" not in batch or "index" not in batch:
        raise ConfigError(
            "predicting on a data split needs batches that name their samples ('source' and "
            "'index', as the template's data modules give): this data module's have "
            f"{sorted(batch)}; predict on a folder of images instead (input=path/to/images)"
        )
    size = (int(images.shape[-2]), int(images.shape[-1]))
    samples = []
    for source, index in zip(batch["source"].tolist(), batch["index"].tolist(), strict=True):
        name = names[source] if names is not None else str(source)
        samples.append(Sample(f"{name}/{split}/{index:06d}", size))
    return samples


class PredictionWriter(BasePredictionWriter):
    """Writes every task's predictions under ``folder`` (see :mod:`lightning_mtl.prediction`).

    ``names``: the data module's source names (data-split input), ``split``: its split, both for
    the sample names. After the run, ``written`` holds each task's output path and
    ``samples`` the number of predicted images (on rank 0).
    """

    def __init__(
        self,
        folder: Path,
        options: WriterOptions | None = None,
        names: Sequence[str] | None = None,
        split: str = "test",
    ) -> None:
        super().__init__(write_interval="batch")
        self.folder, self.options = Path(folder), options or WriterOptions()
        self.names, self.split = names, split
        self.writers: dict[str, TaskWriter] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.written: dict[str, str] = {}
        self.samples = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.prepare(pl_module.tasks)  # type: ignore[arg-type]

    def prepare(self, tasks: Sequence[TaskSpec]) -> None:
        """Build each task's writer, checking the class names and thresholds against the tasks
        (called by ``setup``; call it earlier to stop on a bad option before any work)."""
        unknown = (set(self.options.class_names) | set(self.options.thresholds)) - {
            t.name for t in tasks
        }
        if unknown:
            raise ConfigError(
                f"class_names / thresholds name tasks {sorted(unknown)} that the checkpoint "
                f"does not have; its tasks: {', '.join(t.name for t in tasks)}"
            )
        self.writers = {t.name: writer_class(t)(t, self.folder, self.options) for t in tasks}
        self.rows = {name: [] for name, w in self.writers.items() if w.table}

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        samples = batch_samples(batch, self.names, self.split)
        for name, writer in self.writers.items():
            output = prediction[name].detach().float().cpu()
            if writer.table:
                self.rows[name] += writer.rows(samples, output)
            else:
                for i, sample in enumerate(samples):
                    writer.write(sample, output[i])
        self.samples += len(samples)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        rows = {name: gather(trainer, part) for name, part in self.rows.items()}
        counts = gather(trainer, [self.samples])
        if not trainer.is_global_zero:
            return
        files: set[str] = set()
        for name, writer in self.writers.items():
            if writer.table:
                unique = {row["file"]: row for row in reversed(rows[name])}  # one row per file
                ordered = [unique[file] for file in sorted(unique)]
                files.update(unique)
                write_table(self.folder / f"{name}.csv", writer.columns(), ordered)
                self.written[name] = str(self.folder / f"{name}.csv")
            else:
                self.written[name] = str(self.folder / name)
        self.samples = len(files) if files else sum(counts)
        log.info("predictions of %d images written to %s", self.samples, self.folder)


def gather(trainer: L.Trainer, items: list[Any]) -> list[Any]:
    """Every rank's ``items``, concatenated (this rank's alone without a process group)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return list(items)
    parts: list[list[Any] | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, list(items))
    return [item for part in parts for item in (part or [])]
