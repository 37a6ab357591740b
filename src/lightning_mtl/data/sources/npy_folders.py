"""The preprocessed ``split/<kind>/<i>.npy`` layout shared by the NYUv2 and Cityscapes sources.

Most multi-task papers (MTAN, LibMTL, Nash-MTL, FAMO) train on the same preprocessed copies of
NYUv2 and Cityscapes, released with MTAN: one folder per split, one folder per kind of array
inside it, and one ``.npy`` file per sample whose name is the sample index::

    root/train/image/0.npy   H×W×3 float in [0, 1]
    root/train/<target>/0.npy
    root/val/...

:class:`NpyFolderDataset` holds everything these datasets have in common, so a subclass only
declares its folders (:class:`NpyTarget`), its layout text and where to get the data. It checks
the folders when built (split and subfolders exist, every folder holds the same indices, at
least one sample) and each array when read (loadable, expected shape, class ids in range),
raising :class:`~lightning_mtl.errors.DataError` naming the file and the problem. It decodes
three kinds of target, each resized the way its values allow:

============  =====================================  ==========================================
kind          on disk -> sample                      resize to ``image_size``
============  =====================================  ==========================================
``classes``   H×W ids (-1 = ignore) -> int64 H×W      nearest (ids stay ids, -1 stays -1)
``depth``     H×W×1 or H×W (0 = missing) -> 1×H×W     nearest (0 = missing stays 0)
``normals``   H×W×3 (0-vector = missing) -> 3×H×W     bilinear, then back to unit length
============  =====================================  ==========================================

The image is resized bilinearly and normalised with the statistics ``normalization`` resolves
to: the backbone's by default (see :mod:`lightning_mtl.data.inputs`). ``image_size`` keeps the
native size by default; ``backbone`` resizes to the backbone's input size.

Training augmentation (``augment``, train split only) is the papers' random scale-crop and flip,
drawn per access (:class:`~lightning_mtl.data.augment.DenseAugment`): the crop is resized
straight to ``image_size``, each label with the interpolation of the table above, depth divided
by the scale, normals' x negated by a flip. :meth:`NpyFolderDataset.verify` checks one sample's
files from their headers (``mmap_mode="r"``) and the class ids of its label file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from lightning_mtl.data.augment import DenseAugment, check_scales, unit_normals
from lightning_mtl.data.inputs import (
    InputConfig,
    NormalizationSpec,
    resolve_image_size,
    resolve_normalization,
)
from lightning_mtl.data.sources.base import (
    SPLITS,
    SourceDataset,
    as_size,
    check_seed,
    check_split,
    make_sample,
    require,
    resize_dense,
    resize_image,
)
from lightning_mtl.errors import DataError

IMAGE_FOLDER = "image"
#: the zoom factors MTAN, Nash-MTL and FAMO draw from
PAPER_SCALES = (1.0, 1.2, 1.5)


@dataclass(frozen=True)
class NpyTarget:
    """One target of an npy-folder dataset: the folder holding it and how to decode it.

    ``num_classes`` (kind ``classes`` only) bounds the ids: a label file holding an id outside
    ``-1 .. num_classes - 1`` is reported when read, which catches e.g. 19-class labels read as
    7-class ones.
    """

    folder: str
    kind: Literal["classes", "depth", "normals"]
    num_classes: int | None = None


def _index_key(stem: str) -> tuple[int, int | str]:
    """Numeric file names in numeric order (``2.npy`` before ``10.npy``), others after them."""
    return (0, int(stem)) if stem.isdigit() else (1, stem)


class NpyFolderDataset(SourceDataset):
    """Base class of the datasets stored as ``root/<split>/<kind>/<i>.npy``.

    Subclasses set ``dataset_name``, ``layout`` (the text shown in errors), ``source`` (where
    to get the data), ``target_names``, ``num_classes`` and implement :meth:`target_specs`.
    ``split_folders`` maps the requested split to a folder on disk: the preprocessed releases
    have no test split, so ``test`` reads ``val`` (the split those papers report on).

    ``targets`` selects a subset of ``target_names`` to load (None: all); only the folders of
    the selected targets (and ``image/``) have to exist. ``augment`` (train split only, ignored
    for the others so one config can build every split; on by default, as the papers train)
    applies the random scale-crop over ``scales`` and, with ``flip``, a horizontal flip with
    probability 1/2, drawn anew at every access from ``(seed, index, draw)`` (see
    :meth:`~lightning_mtl.data.sources.base.SourceDataset.load`). ``normalization``
    (``backbone`` or ``{mean, std}``) and ``inputs`` (the backbone's input config, passed by the
    data module) work as for every source (:mod:`lightning_mtl.data.inputs`).
    """

    dataset_name: ClassVar[str] = "npy folders"
    layout: ClassVar[str] = ""
    source: ClassVar[str] = ""
    split_folders: ClassVar[Mapping[str, str]] = {"train": "train", "val": "val", "test": "val"}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: int | Sequence[int] | str | None = None,
        targets: Sequence[str] | None = None,
        augment: bool = True,
        seed: int = 0,
        normalization: NormalizationSpec = "backbone",
        inputs: InputConfig | None = None,
        scales: Sequence[float] = PAPER_SCALES,
        flip: bool = True,
    ) -> None:
        name = self.dataset_name
        self.split = check_split(split, SPLITS, name)
        self.image_size = self._check_size(resolve_image_size(image_size, inputs, name))
        self.normalization = resolve_normalization(normalization, inputs, name)
        self.seed = check_seed(seed, name)
        self.scales = check_scales(scales, name)
        self.augment = bool(augment) and self.split == "train"
        self.augmenter = DenseAugment(self.scales, flip, self.image_size) if self.augment else None
        specs = self.target_specs()
        self.target_names = self._select_targets(targets, tuple(specs))
        self.specs = {key: specs[key] for key in self.target_names}

        self.root = require(Path(root), name, self.layout, self.source)
        self.split_dir = require(
            self.root / self.split_folders[self.split], name, self.layout, self.source
        )
        folders = [IMAGE_FOLDER, *(spec.folder for spec in self.specs.values())]
        self.indices = self._check_indices(list(dict.fromkeys(folders)))

    # ------------------------------------------------------------------ subclass interface
    def target_specs(self) -> dict[str, NpyTarget]:
        """Every target this dataset can provide, in the order of ``target_names``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- validation
    def _check_size(self, image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
        try:
            size = as_size(image_size)
        except (TypeError, ValueError) as err:
            raise DataError(
                f"{self.dataset_name}: image_size={image_size!r} must be null, an int, "
                "[height, width] or backbone"
            ) from err
        if size is not None and min(size) <= 0:
            raise DataError(
                f"{self.dataset_name}: image_size={image_size!r} must be positive (or null for "
                "the native size)"
            )
        return size

    def _select_targets(
        self, targets: Sequence[str] | None, available: tuple[str, ...]
    ) -> tuple[str, ...]:
        if targets is None:
            return available
        if isinstance(targets, str):
            targets = [targets]
        unknown = [t for t in targets if t not in available]
        if unknown or not targets:
            raise DataError(
                f"{self.dataset_name}: targets={list(targets)!r} must be a non-empty subset of "
                f"{', '.join(available)}"
            )
        return tuple(t for t in available if t in targets)

    def _check_indices(self, folders: list[str]) -> list[str]:
        """The sample indices, after checking every folder exists and holds the same ones."""
        found: dict[str, set[str]] = {}
        for folder in folders:
            path = require(self.split_dir / folder, self.dataset_name, self.layout, self.source)
            found[folder] = {p.stem for p in path.glob("*.npy") if p.is_file()}
        images = found[IMAGE_FOLDER]
        if not images:
            raise DataError(
                f"{self.dataset_name}: {self.split_dir / IMAGE_FOLDER} holds no .npy file; "
                f"expected at least one sample.\nExpected layout:\n{self.layout}\n"
                f"Get the data: {self.source}"
            )
        for folder in folders[1:]:
            missing = sorted(images - found[folder], key=_index_key)
            extra = sorted(found[folder] - images, key=_index_key)
            if missing or extra:
                problems = []
                if missing:
                    problems.append(
                        f"index {_listing(missing)} in {IMAGE_FOLDER}/ but not in {folder}/ "
                        f"(expected {self.split_dir / folder / (missing[0] + '.npy')})"
                    )
                if extra:
                    problems.append(
                        f"index {_listing(extra)} in {folder}/ but not in {IMAGE_FOLDER}/ "
                        f"(expected {self.split_dir / IMAGE_FOLDER / (extra[0] + '.npy')})"
                    )
                raise DataError(
                    f"{self.dataset_name}: {self.split_dir} has samples with missing files: "
                    f"{'; '.join(problems)}. Every folder must hold the same <i>.npy files."
                )
        return sorted(images, key=_index_key)

    # ---------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int, draw: int | None = None) -> dict[str, Any]:
        stem = self.indices[index]
        index = index % len(self.indices)  # a negative index draws as its twin
        image_path = self.split_dir / IMAGE_FOLDER / f"{stem}.npy"
        image = self._load(image_path)
        self._check_image(image_path, image)
        size = image.shape[:2]
        image_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        targets = {
            key: self._read_target(spec, self.split_dir / spec.folder / f"{stem}.npy", size)
            for key, spec in self.specs.items()
        }
        if self.augmenter is not None:
            kinds = {key: (self.specs[key].kind, t) for key, t in targets.items()}
            seed = self.access_seed(index, draw)
            # plain reads (no draw): consecutive reads of one index never repeat the crop
            choice = None
            if draw is None:
                choice = self.augmenter.cycle(self.seed, index, self.plain_reads(index))
            image_t, targets = self.augmenter(image_t, kinds, seed, choice)
        else:
            image_t = resize_image(image_t, self.image_size)
            targets = {key: self._resize(self.specs[key], t) for key, t in targets.items()}
        return make_sample(self.normalization(image_t.contiguous()), targets)

    def verify(self, index: int) -> None:
        """Check sample ``index``'s files cheaply: each array's header (shape, numeric dtype;
        a truncated file fails to map) and the class ids of its label files, without decoding
        the image. Raises :class:`DataError` naming the file."""
        stem = self.indices[index]
        image_path = self.split_dir / IMAGE_FOLDER / f"{stem}.npy"
        image = self._load(image_path, mmap=True)
        self._check_image(image_path, image)
        for spec in self.specs.values():
            path = self.split_dir / spec.folder / f"{stem}.npy"
            self._check_target(spec, path, self._load(path, mmap=True), image.shape[:2])

    def _check_image(self, path: Path, image: np.ndarray) -> None:
        if image.ndim != 3 or image.shape[-1] != 3:
            raise self._shape_error(path, image, "H×W×3 (an RGB image in [0, 1])")
        self._check_numeric(path, image)

    def _check_target(
        self, spec: NpyTarget, path: Path, array: np.ndarray, size: tuple[int, ...]
    ) -> None:
        """Shape (and, for class ids, range) of one target array against the image's H×W."""
        height, width = size
        if spec.kind == "classes":
            if array.shape != (height, width):
                raise self._shape_error(path, array, f"{height}×{width} (the image's H×W)")
            self._check_numeric(path, array)
            self._check_ids(spec, path, np.asarray(array))
        elif spec.kind == "depth":
            if array.shape not in {(height, width, 1), (height, width)}:
                raise self._shape_error(path, array, f"{height}×{width}×1 or {height}×{width}")
            self._check_numeric(path, array)
        else:
            if array.shape != (height, width, 3):
                raise self._shape_error(path, array, f"{height}×{width}×3 (unit normals)")
            self._check_numeric(path, array)

    def _check_ids(self, spec: NpyTarget, path: Path, label: np.ndarray) -> None:
        if spec.num_classes is None or not label.size:
            return
        expected = f"-1 (ignore) .. {spec.num_classes - 1} for {spec.num_classes} classes"
        if label.dtype.kind == "f" and not np.isfinite(label).all():
            raise DataError(
                f"{self.dataset_name}: {path} holds NaN or inf class ids; expected {expected}"
            )
        low, high = int(label.min()), int(label.max())
        if low < -1 or high >= spec.num_classes:
            raise DataError(
                f"{self.dataset_name}: {path} holds class ids {low}..{high}; expected {expected}"
            )

    def _check_numeric(self, path: Path, array: np.ndarray) -> None:
        if array.dtype.kind not in "biuf":
            raise DataError(
                f"{self.dataset_name}: {path} holds dtype {array.dtype}; expected a numeric "
                f"array.\nExpected layout:\n{self.layout}"
            )

    def _read_target(self, spec: NpyTarget, path: Path, size: tuple[int, ...]) -> torch.Tensor:
        """Load, check and decode one target file at the image's native size."""
        array = self._load(path)
        self._check_target(spec, path, array, size)
        height, width = size
        if spec.kind == "classes":
            return torch.from_numpy(np.asarray(array).astype(np.int64))
        if spec.kind == "depth":
            depth = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            return depth.reshape(1, height, width)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)

    def _resize(self, spec: NpyTarget, target: torch.Tensor) -> torch.Tensor:
        """A decoded target at ``image_size``, resized as its values allow (module docstring)."""
        if self.image_size is None or tuple(target.shape[-2:]) == tuple(self.image_size):
            return target.contiguous()
        if spec.kind == "normals":
            return unit_normals(resize_dense(target, self.image_size, nearest=False))
        return resize_dense(target, self.image_size, nearest=True)

    def _load(self, path: Path, mmap: bool = False) -> np.ndarray:
        """The array in ``path`` (``mmap``: only its header is read, the data mapped)."""
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except Exception as err:  # numpy raises ValueError, OSError, EOFError, ... on bad files
            raise DataError(
                f"{self.dataset_name}: cannot read {path}: {type(err).__name__}: {err}. "
                "The file is corrupt or not a .npy array; re-extract it from the archive "
                f"({self.source})."
            ) from err

    def _shape_error(self, path: Path, array: np.ndarray, expected: str) -> DataError:
        found = "×".join(str(d) for d in array.shape) or "a scalar"
        return DataError(
            f"{self.dataset_name}: {path} has shape {found}; expected {expected}.\n"
            f"Expected layout:\n{self.layout}"
        )


def _listing(stems: list[str], limit: int = 5) -> str:
    """``3`` or ``3, 4, 7 (+2 more)``: the first few indices of a list, for error messages."""
    shown = ", ".join(stems[:limit])
    return shown if len(stems) <= limit else f"{shown} (+{len(stems) - limit} more)"
