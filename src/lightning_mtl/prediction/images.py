"""The inputs of ``mtl-predict``: a folder of images (:class:`ImageFolder`, :func:`image_files`)
or a data module's evaluation split served as predict data (:class:`SplitData`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import Dataset

from lightning_mtl.data.sources.images import IMAGE_SUFFIXES, is_image_file, load_image
from lightning_mtl.errors import ConfigError, DataError
from lightning_mtl.prediction.inputs import InputSpec


def image_files(folder: str | Path) -> list[Path]:
    """Every image file below ``folder`` (recursively, sorted), or ``[folder]`` for one image.

    Raises a ConfigError when the path does not exist and a DataError when it holds no image."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise ConfigError(f"input={str(folder)!r}: no such folder (expected a folder of images)")
    if root.is_file():
        if not is_image_file(root):
            raise ConfigError(
                f"input={str(folder)!r}: not an image file (accepted suffixes: "
                f"{', '.join(sorted(IMAGE_SUFFIXES))}); give a folder of images or one image"
            )
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise DataError(
            f"input={str(folder)!r}: no image file in this folder or its sub-folders (searched "
            f"for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


class ImageFolder(Dataset[dict[str, Any]]):
    """The images below ``root`` as ``{"image": C×H×W, "file": path relative to root, "size":
    (H, W) of the file}``, each read as the sources read their evaluation images
    (:func:`~lightning_mtl.data.sources.images.load_image`: RGB, resized to ``inputs.size`` by
    the same interpolation, normalised with ``inputs``' statistics), so the model sees what it
    was evaluated on. ``inputs`` may be set after the files are listed, once the model's inputs
    are known."""

    def __init__(self, root: str | Path, inputs: InputSpec | None = None) -> None:
        self.files = image_files(root)
        base = Path(root).expanduser()
        self.base = base if base.is_dir() else base.parent
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.files)

    def check_distinct_stems(self) -> None:
        """Dense outputs are named after the file without its suffix: ``a.png`` and ``a.jpg``
        in one folder would write the same mask; refuse such a folder, naming both files."""
        seen: dict[str, Path] = {}
        for path in self.files:
            stem = path.relative_to(self.base).with_suffix("").as_posix()
            if stem in seen:
                raise DataError(
                    f"input: {seen[stem]} and {path} would write the same per-image outputs "
                    f"({stem}.png, {stem}.npy): rename one of them"
                )
            seen[stem] = path

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.inputs is None:
            raise RuntimeError("ImageFolder.inputs is not set: the model's inputs are unknown")
        path = self.files[index]
        try:
            with Image.open(path) as image:  # the header only: the file's own size
                height, width = image.height, image.width
            pixels = load_image(path, self.inputs.size, "input", self.inputs.normalization)
        except DataError as error:  # load_image's, whose cause is PIL's error
            raise _unreadable(path, error.__cause__ or error) from error
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise _unreadable(path, error) from error
        return {
            "image": pixels,
            "file": path.relative_to(self.base).as_posix(),
            "size": torch.tensor([height, width]),
        }


def _unreadable(path: Path, error: BaseException) -> DataError:
    return DataError(
        f"cannot read image {path}: {error}. Expected a complete image file; remove it from the "
        "input folder or replace it"
    )


class SplitData(L.LightningDataModule):
    """A data module's evaluation split (``test`` or ``val``) served as predict data, built when
    the trainer asks (so under DDP each rank reads its own batches)."""

    def __init__(self, datamodule: L.LightningDataModule, split: str) -> None:
        super().__init__()
        self.datamodule, self.split = datamodule, split

    def setup(self, stage: str) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup("test" if self.split == "test" else "validate")

    def predict_dataloader(self) -> Any:
        return getattr(self.datamodule, f"{self.split}_dataloader")()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_before_batch_transfer(batch, dataloader_idx)
