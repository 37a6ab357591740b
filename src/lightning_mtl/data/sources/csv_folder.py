"""Your own images: a folder of image files and one CSV of labels, any mix of task kinds.

The format asks for nothing beyond a spreadsheet export::

    root/
      labels.csv            image,age,gender,tags,split
                            faces/0001.jpg,34.5,1,0 3,train
                            faces/0002.jpg,,0,,val          <- age and tags not labelled
                            faces/0003.jpg,51,,2|4,test     <- gender not labelled
      faces/0001.jpg ...    any layout; the image column holds paths relative to root

``columns`` declares each target key and its kind (the CSV header name is the key, or
``column:`` when they differ)::

    columns:
      age: {kind: regression}                   # float -> float32 (1,)
      gender: {kind: class, num_classes: 2}     # integer id 0..n-1 -> int64 scalar
      tags: {kind: multilabel, num_labels: 5}   # indices split by spaces or "|" -> float32 (n,)
                                                #   of 0/1; "none" = labelled, no label present

An **empty cell means "not labelled"**: the sample's mask for that key is False and its target
a placeholder (-100 for a class, zeros otherwise) that the losses never see. That is how
partially labelled data comes in: each task trains on the rows that label it. If the CSV has
the ``split_column`` (values ``train``/``val``/``test``), rows are split by it; otherwise rows
are split at random, deterministically from ``seed``, by ``split_fractions``.

Every row is checked when the dataset is built, whatever the split, and a mistake stops with
the CSV file, the 1-based line number (the header is line 1) and the problem.
"""

from __future__ import annotations

import csv as csv_module
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from lightning_mtl.data.sources.office import check_fractions, seeded_split
from lightning_mtl.errors import ConfigError, DataError

NAME = "CsvImageFolder"
KINDS = ("class", "regression", "multilabel")
SIZE_KEY = {"class": "num_classes", "multilabel": "num_labels"}
SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
CLASS_PLACEHOLDER = -100  # the usual ignore_index, in case a consumer ignores the mask
NO_LABELS = "none"  # a multilabel cell for "labelled, but none of the labels applies"
LAYOUT = """  root/
    labels.csv          header line, then one row per image: image,<target columns>[,split]
    <any folders>/<image files>   (the image column holds paths relative to root)"""
SOURCE = "your own data (see the CsvImageFolder docstring for the format)"


@dataclass(frozen=True)
class TargetColumn:
    """One declared target: its key in the sample, its CSV column, kind and size."""

    key: str
    column: str
    kind: str
    size: int  # classes for "class", labels for "multilabel", 1 for "regression"


class CsvImageFolder(SourceDataset):
    """One split of the rows of a labels CSV over an image folder.

    Args:
        root: the folder the image paths are relative to (and the CSV's folder by default).
        split: ``train``, ``val`` or ``test``.
        csv: the CSV file, relative to ``root`` (or absolute).
        image_column: the header of the column holding the image paths.
        columns: ``{key: {kind: class|regression|multilabel, num_classes|num_labels: n,
            column: header (default: key)}}``; a bare kind string works for regression.
        split_column: the header of the split column; used when present in the CSV, else (or
            when None) the rows are split by ``seed`` and ``split_fractions``.
        image_size: output size (int or (H, W)); None keeps each file's size (not batchable);
            ``backbone``: the backbone's input size (from ``inputs``).
        split_fractions: train/val/test fractions of the rows when there is no split column.
        seed: the seed of that split.
        normalization: ``backbone`` (its mean and std), or ``{mean, std}``; see
            :mod:`lightning_mtl.data.inputs`.
        inputs: the backbone's input config, passed by the data module (None: used alone).
        augment: augment the train split (off by default: whether a flip or a crop keeps your
            labels true is for you to say); val and test never augment.
        crop_scale, flip, color_jitter: the augmentation's options, see
            :class:`~lightning_mtl.data.augment.ImageAugment`; ``seed`` seeds it too.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        csv: str | Path = "labels.csv",
        image_column: str = "image",
        columns: Mapping[str, Mapping[str, Any] | str] | None = None,
        split_column: str | None = "split",
        image_size: int | Sequence[int] | str | None = 64,
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        normalization: NormalizationSpec = "backbone",
        inputs: InputConfig | None = None,
        augment: bool = False,
        crop_scale: Sequence[float] | None = (0.8, 1.0),
        flip: bool = True,
        color_jitter: float = 0.0,
    ) -> None:
        self.root = Path(root)
        self.split = check_split(split, SPLITS, NAME)
        self.size = as_size(resolve_image_size(image_size, inputs, NAME))
        self.normalization = resolve_normalization(normalization, inputs, NAME)
        self.seed = check_seed(seed, NAME)
        self.augmenter = image_augment(augment, split, NAME, crop_scale, flip, color_jitter)
        self.targets = parse_columns(columns)
        fractions = check_fractions(split_fractions, NAME)
        require(self.root, NAME, LAYOUT, SOURCE)
        self.csv_path = require(self.root / csv, NAME, LAYOUT, SOURCE)

        table = _read_table(self.csv_path, self.root, image_column, self.targets, split_column)
        if table.splits is not None:
            keep = np.flatnonzero(np.array(table.splits) == split)
        else:
            parts = seeded_split(len(table.images), fractions, (self.seed, 0))
            keep = np.sort(parts[SPLITS.index(split)])
        self.images: list[Path] = [table.images[i] for i in keep]
        self.values = {key: values[keep] for key, values in table.values.items()}
        self.present = {key: present[keep] for key, present in table.present.items()}

        self.target_names = tuple(t.key for t in self.targets)
        self.num_classes = {t.key: t.size for t in self.targets if t.kind == "class"}
        self.num_labels = {t.key: t.size for t in self.targets if t.kind == "multilabel"}

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int, draw: int | None = None) -> dict[str, Any]:
        index = index % len(self.images)
        seed = self.access_seed(index, draw) if self.augmenter is not None else 0
        image = load_image(
            self.images[index], self.size, NAME, self.normalization, self.augmenter, seed
        )
        targets = {key: torch.from_numpy(np.array(v[index])) for key, v in self.values.items()}
        present = {key: bool(p[index]) for key, p in self.present.items()}
        return make_sample(image, targets, present)

    def verify(self, index: int) -> None:
        verify_image(self.images[index], NAME)

    def label_values(self, key: str) -> torch.Tensor | None:
        """The split's labelled values of a class (int64 (N,)) or multilabel (float 0/1 (N, L))
        column, from the CSV; None for a regression column or an unknown key."""
        kinds = {t.key: t.kind for t in self.targets}
        if kinds.get(key) not in ("class", "multilabel"):
            return None
        return torch.from_numpy(self.values[key][self.present[key]].copy())


def parse_columns(columns: Mapping[str, Mapping[str, Any] | str] | None) -> list[TargetColumn]:
    """The validated target declarations; ConfigError naming the key on any mistake."""
    if not columns:
        raise ConfigError(
            f"{NAME}: columns is required, e.g. {{age: {{kind: regression}}, "
            "gender: {kind: class, num_classes: 2}, tags: {kind: multilabel, num_labels: 5}}"
        )
    targets: list[TargetColumn] = []
    for key, raw in columns.items():
        spec: dict[str, Any] = {"kind": raw} if isinstance(raw, str) else dict(raw or {})
        kind = spec.pop("kind", None)
        if kind not in KINDS:
            raise ConfigError(
                f"{NAME}: columns.{key}.kind={kind!r} is not one of {', '.join(KINDS)}"
            )
        column = str(spec.pop("column", key))
        size = 1
        if kind in SIZE_KEY:
            name = SIZE_KEY[kind]
            value = spec.pop(name, None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"{NAME}: columns.{key}.{name} must be a positive integer for kind "
                    f"{kind}, got {value!r}"
                )
            size = value
        if spec:
            raise ConfigError(
                f"{NAME}: columns.{key} has unknown options {sorted(spec)}; accepted: kind, "
                f"column{', ' + SIZE_KEY[kind] if kind in SIZE_KEY else ''}"
            )
        targets.append(TargetColumn(str(key), column, kind, size))
    return targets


@dataclass
class _Table:
    """Every row of the CSV, parsed: image paths, per-key values and label presence."""

    images: list[Path]
    values: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    splits: list[str] | None


def _error(path: Path, line: int, problem: str) -> DataError:
    return DataError(f"{NAME}: {path}, line {line}: {problem}.\nExpected layout:\n{LAYOUT}")


def _read_table(
    path: Path,
    root: Path,
    image_column: str,
    targets: Sequence[TargetColumn],
    split_column: str | None,
) -> _Table:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv_module.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        needed = [image_column, *(t.column for t in targets)]
        missing = [c for c in needed if c not in header]
        if missing:
            raise _error(path, 1, f"missing column(s) {missing}; the header found is {header}")
        image_at = header.index(image_column)
        target_at = [header.index(t.column) for t in targets]
        split_at = header.index(split_column) if split_column in header else None

        images: list[Path] = []
        splits: list[str] = []
        values: dict[str, list[Any]] = {t.key: [] for t in targets}
        present: dict[str, list[bool]] = {t.key: [] for t in targets}
        listings: dict[Path, set[str]] = {}
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if len(row) != len(header):
                raise _error(
                    path, line, f"found {len(row)} fields, expected {len(header)} (the header's)"
                )
            images.append(_image_path(row[image_at].strip(), root, path, line, listings))
            if split_at is not None:
                splits.append(_split_value(row[split_at], split_column, path, line))
            for target, at in zip(targets, target_at, strict=True):
                cell = row[at].strip()
                present[target.key].append(bool(cell))
                values[target.key].append(_parse_cell(cell, target, path, line))
    if not images:
        raise DataError(f"{NAME}: {path} has no data rows.\nExpected layout:\n{LAYOUT}")
    dtypes = {"class": np.int64, "regression": np.float32, "multilabel": np.float32}
    return _Table(
        images=images,
        values={t.key: np.array(values[t.key], dtype=dtypes[t.kind]) for t in targets},
        present={key: np.array(flags, dtype=bool) for key, flags in present.items()},
        splits=splits if split_at is not None else None,
    )


def _image_path(
    cell: str, root: Path, path: Path, line: int, listings: dict[Path, set[str]]
) -> Path:
    """``root / cell``, checked to exist with one directory listing per folder."""
    if not cell:
        raise _error(path, line, "the image path is empty")
    image = root / cell
    folder = image.parent
    if folder not in listings:
        listings[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
    if image.name not in listings[folder]:
        raise _error(path, line, f"image {cell} does not exist ({image})")
    return image


def _split_value(cell: str, column: str | None, path: Path, line: int) -> str:
    value = SPLIT_ALIASES.get(cell.strip().lower())
    if value is None:
        raise _error(path, line, f"{column}={cell!r} is not one of train, val, test")
    return value


def _parse_cell(cell: str, target: TargetColumn, path: Path, line: int) -> Any:
    """One cell's value, or the placeholder of the target's shape when the cell is empty."""
    where = f"column {target.column}"
    if target.kind == "class":
        if not cell:
            return CLASS_PLACEHOLDER
        try:
            value = int(cell)
        except ValueError:
            raise _error(path, line, f"{where}: {cell!r} is not an integer class id") from None
        if not 0 <= value < target.size:
            raise _error(
                path,
                line,
                f"{where}: class id {value} out of range 0..{target.size - 1} "
                f"(num_classes={target.size})",
            )
        return value
    if target.kind == "regression":
        if not cell:
            return [0.0]
        try:
            number = float(cell)
        except ValueError:
            raise _error(path, line, f"{where}: {cell!r} is not a number") from None
        if not math.isfinite(number):
            raise _error(path, line, f"{where}: {cell!r} is not a finite number")
        return [number]
    vector = [0.0] * target.size
    if not cell or cell.lower() == NO_LABELS:
        return vector
    for token in re.split(r"[\s|]+", cell):
        if not token:
            continue
        try:
            index = int(token)
        except ValueError:
            raise _error(
                path, line, f"{where}: {token!r} in {cell!r} is not an integer label index"
            ) from None
        if not 0 <= index < target.size:
            raise _error(
                path,
                line,
                f"{where}: label index {index} out of range 0..{target.size - 1} "
                f"(num_labels={target.size})",
            )
        vector[index] = 1.0
    return vector
