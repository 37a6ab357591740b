"""Reading one image file into the tensor every source dataset returns.

The image sources (CelebA, Office-31/Office-Home, a CSV over an image folder) all store plain
JPEG/PNG files, so they share one reader: decode with PIL, force 3 channels (grey and
palette/RGBA files exist in these datasets), resize to ``image_size`` and normalise with the
statistics the source resolved (the backbone's by default, see ``data/inputs.py``). A file PIL cannot open or decode (truncated download, a zero-byte file, an
HTML error page saved as ``.jpg``) is reported as a :class:`DataError` naming that file, instead
of an ``OSError`` from deep inside a data loader worker with no hint which sample broke.

On the train split a source may pass an :class:`~lightning_mtl.data.augment.ImageAugment`: its
random resized crop then replaces the resize (cropping the decoded file, not the resized image),
before flip, colour jitter and normalisation. :func:`verify_image` is the cheap check of the
pre-flight: it finds unreadable and truncated files without a full decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_mtl.data.augment import ImageAugment
from lightning_mtl.data.inputs import FALLBACK_NORMALIZATION, Normalization
from lightning_mtl.data.sources.base import resize_image
from lightning_mtl.errors import DataError

# Suffixes read as images when a dataset lists a folder (compared lower-case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image suffix (the file itself is not opened)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def image_augment(
    augment: bool,
    split: str,
    dataset: str,
    crop_scale: Sequence[float] | None = (0.8, 1.0),
    flip: bool = True,
    color_jitter: float = 0.0,
) -> ImageAugment | None:
    """A source's training augmentation: None when ``augment`` is off or the split is not
    ``train``. The options are checked whatever the split, so one config fails on every split."""
    built = ImageAugment(crop_scale, flip, color_jitter, dataset)
    return built if bool(augment) and split == "train" else None


def load_image(
    path: Path,
    size: tuple[int, int] | None,
    dataset: str,
    normalization: Normalization | None = None,
    augment: ImageAugment | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The image at ``path`` as a normalised float32 3×H×W tensor of size ``size`` (H, W).

    ``normalization``: the source's statistics; None, only for a reader with no backbone in
    sight, uses :data:`~lightning_mtl.data.inputs.FALLBACK_NORMALIZATION`. ``size=None``
    keeps the file's own size. For JPEG files PIL is first asked for a reduced
    decode (``draft``) no smaller than ``size``, which makes large photos (Office-31's DSLR
    images are 1000×1000) several times cheaper to read and softens the aliasing of the
    bilinear downscale that follows. ``augment`` (training) crops, flips and jitters the
    decoded image as drawn from ``seed`` instead of the plain resize. Raises
    :class:`DataError` naming the file when it is missing, unreadable or corrupt.
    """
    try:
        with Image.open(path) as image:
            if size is not None:
                # No-op for formats other than JPEG; keeps the decode at least `size` large.
                image.draft("RGB", (size[1], size[0]))
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise _unreadable(path, dataset, error) from error
    # H×W×3 uint8 -> 3×H×W float in [0, 1]; copy() because np.asarray of a PIL image is read-only.
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    tensor = augment(tensor, size, seed) if augment is not None else resize_image(tensor, size)
    return (normalization or FALLBACK_NORMALIZATION)(tensor)


def verify_image(path: Path, dataset: str) -> None:
    """Check that ``path`` is a complete, decodable image, more cheaply than :func:`load_image`.

    A JPEG is decoded at 1/8 scale (``draft``): the whole entropy-coded stream is still read,
    so truncation and corrupt data are found, at a fraction of the full decode's cost. A PNG is
    checked by ``Image.verify`` (every chunk's CRC, to the end marker) without decoding pixels.
    Other formats are decoded. Raises :class:`DataError` naming the file.
    """
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft(image.mode, (1, 1))
                image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise _unreadable(path, dataset, error) from error


def _unreadable(path: Path, dataset: str, error: Exception) -> DataError:
    return DataError(
        f"{dataset}: cannot read image {path}: {error}. The file is missing, corrupt or "
        "truncated (an interrupted download?); expected a complete JPEG/PNG image: download it "
        "again, or remove it from the dataset's lists."
    )
