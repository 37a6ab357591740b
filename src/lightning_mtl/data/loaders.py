"""The merged data's loaders: training resumes through the data module, evaluation reads every
sample exactly once across ranks, one loader per source.

Why not Lightning's own DistributedSampler for evaluation: it pads the last batches with
repeats so that every rank gets as many, which counts some samples twice in the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_mtl.data.merged_dataset import MergedDataset

Collate = Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]


class TrainLoader(DataLoader[Any]):
    """The training loader. Its position is saved and restored by the data module only
    (:meth:`~lightning_mtl.data.merged.MergedDataModule.state_dict`), the one path that works in every case: Lightning
    restores a data module before it builds the loaders, but restores a loader's own state only
    if it builds the loader after reading the checkpoint, which a scheduler that counts the
    steps of training prevents. These two methods hold no state: they tell Lightning that the
    loader resumes mid-epoch (it would warn that it does not)."""

    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Nothing to restore: the data module's state has set the sampler's position."""


def eval_loaders(
    dataset: MergedDataset,
    batch_size: int,
    rank: int,
    world_size: int,
    collate: Collate,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> list[DataLoader[Any]]:
    """One loader per source, in order: metrics per source come from the loader index.

    Each sample is evaluated once: batch j goes to rank ``j mod world_size``. Lightning
    refuses a rank without a batch, so a source with fewer batches than ranks is cut into
    world_size smaller ones (and one with fewer samples than ranks repeats some of them).
    """
    loaders: list[DataLoader[Any]] = []
    for source, n in enumerate(dataset.sizes()):
        keys = [(source, i) for i in range(n)]
        count = max(math.ceil(n / batch_size), world_size)
        keys = [keys[i % n] for i in range(max(n, count))]
        batches = [list(part) for part in even_parts(keys, count)]
        loaders.append(
            DataLoader(
                Batches(dataset, batches),
                batch_size=None,
                sampler=ShardedBatches(len(batches), rank, world_size),
                collate_fn=collate,
                num_workers=num_workers,
                pin_memory=pin_memory,
            )
        )
    return loaders


def even_parts(items: list[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    """``items`` in ``parts`` consecutive runs whose lengths differ by at most one."""
    size, extra = divmod(len(items), parts)
    bounds = [j * size + min(j, extra) for j in range(parts + 1)]
    return [items[bounds[j] : bounds[j + 1]] for j in range(parts)]


class ShardedBatches(DistributedSampler[int]):
    """Batch j goes to rank ``j mod world_size``: every evaluation batch is read exactly once
    (Lightning's DistributedSampler would pad with repeats, counting some samples twice). Ranks
    may get one batch more than others; evaluation has no collective inside a step."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        # DistributedSampler.__init__ is not called: this one needs no dataset or process group
        self.length, self.rank, self.num_replicas = length, rank, world_size
        self.epoch, self.shuffle, self.drop_last, self.seed = 0, False, False, 0

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


class Batches(Dataset[list[dict[str, Any]]]):
    """A fixed list of batches of ``(source, index)``: item j is batch j's samples."""

    def __init__(self, dataset: MergedDataset, batches: list[list[tuple[int, int]]]) -> None:
        self.dataset, self.batches = dataset, batches

    def __getitem__(self, j: int) -> list[dict[str, Any]]:
        return self.dataset[self.batches[j]]

    def __len__(self) -> int:
        return len(self.batches)
