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

**Reading a sample: ``load(index, draw)``.** A source implements :meth:`SourceDataset.load`;
``dataset[i]`` is ``load(i, None)``. On the train split a source with ``augment`` on transforms
each access with a generator seeded from ``(seed, index, draw)`` (:mod:`lightning_mtl.data.augment`);
val and test never augment and ignore ``draw``. ``draw`` is a non-negative integer that tells
the accesses of one index apart: the data module passes one derived from the sampler's position
(e.g. the sample's place in its source's stream, unique across epochs), so the augmentation of
every step is a pure function of the run's seed and position: the same in every DataLoader
worker, after a resume, and under DDP. ``draw=None`` (plain ``dataset[i]``) takes the next value
of a per-instance access counter, mixed with the DataLoader worker's seed inside a worker: two
reads of one index differ, a fresh dataset with the same seed repeats the same sequence, but a
resumed run does not continue it. (A ``set_epoch`` on the dataset was rejected: persistent
DataLoader workers hold copies of the dataset that a call in the main process never reaches,
and the epoch alone does not tell apart two reads of one index within an epoch.)

**Cheap checks for the pre-flight.** ``verify(index)`` checks sample ``index``'s files are
readable and of the declared shape as cheaply as the format allows (array headers through
``np.load(mmap_mode="r")``, images through PIL with a reduced decode that still reaches the end
of the file, so a truncated JPEG is found), raising :class:`~lightning_mtl.errors.DataError`
naming the file, what is wrong and what was expected; the default is a full :meth:`load`.
``label_values(key)`` gives every value of a class (int64 (N,)) or multi-label (float 0/1
(N, L)) label over the split, read from the one table that holds them (CelebA's attribute list,
the CSV, Office's folder names), labelled samples only; None where the labels are in per-sample
files (the default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_mtl.data.augment import access_seed
from lightning_mtl.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


class SourceDataset(Dataset[dict[str, Any]]):
    """Base of the source datasets: what they label, for the start-up checks (set per class
    or per instance), and the reading contract of the module docstring."""

    target_names: tuple[str, ...] = ()
    num_classes: dict[str, int] = {}
    num_labels: dict[str, int] = {}
    #: seeds the training augmentation (and a source's own split, where it makes one)
    seed: int = 0
    _accesses: int = 0  # reads with draw=None so far, for their augmentation

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index, None)

    def load(self, index: int, draw: int | None = None) -> dict[str, Any]:
        """Sample ``index``; on the train split with augmentation on, augmented as ``draw``
        says (None: the next of this instance's accesses)."""
        raise NotImplementedError(f"{type(self).__name__} must implement load(index, draw)")

    def access_seed(self, index: int, draw: int | None) -> int:
        """The seed of one access's augmentation: a function of ``(seed, index, draw)``, or
        with ``draw=None`` of ``(seed, index, worker seed, access count)``."""
        if draw is None:
            worker = torch.utils.data.get_worker_info()
            count = self._accesses
            self._accesses = count + 1
            return access_seed(self.seed, index, 1, worker.seed if worker else 0, count)
        if isinstance(draw, bool) or int(draw) < 0:
            raise ValueError(f"draw={draw!r} must be a non-negative integer")
        return access_seed(self.seed, index, 0, int(draw))

    def plain_reads(self, index: int) -> int:
        """How many reads of ``index`` with ``draw=None`` this instance made before this one (in
        this process or worker), counting it: lets a source make consecutive plain reads of one
        sample differ for sure (see :meth:`~lightning_mtl.data.augment.DenseAugment.cycle`)."""
        reads: dict[int, int] = self.__dict__.setdefault("_plain_reads", {})
        count = reads.get(index, 0)
        reads[index] = count + 1
        return count

    def verify(self, index: int) -> None:
        """Raise :class:`DataError` if sample ``index``'s files are unreadable or of the wrong
        shape. The default reads it fully (with a fixed draw: the access counter is untouched;
        a subclass that defines only ``__getitem__`` is read through it)."""
        if type(self).load is SourceDataset.load:
            self[index]
        else:
            self.load(index, 0)

    def label_values(self, key: str) -> torch.Tensor | None:
        """Every value of class or multi-label ``key`` over the split, when one table holds them
        (read cheaply, labelled samples only); None otherwise."""
        return None


def check_split(split: str, accepted: Sequence[str], dataset: str) -> str:
    if split not in accepted:
        raise DataError(f"{dataset}: split={split!r} is not one of {', '.join(accepted)}")
    return split


def check_seed(seed: int, dataset: str) -> int:
    """A non-negative integer seed, else a ConfigError naming it."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(
            f"{dataset}: seed={seed!r} must be a non-negative integer (it seeds the split and "
            "the augmentation)"
        )
    return int(seed)


def require(path: Path, dataset: str, layout: str, source: str) -> Path:
    """``path`` if it exists, else a DataError with the expected layout and where to get it."""
    if not path.exists():
        raise DataError(
            f"{dataset}: {path} not found.\nExpected layout:\n{layout}\nGet the data: {source}"
        )
    return path


#: How every source resizes its images (:func:`resize_image`): torch's bilinear interpolation
#: with ``align_corners=False`` and no antialiasing. Prediction reads its images the same way, and
#: an export's ``model.json`` states it, so a consumer feeds the model what it was trained on.
IMAGE_RESIZE: Final[Mapping[str, str | bool]] = MappingProxyType(
    {"interpolation": "bilinear", "antialias": False, "align_corners": False}
)


def resize_image(image: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Resize a C×H×W float image as :data:`IMAGE_RESIZE` says (None: keep its size)."""
    if size is None or tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(
        image[None],
        size=size,
        mode=str(IMAGE_RESIZE["interpolation"]),
        antialias=bool(IMAGE_RESIZE["antialias"]),
        align_corners=bool(IMAGE_RESIZE["align_corners"]),
    )[0]


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
