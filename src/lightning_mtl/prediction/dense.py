"""The writers of the dense kinds (segmentation, dense_regression, normals): outputs resized back
to each image's own size, then written as files per image (see :mod:`lightning_mtl.prediction`),
with the PNG encodings they use (a class palette, a colour map)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_mtl.checkpointing.files import atomic_write
from lightning_mtl.data.augment import unit_normals
from lightning_mtl.data.sources.base import resize_image
from lightning_mtl.prediction.writers import WRITERS, Sample, TaskWriter


class DenseWriter(TaskWriter):
    """Per-pixel outputs: resized to the image's own size, then one file (or two) per image
    under ``<predictions>/<task>/``, mirroring the input folder's sub-folders."""

    def resize(self, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """A C×H×W output at the image's (H, W), bilinear."""
        return resize_image(output.float(), size)

    def path(self, sample: Sample, suffix: str) -> Path:
        return self.folder / self.task.name / f"{sample.stem}{suffix}"


@WRITERS.register("segmentation")
class SegmentationWriter(DenseWriter):
    """Per-pixel class probabilities; written as a palette PNG of class indices (the palette
    tells classes apart in a viewer; the pixel values are the indices). More than 256 classes:
    a 16-bit greyscale PNG of the indices."""

    @staticmethod
    def activate(output: torch.Tensor) -> torch.Tensor:
        return output.float().softmax(dim=1)

    def write(self, sample: Sample, output: torch.Tensor) -> None:
        classes = self.resize(output, sample.size).argmax(dim=0).numpy()
        if self.size <= 256:
            image = Image.fromarray(classes.astype(np.uint8), mode="P")
            image.putpalette(palette(self.size))
        else:
            image = Image.fromarray(classes.astype(np.uint16))
        atomic_write(
            self.path(sample, ".png"), lambda f: image.save(f, format="PNG"), durable=False
        )


@WRITERS.register("dense_regression")
class DenseRegressionWriter(DenseWriter):
    """Per-pixel values (depth, ...): a float32 ``.npy`` (H×W for one channel, else C×H×W) and
    a PNG preview of the first channel, colour-mapped from its minimum to its maximum."""

    def write(self, sample: Sample, output: torch.Tensor) -> None:
        values = self.resize(output, sample.size).numpy().astype(np.float32)
        values = values[0] if values.shape[0] == 1 else values
        atomic_write(self.path(sample, ".npy"), lambda f: np.save(f, values), durable=False)
        preview = colour_map(values if values.ndim == 2 else values[0])
        atomic_write(
            self.path(sample, ".png"), lambda f: preview.save(f, format="PNG"), durable=False
        )


@WRITERS.register("normals")
class NormalsWriter(DenseWriter):
    """Unit surface normals: a float32 3×H×W ``.npy`` and an RGB PNG preview, each component
    mapped from [-1, 1] to [0, 255] (the usual normal-map colours)."""

    def resize(self, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return unit_normals(super().resize(output, size))

    def write(self, sample: Sample, output: torch.Tensor) -> None:
        normals = self.resize(output, sample.size).numpy().astype(np.float32)
        atomic_write(self.path(sample, ".npy"), lambda f: np.save(f, normals), durable=False)
        rgb = np.clip((normals.transpose(1, 2, 0) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
        preview = Image.fromarray(rgb, mode="RGB")
        atomic_write(
            self.path(sample, ".png"), lambda f: preview.save(f, format="PNG"), durable=False
        )


# ----------------------------------------------------------------------------------- encodings
def palette(classes: int) -> list[int]:
    """A flat RGB palette of 256 entries whose first ``classes`` colours differ: class 0 black,
    then the bits of the index spread over the high bits of R, G and B (the scheme of the
    PASCAL VOC masks), so neighbouring indices get clearly different colours."""
    colours = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours += [red, green, blue]
    return colours


def colour_map(values: np.ndarray, name: str = "viridis") -> Image.Image:
    """An H×W array as an RGB image through a matplotlib colour map, stretched from its minimum
    to its maximum (a constant map is drawn in the map's first colour)."""
    from matplotlib import colormaps

    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    rgba = colormaps[name](np.nan_to_num(scaled), bytes=True)
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]), mode="RGB")
