"""Data modules. A batch is ``{"image": B×C×H×W, "targets": {key: tensor}, "mask": {key: bool[B]}}``."""

from lightning_mtl.data.shapes import ShapesDataModule, ShapesDataset

__all__ = ["ShapesDataModule", "ShapesDataset"]
