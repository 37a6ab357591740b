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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

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
    check_split,
    make_sample,
    require,
    resize_dense,
    resize_image,
)
from lightning_mtl.errors import DataError

IMAGE_FOLDER = "image"
# A normal shorter than this after a bilinear resize is treated as missing (set to 0).
_MIN_NORM = 1e-6


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
    for the others so one config can build every split) flips a sample horizontally with
    probability 1/2, drawn from ``numpy.random.default_rng((seed, index))``: the draw is
    deterministic, so a given sample is flipped, or not, in every epoch and in every worker.
    ``normalization`` (``backbone`` or ``{mean, std}``) and ``inputs`` (the backbone's input
    config, passed by the data module) work as for every source (:mod:`lightning_mtl.data.inputs`).
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
        augment: bool = False,
        seed: int = 0,
        normalization: NormalizationSpec = "backbone",
        inputs: InputConfig | None = None,
    ) -> None:
        name = self.dataset_name
        self.split = check_split(split, SPLITS, name)
        self.image_size = self._check_size(resolve_image_size(image_size, inputs, name))
        self.normalization = resolve_normalization(normalization, inputs, name)
        self.augment = bool(augment) and self.split == "train"
        self.seed = int(seed)
        if self.seed < 0:
            raise DataError(f"{name}: seed={seed!r} must be >= 0 (it seeds the flips)")
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

    def __getitem__(self, index: int) -> dict[str, Any]:
        stem = self.indices[index]
        index = index % len(self.indices)  # a negative index draws the same flip as its twin
        image_path = self.split_dir / IMAGE_FOLDER / f"{stem}.npy"
        image = self._load(image_path)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise self._shape_error(image_path, image, "H×W×3 (an RGB image in [0, 1])")
        height, width = image.shape[:2]
        image_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        image_t = resize_image(image_t, self.image_size)
        targets = {
            key: self._read_target(
                spec, self.split_dir / spec.folder / f"{stem}.npy", (height, width)
            )
            for key, spec in self.specs.items()
        }
        if self.augment and np.random.default_rng((self.seed, index)).random() < 0.5:
            image_t = image_t.flip(-1)
            targets = {key: self._flip(self.specs[key], t) for key, t in targets.items()}
        return make_sample(self.normalization(image_t), targets)

    def _read_target(self, spec: NpyTarget, path: Path, size: tuple[int, int]) -> torch.Tensor:
        """Load, check and decode one target file, resized to ``image_size``."""
        array = self._load(path)
        height, width = size
        if spec.kind == "classes":
            if array.shape != (height, width):
                raise self._shape_error(path, array, f"{height}×{width} (the image's H×W)")
            label = torch.from_numpy(np.asarray(array).astype(np.int64))
            if spec.num_classes is not None and label.numel():
                low, high = int(label.min()), int(label.max())
                if low < -1 or high >= spec.num_classes:
                    raise DataError(
                        f"{self.dataset_name}: {path} holds class ids {low}..{high}; expected "
                        f"-1 (ignore) .. {spec.num_classes - 1} for {spec.num_classes} classes"
                    )
            return resize_dense(label, self.image_size, nearest=True)
        if spec.kind == "depth":
            if array.shape not in {(height, width, 1), (height, width)}:
                raise self._shape_error(path, array, f"{height}×{width}×1 or {height}×{width}")
            depth = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            depth = depth.reshape(1, height, width)
            return resize_dense(depth, self.image_size, nearest=True)
        if array.shape != (height, width, 3):
            raise self._shape_error(path, array, f"{height}×{width}×3 (unit normals)")
        normals = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)
        if self.image_size is None or tuple(self.image_size) == (height, width):
            return normals.contiguous()
        normals = resize_dense(normals, self.image_size, nearest=False)
        norm = normals.norm(dim=0, keepdim=True)
        return torch.where(norm > _MIN_NORM, normals / norm.clamp_min(_MIN_NORM), 0.0)

    @staticmethod
    def _flip(spec: NpyTarget, target: torch.Tensor) -> torch.Tensor:
        """A horizontally flipped target; a normal's x component changes sign with the flip."""
        flipped = target.flip(-1)
        if spec.kind == "normals":
            flipped = flipped.clone()
            flipped[0] = -flipped[0]
        return flipped

    def _load(self, path: Path) -> np.ndarray:
        try:
            return np.load(path, allow_pickle=False)
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
