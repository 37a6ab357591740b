"""Data modules. A batch is ``{"image": B×C×H×W, "targets": {key: tensor}, "mask": {key: bool[B]}}``
(merged data adds ``"source": int[B]``)."""

from lightning_mtl.data.merged import MergedDataModule
from lightning_mtl.data.merged_dataset import MergedDataset, collate_merged
from lightning_mtl.data.sampling import MultiSourceSampler
from lightning_mtl.data.shapes import ShapesDataModule, ShapesDataset, ShapesSource

__all__ = [
    "MergedDataModule",
    "MergedDataset",
    "MultiSourceSampler",
    "ShapesDataModule",
    "ShapesDataset",
    "ShapesSource",
    "collate_merged",
]
