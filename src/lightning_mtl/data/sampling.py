"""Which sample of which source goes into which batch, on which rank, at which step.

Every source s (``n_s`` training samples) is read as an endless *stream*: its pass p is a
permutation of ``range(n_s)`` drawn from ``(seed, s, p)``, and the passes follow each other. A
strategy fixes how many samples ``c_s`` each source gives per epoch; epoch e takes items
``[e·c_s, (e+1)·c_s)`` of stream s. So:

* ``proportional`` (``c_s = n_s``): each epoch is exactly one pass over every source; every sample
  is seen once per epoch, sources in proportion to their size.
* ``round_robin``: every source gives ``max_s n_s`` samples per epoch (the largest source once,
  smaller ones cycled through fresh permutations); homogeneous batches alternate the sources.
* ``temperature`` (``tau``): ``c_s ∝ n_s^(1/tau)`` with ``Σ c_s = Σ n_s``; tau = 1 is
  proportional, large tau tends to uniform (small sources are cycled, large ones are not
  exhausted each epoch; over epochs a source's samples still come once per pass).
* ``steps_per_epoch`` (with any strategy): the epoch's length is fixed to that many steps and the
  counts keep the strategy's shares (in whole batches per source when batches are homogeneous);
  streams continue across epochs.

A source that would give no sample, or in homogeneous mode with ``drop_last`` no whole batch,
per epoch is refused (:class:`~lightning_mtl.errors.ConfigError` naming it): it would never be
trained on.

The epoch's samples then form *global* batches of ``batch_size × world_size`` samples, and rank r
takes the r-th slice of each, so every rank has the same number of steps and no sample goes to
two ranks. ``mixing="mixed"``: the sources' samples are shuffled together (seed, epoch), so a batch
mixes sources. ``mixing="homogeneous"``: each global batch comes from one source (every rank reads
the same source at a step), in shuffled order (round-robin: in turn). The final incomplete global
batch (of a source, when homogeneous) is dropped (``drop_last=True``, the default: a batch of one
sample breaks BatchNorm, and which samples fall in the remainder changes every epoch) or kept
and padded with the epoch's first samples (cycling) to a multiple of world_size
(``drop_last=False``: every sample exactly once per epoch, plus at most world_size − 1 repeats).

Everything is a pure function of ``(seed, epoch)`` and the source sizes: the order is the same on
every rank and in every run, and a resumed run continues it (:meth:`skip` drops the batches a
checkpoint says were already trained on). Each key also carries its *draw*, the item's position
in its source's stream (:class:`Key`): no two accesses of a source in a run share it, and a
source with training augmentation (``load(index, draw)``) seeds the access's random crop and
flip with it, so augmentation too is the same in every DataLoader worker, on every world size and
after a resume.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import DistributedSampler

from lightning_mtl.errors import ConfigError

STRATEGIES = ("proportional", "round_robin", "temperature")
MIXING = ("mixed", "homogeneous")
#: the ``data.sampling`` options (:class:`MultiSourceSampler`'s keyword arguments)
SAMPLING_OPTIONS = ("strategy", "mixing", "tau", "steps_per_epoch", "drop_last")


class Key(tuple[int, int]):
    """A training sample's key: the pair ``(source, index)`` (it compares, hashes and unpacks as
    that pair) that also carries ``draw``, the item's position in its source's stream."""

    draw: int

    def __new__(cls, source: int, index: int, draw: int) -> Key:
        key = super().__new__(cls, (source, index))
        key.draw = draw
        return key

    def __getnewargs__(self) -> tuple[int, int, int]:
        return (self[0], self[1], self.draw)  # pickled to DataLoader workers


def largest_remainder(shares: np.ndarray, total: int) -> list[int]:
    """``total`` split in whole parts as close to ``shares · total`` as possible."""
    exact = shares * total
    counts = np.floor(exact).astype(int)
    # largest remainders get the leftover units, ties to the lower source index
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return [int(c) for c in counts]


def source_shares(sizes: Sequence[int], strategy: str, tau: float = 1.0) -> tuple[np.ndarray, int]:
    """Each source's share of an epoch, and the epoch's default length in samples."""
    sizes_array = np.asarray(sizes, dtype=np.float64)
    if strategy == "proportional":
        shares = sizes_array / sizes_array.sum()
        default = int(sizes_array.sum())
    elif strategy == "round_robin":
        shares = np.full(len(sizes), 1.0 / len(sizes))
        default = int(sizes_array.max()) * len(sizes)
    elif strategy == "temperature":
        if tau <= 0:
            raise ConfigError(f"data.sampling.tau must be positive, got {tau}")
        powered = sizes_array ** (1.0 / tau)
        shares = powered / powered.sum()
        default = int(sizes_array.sum())
    else:
        raise ConfigError(
            f"data.sampling.strategy={strategy!r} is unknown; accepted: {', '.join(STRATEGIES)}"
        )
    return shares, default


def source_counts(
    sizes: Sequence[int], strategy: str, tau: float = 1.0, total: int | None = None
) -> list[int]:
    """Samples per epoch from each source (``total``: the epoch length in samples, if fixed)."""
    shares, default = source_shares(sizes, strategy, tau)
    if total is None and strategy == "proportional":
        return [int(n) for n in sizes]
    return largest_remainder(shares, default if total is None else int(total))


def stream_slice(seed: int, source: int, size: int, start: int, count: int) -> np.ndarray:
    """Items ``[start, start + count)`` of source ``source``'s stream of permutations."""
    out = np.empty(count, dtype=np.int64)
    filled, position = 0, start
    while filled < count:
        epoch_pass, offset = divmod(position, size)
        order = np.random.default_rng((seed, source, epoch_pass)).permutation(size)
        take = min(size - offset, count - filled)
        out[filled : filled + take] = order[offset : offset + take]
        filled += take
        position += take
    return out


class MultiSourceSampler(DistributedSampler[list[tuple[int, int]]]):
    """Yields, for this rank, one list of ``(source, index)`` per step (see the module docstring).

    It is a ``DistributedSampler`` so that Lightning does not inject another one: it shards the
    batches itself. Lightning calls :meth:`set_epoch` at every epoch.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        strategy: str = "proportional",
        mixing: str = "mixed",
        tau: float = 1.0,
        steps_per_epoch: int | None = None,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        names: Sequence[str] | None = None,
    ) -> None:
        # DistributedSampler.__init__ is not called: it would need a dataset and a process group
        if mixing not in MIXING:
            raise ConfigError(f"data.sampling.mixing={mixing!r}; accepted: {', '.join(MIXING)}")
        if batch_size <= 0 or any(n <= 0 for n in sizes):
            raise ConfigError(f"batch_size and every source size must be positive: {sizes}")
        if steps_per_epoch is not None and int(steps_per_epoch) <= 0:
            raise ConfigError(
                f"data.sampling.steps_per_epoch must be positive, got {steps_per_epoch}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.sizes, self.batch_size = [int(n) for n in sizes], int(batch_size)
        self.strategy, self.mixing, self.tau = strategy, mixing, float(tau)
        self.steps_per_epoch, self.drop_last = steps_per_epoch, bool(drop_last)
        self.seed, self.rank, self.num_replicas = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained on)
        self.shuffle = True  # read by Lightning's checks on DistributedSampler
        self._cache: tuple[int, list[list[tuple[int, int]]]] | None = None
        self.names = list(names) if names is not None else [f"#{i}" for i in range(len(sizes))]
        size = self.batch_size * self.num_replicas
        if steps_per_epoch is not None and mixing == "homogeneous":
            # whole global batches per source, so the epoch has exactly steps_per_epoch steps
            shares, _ = source_shares(self.sizes, strategy, self.tau)
            batches = largest_remainder(shares, int(steps_per_epoch))
            self.counts = [b * size for b in batches]
        else:
            total = None if steps_per_epoch is None else int(steps_per_epoch) * size
            self.counts = source_counts(self.sizes, strategy, self.tau, total)
        self._check_every_source_trains(size)

    def _check_every_source_trains(self, size: int) -> None:
        """A source that would give no sample (or, in homogeneous mode with drop_last, no full
        batch) per epoch is never trained on: refuse it, naming the source and the remedies."""
        for name, count in zip(self.names, self.counts, strict=True):
            whole = count if self.mixing == "mixed" or not self.drop_last else count // size
            if whole == 0:
                raise ConfigError(
                    f"data.sources.{name} gives {count} samples per epoch under "
                    f"strategy={self.strategy} ({self.mixing} batches of {self.batch_size} × "
                    f"{self.num_replicas} ranks), so it would never be trained on: use "
                    "strategy=round_robin or temperature, more steps_per_epoch, "
                    "drop_last=false, mixing=mixed or a smaller batch_size"
                )
        if len(self.global_batches(0)) == 0:
            raise ConfigError(
                f"data.sampling gives no training step per epoch (sources {self.sizes}, batch "
                f"{self.batch_size} × {self.num_replicas} ranks); set drop_last=false or a "
                "smaller batch_size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self._resume is not None and self._resume[0] != self.epoch:
            self._resume = None  # the resumed epoch is over

    def skip(self, batches: int) -> None:
        """Iterations of the current epoch start after its first ``batches`` steps (a resume).

        Every iterator of that epoch skips them (Lightning creates one when it sets up the
        data and another when the epoch starts); moving to another epoch ends the skipping.
        """
        self._resume = (self.epoch, int(batches))

    # ------------------------------------------------------------------ the epoch's batches
    def global_batches(self, epoch: int | None = None) -> list[list[tuple[int, int]]]:
        """Every global batch of ``epoch`` (all ranks), as lists of ``(source, index)``."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._build(epoch))
        return self._cache[1]

    def _build(self, epoch: int) -> list[list[tuple[int, int]]]:
        per_source: list[list[tuple[int, int]]] = [
            [
                Key(s, int(i), epoch * c + j)
                for j, i in enumerate(stream_slice(self.seed, s, n, epoch * c, c))
            ]
            for s, (n, c) in enumerate(zip(self.sizes, self.counts, strict=True))
        ]
        rng = np.random.default_rng((self.seed, 1_000_003, epoch))
        size = self.batch_size * self.num_replicas
        if self.mixing == "mixed":
            pool = [item for items in per_source for item in items]
            pool = [pool[i] for i in rng.permutation(len(pool))]
            batches = self._cut(pool, size)
        else:
            grouped = [self._cut(items, size) for items in per_source]
            if self.strategy == "round_robin":  # in turn: s0, s1, ..., s0, s1, ...
                longest = max(len(g) for g in grouped)
                batches = [g[j] for j in range(longest) for g in grouped if j < len(g)]
            else:
                flat = [b for g in grouped for b in g]
                batches = [flat[i] for i in rng.permutation(len(flat))]
        if self.steps_per_epoch is not None:
            batches = batches[: self.steps_per_epoch]
        return batches

    def _cut(self, items: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
        full, rest = divmod(len(items), size)
        batches = [items[j * size : (j + 1) * size] for j in range(full)]
        if rest and not self.drop_last:
            tail = items[full * size :]
            padding = (-len(tail)) % self.num_replicas
            # cycle through the epoch's items: a source may hold fewer than the padding
            batches.append(tail + [items[i % len(items)] for i in range(padding)])
        return batches

    def rank_slice(self, batch: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """This rank's part of a global batch (equal parts; the last batch may be smaller)."""
        part = len(batch) // self.num_replicas
        return batch[self.rank * part : (self.rank + 1) * part]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        resume = self._resume
        skip = resume[1] if resume is not None and resume[0] == self.epoch else 0
        for batch in self.global_batches()[skip:]:
            yield self.rank_slice(batch)

    def __len__(self) -> int:
        """Steps per epoch (the full epoch, also while resuming: Lightning counts from the
        restored position)."""
        return len(self.global_batches())

    def describe(self, names: Sequence[str]) -> Mapping[str, int]:
        """Samples per epoch from each source, by name (for the run's log)."""
        return dict(zip(names, self.counts, strict=True))
