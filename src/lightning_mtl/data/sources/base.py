"""The contract every source dataset honours, and small helpers they share.

A source dataset is a map-style ``torch.utils.data.Dataset`` built as
``Dataset(root=..., split="train"|"val"|"test", image_size=..., **its own options)``; item ``i``
is a dict::

    {"image": float32 C×H×W (normalised, see below),
     "targets": {target_key: tensor},     # only the keys this dataset labels
     "mask": {target_key: bool scalar}}   # False where this sample's label is missing

Class (or instance) attributes describe what it labels, for the task configs to be checked
against the data before training: ``target_names`` (tuple), ``num_classes`` (dict, for class
targets) and ``num_labels`` (dict, for multi-label targets). A dataset checks its files when
built (layout, counts, column numbers) and raises :class:`~lightning_mtl.errors.DataError`
naming the path, the problem, the expected layout and where to get the data; a file that turns
out corrupt when read raises the same error naming that file.

Normalisation and input size follow the backbone (``data/inputs.py``): a source that takes
``inputs`` (an :class:`~lightning_mtl.data.inputs.InputConfig`) and ``normalization`` keywords
receives the backbone's config from the data module, normalises with the statistics its
``normalization`` setting resolves to, and reads ``image_size: backbone`` as the backbone's
(H, W). No statistics are hard-coded here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_mtl.errors import DataError

SPLITS = ("train", "val", "test")


class SourceDataset(Dataset[dict[str, Any]]):
    """Base of the source datasets: what they label, for the start-up checks (set per class
    or per instance)."""

    target_names: tuple[str, ...] = ()
    num_classes: dict[str, int] = {}
    num_labels: dict[str, int] = {}


def check_split(split: str, accepted: Sequence[str], dataset: str) -> str:
    if split not in accepted:
        raise DataError(f"{dataset}: split={split!r} is not one of {', '.join(accepted)}")
    return split


def require(path: Path, dataset: str, layout: str, source: str) -> Path:
    """``path`` if it exists, else a DataError with the expected layout and where to get it."""
    if not path.exists():
        raise DataError(
            f"{dataset}: {path} not found.\nExpected layout:\n{layout}\nGet the data: {source}"
        )
    return path


def resize_image(image: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Bilinear resize of a C×H×W float image (None: keep its size)."""
    if size is None or tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def resize_dense(label: torch.Tensor, size: tuple[int, int] | None, nearest: bool) -> torch.Tensor:
    """Resize a H×W (class ids, nearest) or C×H×W (values, bilinear or nearest) dense label."""
    if size is None or tuple(label.shape[-2:]) == tuple(size):
        return label
    batched = label[None, None] if label.dim() == 2 else label[None]
    mode = "nearest" if nearest else "bilinear"
    kwargs = {} if nearest else {"align_corners": False}
    out = F.interpolate(batched.float(), size=size, mode=mode, **kwargs)
    out = out[0, 0] if label.dim() == 2 else out[0]
    return out.to(label.dtype)


def as_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = (int(v) for v in image_size)
    return (height, width)


def make_sample(
    image: torch.Tensor,
    targets: Mapping[str, Any],
    present: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """The sample dict of the contract; ``present`` marks missing labels (default: all there)."""
    tensors = {
        k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        for k, v in targets.items()
    }
    present = present or {}
    return {
        "image": image,
        "targets": tensors,
        "mask": {k: torch.tensor(bool(present.get(k, True))) for k in tensors},
    }
