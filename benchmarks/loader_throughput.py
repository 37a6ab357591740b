"""Training-loader throughput of merged data against one dataset with the same samples.

Both loaders deliver the same N generated Shapes samples per epoch at the same batch size:

* ``single``: one :class:`~lightning_mtl.data.ShapesSource` of N samples in a plain shuffled
  ``DataLoader`` (what ``ShapesDataModule`` did before it became merged data with one source);
* ``merged``: the same N samples split into two sources (its first and second halves, as
  ``torch.utils.data.Subset``) merged by :class:`~lightning_mtl.data.MergedDataModule`: the
  multi-source sampler, the per-sample source bookkeeping and the masking collate.

So the ratio isolates what merging costs. Each round times one full epoch of each (the order
alternates between rounds, so drifting machine load hits both sides alike); a round's ratio is
``merged samples/s ÷ single samples/s``; the table gives the median over rounds. A second row
merges two sources with *disjoint* labels (segmentation and depth / the three image-level tasks),
the heterogeneous setting itself; each of its samples carries fewer labels, so it is shown for
information, not as the like-for-like ratio.

    uv run python benchmarks/loader_throughput.py [--samples 512] [--batch-size 32]
        [--workers 0 2] [--rounds 5] [--image-size 64] [--mixing mixed homogeneous]

Prints a Markdown table; the target is a like-for-like ratio of at least 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Subset

from lightning_mtl.data import MergedDataModule, ShapesSource


def single_loader(n: int, args: argparse.Namespace, workers: int) -> DataLoader:
    dataset = ShapesSource("train", {"train": n}, seed=1, image_size=args.image_size)
    generator = torch.Generator().manual_seed(0)
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def merged_loader(
    n: int, args: argparse.Namespace, workers: int, mixing: str, disjoint: bool
) -> DataLoader:
    def half(part: int, targets: list[str] | None) -> Callable[..., object]:
        def make(split: str) -> object:
            full = ShapesSource(split, {split: n}, targets, seed=1, image_size=args.image_size)
            indices = range(0, n // 2) if part == 0 else range(n // 2, n)
            subset = Subset(full, list(indices))
            subset.target_names = full.target_names  # type: ignore[attr-defined]
            return subset

        return make

    first = ["segmentation", "depth"] if disjoint else None
    second = ["count", "dominant_color", "colors"] if disjoint else None
    module = MergedDataModule(
        {"first": half(0, first), "second": half(1, second)},
        batch_size=args.batch_size,
        sampling={"mixing": mixing},
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    module.setup("fit")
    return module.train_dataloader()


def epoch_rate(loader: DataLoader, epoch: int) -> float:
    """Samples per second over one full epoch of ``loader``."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += batch["image"].shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mixing", nargs="+", default=["mixed", "homogeneous"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for workers in args.workers:
        single = single_loader(args.samples, args, workers)
        for mixing in args.mixing:
            for disjoint in (False, True):
                merged = merged_loader(args.samples, args, workers, mixing, disjoint)
                epoch_rate(single, 0), epoch_rate(merged, 0)  # warm-up (worker start, caches)
                ratios, rates = [], []
                for r in range(args.rounds):
                    pair = (single, merged) if r % 2 == 0 else (merged, single)
                    measured = {id(loader): epoch_rate(loader, r + 1) for loader in pair}
                    rate_single, rate_merged = measured[id(single)], measured[id(merged)]
                    ratios.append(rate_merged / rate_single)
                    rates.append((rate_single, rate_merged))
                labels = "disjoint labels (info)" if disjoint else "same samples and labels"
                rows.append(
                    (
                        workers,
                        mixing,
                        labels,
                        statistics.median(r[0] for r in rates),
                        statistics.median(r[1] for r in rates),
                        statistics.median(ratios),
                        min(ratios),
                    )
                )
    print("| workers | mixing | merged sources | single samples/s | merged samples/s |", end="")
    print(" ratio (median) | ratio (min) |")
    print("|---:|:---|:---|---:|---:|---:|---:|")
    for workers, mixing, labels, single_rate, merged_rate, ratio, low in rows:
        print(
            f"| {workers} | {mixing} | {labels} | {single_rate:.0f} | {merged_rate:.0f} | "
            f"{ratio:.3f} | {low:.3f} |"
        )
    print(
        f"\n{args.samples} Shapes samples of {args.image_size}×{args.image_size} per epoch, "
        f"batch {args.batch_size}, {args.rounds} alternating rounds; ratio = merged ÷ single."
    )


if __name__ == "__main__":
    main()
