"""``data.on_bad_sample``: a sample that cannot be read stops the run naming it (raise), or is
left out of its batch, warned about, counted and logged, up to ``data.max_bad_fraction`` (skip)."""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

from lightning_mtl.data import MergedDataModule, ShapesSource
from lightning_mtl.data.bad_samples import BadSampleCount
from lightning_mtl.data.sampling import MultiSourceSampler
from lightning_mtl.errors import DataError
from lightning_mtl.train import train
from tests.conftest import FAST, compose_config

SIZES = {"train": 24, "val": 8, "test": 8}


class Broken(Dataset[dict[str, Any]]):
    """Shapes scenes whose samples ``bad[split]`` fail as broken files do: ``file`` (the
    source's DataError naming the file), ``pil`` (PIL's UnidentifiedImageError, an OSError) or
    ``nan`` (a NaN in the depth label)."""

    def __init__(
        self,
        split: str = "train",
        bad: dict[str, list[int]] | None = None,
        kind: str = "file",
        sizes: dict[str, int] | None = None,
    ) -> None:
        self.inner = ShapesSource(split, sizes or SIZES, seed=3, image_size=16)
        self.bad, self.kind = set((bad or {}).get(split, [])), kind
        self.target_names, self.num_classes = self.inner.target_names, self.inner.num_classes
        self.num_labels = self.inner.num_labels

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.inner[index]
        if index in self.bad:
            if self.kind == "file":
                raise DataError(f"Broken: cannot read image /data/img_{index}.jpg: truncated")
            if self.kind == "pil":
                raise UnidentifiedImageError(f"cannot identify image file '/data/img_{index}.jpg'")
            item["targets"]["depth"][0, 0, 0] = math.nan
        return item


def module(policy: str, bad: list[int], kind: str = "file", **options: Any) -> MergedDataModule:
    factory = functools.partial(Broken, bad={"train": bad, "val": bad}, kind=kind)
    return MergedDataModule({"broken": factory}, batch_size=4, on_bad_sample=policy, **options)


@pytest.mark.parametrize(
    ("kind", "cause"),
    [
        ("file", r"Broken: cannot read image /data/img_5\.jpg: truncated"),
        ("pil", r"cannot identify image file '/data/img_5\.jpg'"),
        ("nan", r"label 'depth' holds NaN or inf"),
    ],
)
def test_raise_names_the_source_split_index_and_file(kind: str, cause: str) -> None:
    dm = module("raise", [5], kind)
    with pytest.raises(DataError, match=rf"source 'broken', train sample 5: {cause}") as error:
        list(dm.train_dataloader())
    assert isinstance(error.value.__cause__, DataError | OSError)  # chained to the original
    with pytest.raises(DataError, match=r"source 'broken', val sample 5"):
        list(dm.val_dataloader()[0])


def test_skip_leaves_samples_out_counts_them_and_stops_over_the_fraction(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dm = module("skip", [1, 2, 3, 5], max_bad_fraction=0.03)
    dataset = dm._split("train")
    batch = dm._collate("train", dataset[[(0, 0), (0, 5), (0, 6)]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["index"].tolist() == [0, 6]
    assert batch["skipped_samples"] == [
        ("broken", 5, "Broken: cannot read image /data/img_5.jpg: truncated")
    ]
    with caplog.at_level(logging.WARNING):
        batch = dm.on_before_batch_transfer(batch, 0)
    assert "skipped_samples" not in batch  # the model never sees it
    assert "skipped train sample 5 of source 'broken': Broken: cannot read image" in caplog.text
    assert dm.bad_samples.skipped == {"train": 1} and dm.bad_samples.read == {"train": 3}
    # a batch of bad samples only: no sample, no label, an image of the right shape
    empty = dm._collate("train", dataset[[(0, 1), (0, 2), (0, 3)]])
    assert empty["image"].shape == (0, 3, 16, 16) and empty["targets"] == {}
    with pytest.raises(DataError, match=r"4 of the 6 train samples read so far are bad \(66\.7%\)"):
        dm.on_before_batch_transfer(empty, 0)  # 4 > 0.03 × 100
    assert dm.state_dict() == {}  # no training position before a training loader exists
    # the example batch passes over bad samples; a source without a good one is named
    (example,) = dm.example_batch(size=3)
    assert example["index"].tolist() == [0, 4, 6]
    every = module("skip", list(range(SIZES["train"])))
    with pytest.raises(DataError, match=r"source 'broken': its first 8 val samples are all bad"):
        every.example_batch()
    with pytest.raises(DataError, match=r"its first 24 train samples are all bad"):
        every._collate("train", every._split("train")[[(0, 0)]])
    dm.train_dataloader()
    assert dm.state_dict()["bad_skipped"] == 4  # a resumed run keeps counting
    # the fraction is taken over at least 100 samples, then over the samples read
    count = BadSampleCount(0.01)
    count.update("val", 9, [("a", 0, "x")])
    with pytest.raises(DataError, match=r"data\.max_bad_fraction=0\.01"):
        count.update("val", 9, [("a", 1, "x")])
    count = BadSampleCount(0.01)
    count.update("train", 999, [])
    count.update("train", 0, [("a", i, "x") for i in range(10)])  # 10 of 1009: under 1 %
    with pytest.raises(DataError, match=r"11 of the 1010 train samples"):
        count.update("train", 0, [("a", 10, "x")])
    # the example batch that checks the tasks passes bad samples over
    (example,) = module("skip", [0, 1]).example_batch(2)
    assert example["index"].tolist() == [2, 3]


def test_a_run_skips_bad_samples_in_workers_and_logs_how_many(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One short run (a worker process reads the samples): 2 bad training samples per epoch,
    one of them a whole batch of bad samples; 1 bad val and test sample."""
    step_1 = MultiSourceSampler([SIZES["train"]], 4, seed=42).global_batches(0)[1]
    all_bad = [index for _, index in step_1]
    train_bad = [*all_bad, 7 if 7 not in all_bad else 8]
    bad = f"{{train: {train_bad}, val: [1], test: [2]}}"
    source = f"{{_target_: tests.test_bad_samples.Broken, _partial_: true, bad: {bad}}}"
    callback = compose_config("train", []).callbacks.skipped_samples  # in the defaults
    overrides = [o for o in FAST if not o.startswith(("data.", "callbacks."))]
    cfg = compose_config(
        "train",
        [
            *overrides,
            "callbacks=none",  # no checkpoint files: only the callback under test
            f"+callbacks.skipped_samples={{_target_: {callback._target_}}}",
            "data=merged",
            f"+data.sources.broken={source}",
            "data.batch_size=4",
            "data.num_workers=1",
            "data.on_bad_sample=skip",
            "data.max_bad_fraction=0.3",
            "preflight.mode=skip",  # the pre-flight scan would report the bad files first
            "trainer.max_epochs=2",
        ],
        tmp_path,
    )
    with caplog.at_level(logging.WARNING, logger="lightning_mtl.data.bad_samples"):
        metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 12  # the empty batch is a step too
    assert metrics["data/skipped_samples"] == 2 * 5  # 5 bad training samples per epoch
    assert metrics["data/skipped_val_samples"] == 1 and metrics["data/skipped_test_samples"] == 1
    assert f"skipped train sample {all_bad[0]} of source 'broken'" in caplog.text
    assert all(torch.isfinite(p).all() for p in objects["model"].parameters())
