"""CelebA: 202,599 aligned face crops, each labelled with 40 binary attributes.

Read from the files of the official release (the "Align&Cropped Images" archive and the two
annotation lists), unchanged::

    root/
      img_align_celeba/000001.jpg ... 202599.jpg
      list_attr_celeba.txt       line 1: the number of images
                                 line 2: the 40 attribute names (5_o_Clock_Shadow ... Young)
                                 then:   <file> followed by 40 values, each 1 or -1
      list_eval_partition.txt    <file> 0|1|2   (0 = train, 1 = val, 2 = test)

Get it from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive / Baidu links:
``Img/img_align_celeba.zip``, ``Anno/list_attr_celeba.txt``, ``Eval/list_eval_partition.txt``).

The 40 attributes form one multi-label target (``attributes``: float32 (40,) of 0/1, where the
file's -1 becomes 0), the usual multi-task CelebA benchmark where each attribute is a binary
task sharing one head. ``attributes=[...]`` keeps a subset, in the order given. The annotation
files are checked when the dataset is built (counts, columns, values, the two lists agreeing,
every listed image present), so a damaged download stops before training, naming the file and
line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    check_seed,
    check_split,
    make_sample,
    require,
)
from lightning_mtl.data.sources.images import image_augment, load_image, verify_image
from lightning_mtl.errors import DataError

NAME = "CelebA"
SOURCE = "the CelebA page https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
LAYOUT = """  root/
    img_align_celeba/000001.jpg ...   (Img/img_align_celeba.zip, unzipped)
    list_attr_celeba.txt              (Anno/)
    list_eval_partition.txt           (Eval/)"""
NUM_ATTRIBUTES = 40
# The partition file's codes for the three splits.
PARTITION_CODES = {"0": "train", "1": "val", "2": "test"}


class CelebA(SourceDataset):
    """One official split of CelebA; item ``i`` is an aligned face and its attribute vector.

    Args:
        root: the folder holding ``img_align_celeba/`` and the two annotation lists.
        split: ``train``, ``val`` or ``test``, as in ``list_eval_partition.txt``.
        image_size: output size (int or (H, W)); the crops are 218×178, None keeps that;
            ``backbone``: the backbone's input size (from ``inputs``).
        attributes: attribute names to keep (subset, in this order); None keeps all 40.
        target: the target key of the multi-label vector in the sample.
        normalization: ``backbone`` (its mean and std), or ``{mean, std}``; see
            :mod:`lightning_mtl.data.inputs`.
        inputs: the backbone's input config, passed by the data module (None: used alone).
        augment: augment the train split (off by default: the CelebA multi-task benchmark of
            MGDA, Nash-MTL and FAMO trains on the resized faces as they are); val and test
            never augment.
        crop_scale, flip, color_jitter: the augmentation's options, see
            :class:`~lightning_mtl.data.augment.ImageAugment`.
        seed: seeds the augmentation (drawn anew at every access).
    """

    target_names: tuple[str, ...] = ("attributes",)
    num_classes: dict[str, int] = {}
    num_labels: dict[str, int] = {"attributes": NUM_ATTRIBUTES}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: int | Sequence[int] | str | None = 64,
        attributes: Sequence[str] | None = None,
        target: str = "attributes",
        normalization: NormalizationSpec = "backbone",
        inputs: InputConfig | None = None,
        augment: bool = False,
        crop_scale: Sequence[float] | None = (0.8, 1.0),
        flip: bool = True,
        color_jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.split = check_split(split, SPLITS, NAME)
        self.size = as_size(resolve_image_size(image_size, inputs, NAME))
        self.normalization = resolve_normalization(normalization, inputs, NAME)
        self.seed = check_seed(seed, NAME)
        self.augmenter = image_augment(augment, split, NAME, crop_scale, flip, color_jitter)
        self.target = target
        image_dir = require(self.root / "img_align_celeba", NAME, LAYOUT, SOURCE)
        attr_file = require(self.root / "list_attr_celeba.txt", NAME, LAYOUT, SOURCE)
        partition_file = require(self.root / "list_eval_partition.txt", NAME, LAYOUT, SOURCE)

        names, files, values = _read_attributes(attr_file)
        partition = _read_partition(partition_file)
        _check_same_files(files, partition, attr_file, partition_file)
        _check_images_exist(image_dir, files)

        columns = _select(names, attributes, attr_file)
        self.attribute_names: tuple[str, ...] = tuple(names[c] for c in columns)
        keep = np.array([partition[f] == split for f in files], dtype=bool)
        self.files: list[str] = [f for f, k in zip(files, keep, strict=True) if k]
        # (N, A) float32 0/1: the file's 1 -> 1, -1 -> 0.
        self.labels = np.ascontiguousarray(values[keep][:, columns], dtype=np.float32)
        self.image_dir = image_dir
        self.target_names = (target,)
        self.num_labels = {target: len(columns)}

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, draw: int | None = None) -> dict[str, Any]:
        index = index % len(self.files)
        seed = self.access_seed(index, draw) if self.augmenter is not None else 0
        image = load_image(
            self.image_dir / self.files[index],
            self.size,
            NAME,
            self.normalization,
            self.augmenter,
            seed,
        )
        return make_sample(image, {self.target: torch.from_numpy(self.labels[index].copy())})

    def verify(self, index: int) -> None:
        verify_image(self.image_dir / self.files[index], NAME)

    def label_values(self, key: str) -> torch.Tensor | None:
        """The split's attribute vectors, float 0/1 (N, A), from ``list_attr_celeba.txt``."""
        return torch.from_numpy(self.labels.copy()) if key == self.target else None


def _error(path: Path, line: int | None, problem: str) -> DataError:
    where = f"{path}, line {line}" if line is not None else str(path)
    return DataError(
        f"{NAME}: {where}: {problem}.\nExpected layout:\n{LAYOUT}\n"
        f"The lists come unchanged from {SOURCE}."
    )


def _read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Attribute names, file names and an (N, 40) bool array (True where the file says 1)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) < 2:
        raise _error(path, None, "too short: it needs the image count and the attribute names")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise _error(
            path, 1, f"expected the number of images, found {lines[0].strip()!r}"
        ) from None
    names = lines[1].split()
    if len(names) != NUM_ATTRIBUTES:
        raise _error(path, 2, f"found {len(names)} attribute names, expected {NUM_ATTRIBUTES}")
    rows = lines[2:]
    if len(rows) != count:
        raise _error(path, 1, f"declares {count} images but {len(rows)} rows follow")
    files: list[str] = []
    flat: list[str] = []
    seen: set[str] = set()
    expected = 1 + NUM_ATTRIBUTES
    for number, row in enumerate(rows, start=3):
        fields = row.split()
        if len(fields) != expected:
            raise _error(
                path,
                number,
                f"found {len(fields)} columns, expected {expected} (a file name and "
                f"{NUM_ATTRIBUTES} values)",
            )
        values = fields[1:]
        if not set(values) <= {"1", "-1"}:
            column, value = next((i, v) for i, v in enumerate(values) if v not in ("1", "-1"))
            raise _error(path, number, f"attribute {names[column]} is {value!r}, expected 1 or -1")
        if fields[0] in seen:
            raise _error(path, number, f"{fields[0]} is listed twice")
        seen.add(fields[0])
        files.append(fields[0])
        flat.extend(values)
    values_array = (np.array(flat) == "1").reshape(len(files), NUM_ATTRIBUTES)
    return names, files, values_array


def _read_partition(path: Path) -> dict[str, str]:
    """``{file name: split}`` from the evaluation partition list."""
    partition: dict[str, str] = {}
    for number, row in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = row.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in PARTITION_CODES:
            raise _error(
                path, number, f"expected '<file> 0|1|2' (0 train, 1 val, 2 test), found {row!r}"
            )
        if fields[0] in partition:
            raise _error(path, number, f"{fields[0]} is listed twice")
        partition[fields[0]] = PARTITION_CODES[fields[1]]
    return partition


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_same_files(
    files: Sequence[str], partition: dict[str, str], attr_file: Path, partition_file: Path
) -> None:
    """The two lists must name the same images, or samples would lack a split or labels."""
    in_attr = set(files)
    only_partition = [f for f in partition if f not in in_attr]
    if only_partition:
        raise _error(
            partition_file,
            None,
            f"{len(only_partition)} images are absent from {attr_file.name}: "
            f"{_preview(only_partition)}",
        )
    only_attr = [f for f in files if f not in partition]
    if only_attr:
        raise _error(
            attr_file,
            None,
            f"{len(only_attr)} images are absent from {partition_file.name}: {_preview(only_attr)}",
        )


def _check_images_exist(image_dir: Path, files: Sequence[str]) -> None:
    """Every listed image is on disk (one directory listing, not one stat per file)."""
    on_disk = set(os.listdir(image_dir))
    missing = [f for f in files if f not in on_disk]
    if missing:
        raise DataError(
            f"{NAME}: {len(missing)} images listed in list_attr_celeba.txt are missing from "
            f"{image_dir}: {_preview(missing)}.\nExpected layout:\n{LAYOUT}\n"
            f"Unzip img_align_celeba.zip again; get it from {SOURCE}."
        )


def _select(names: Sequence[str], wanted: Sequence[str] | None, path: Path) -> list[int]:
    """Column indices of the ``wanted`` attributes (all when None)."""
    if wanted is None:
        return list(range(len(names)))
    if isinstance(wanted, str):
        wanted = [wanted]
    index = {name: i for i, name in enumerate(names)}
    unknown = [w for w in wanted if w not in index]
    if unknown or not wanted:
        problem = f"unknown attributes {unknown}" if unknown else "attributes=[] selects nothing"
        raise DataError(
            f"{NAME}: {problem} (names from {path}). Valid attributes: {', '.join(names)}"
        )
    if len(set(wanted)) != len(wanted):
        raise DataError(f"{NAME}: attributes={list(wanted)} names an attribute twice")
    return [index[w] for w in wanted]
