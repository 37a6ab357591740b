"""The source datasets of a data module, split by split, whatever kind of data module it is.

A :class:`~lightning_mtl.data.MergedDataModule` keeps ``splits[split].datasets`` (one per
source, named by ``names``, with the source's label ``renames``); a plain module keeps
``splits: {split: Dataset}`` (one source, named ``data``). Anything else has no datasets to scan.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSource:
    """One source's dataset of one split; ``rename`` maps its label keys to the tasks' keys."""

    source: str
    split: str
    dataset: Dataset[Any]
    rename: Mapping[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"source {self.source!r} ({self.split} split)"

    def raw_key(self, key: str) -> str:
        """The source's own name of the tasks' label ``key`` (before ``rename``)."""
        return next((raw for raw, new in self.rename.items() if new == key), key)

    def label_keys(self) -> list[str]:
        """The label keys this source provides, as the tasks read them."""
        keys = getattr(self.dataset, "target_names", None)
        if keys is None:
            keys = list(self.dataset[0]["targets"])
        return [self.rename.get(k, k) for k in keys]


def split_sources(datamodule: Any) -> Iterator[SplitSource]:
    """Every (source, split, dataset) of ``datamodule``, building its splits (``setup()``)."""
    if getattr(datamodule, "splits", None) is None:
        return
    datamodule.setup()
    splits = datamodule.splits
    names = list(getattr(datamodule, "names", []) or [])
    for split in SPLITS:
        dataset = splits.get(split)
        if dataset is None:
            continue
        parts = getattr(dataset, "datasets", None)
        if parts is None:
            yield SplitSource("data", split, dataset)
            continue
        renames = list(getattr(dataset, "renames", None) or [{} for _ in parts])
        for i, part in enumerate(parts):
            name = names[i] if i < len(names) else f"source{i}"
            yield SplitSource(name, split, part, renames[i])
