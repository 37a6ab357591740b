"""The generated Shapes data: deterministic, consistent labels, the batch format of the template;
the default run's data module is merged data with one source: its order, sharding and resume."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from lightning_mtl.data.shapes import IMAGE_MEAN, IMAGE_STD, ShapesDataModule, ShapesDataset
from lightning_mtl.errors import ConfigError
from lightning_mtl.train import train
from tests.conftest import FAST, compose_config


def test_scenes_are_deterministic_from_seed_and_index() -> None:
    a, b, c = ShapesDataset(10, seed=1), ShapesDataset(10, seed=1), ShapesDataset(10, seed=2)
    for i in range(10):
        assert torch.equal(a[i]["image"], b[i]["image"])
        for key in a.target_names:
            assert torch.equal(a[i]["targets"][key], b[i]["targets"][key])
    assert not torch.equal(a[3]["image"], c[3]["image"])
    assert not torch.equal(a[3]["image"], a[4]["image"])


def test_labels_agree_with_each_other_and_the_image() -> None:
    data = ShapesDataset(64, seed=0)
    counts = []
    for i in range(64):
        sample = data[i]
        seg = sample["targets"]["segmentation"]
        depth = sample["targets"]["depth"][0]
        size = seg.shape[0]
        floor = data.scene.far + (data.scene.near - data.scene.far) * torch.arange(size) / (
            size - 1
        )
        floor = floor[:, None].expand(size, size)
        # Floor pixels carry the floor's depth; object pixels stand in front of it or on it.
        assert torch.allclose(depth[seg == 0], floor[seg == 0])
        assert (depth[seg > 0] <= data.scene.far).all()
        count = int(sample["targets"]["count"].item())
        assert 1 <= count <= data.scene.max_objects
        colors = sample["targets"]["colors"]
        assert 1 <= colors.sum() <= count
        assert (seg > 0).any() and int(seg.max()) <= 3
        dominant = sample["targets"]["dominant_color"].item()
        assert colors[dominant] == 1.0  # the dominant colour is one of the colours present
        assert all(bool(m) for m in sample["mask"].values())
        counts.append(count)
        assert sample["image"].shape == (3, size, size)
    # every count value occurs: the regression target is not degenerate
    assert set(counts) == {1, 2, 3, 4, 5}


def test_image_normalisation_is_close_to_zero_mean_unit_std() -> None:
    images = torch.stack([ShapesDataset(128, seed=5)[i]["image"] for i in range(128)])
    assert abs(float(images.mean())) < 0.25
    assert 0.7 < float(images.std()) < 1.5
    raw = images * IMAGE_STD + IMAGE_MEAN
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5


def test_datamodule_splits_are_disjoint_and_batches_have_the_template_format() -> None:
    dm = ShapesDataModule(train_size=16, val_size=8, test_size=8, batch_size=4, num_workers=0)
    dm.setup()
    seeds = {split: merged.datasets[0].seed for split, merged in dm.splits.items()}
    assert len(set(seeds.values())) == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["targets"]["segmentation"].shape == (4, 64, 64)
    assert batch["targets"]["depth"].shape == (4, 1, 64, 64)
    assert batch["targets"]["count"].shape == (4, 1)
    assert batch["targets"]["dominant_color"].shape == (4,)
    assert batch["targets"]["colors"].shape == (4, 6)
    assert batch["mask"]["depth"].dtype == torch.bool and batch["mask"]["depth"].shape == (4,)
    assert batch["source"].tolist() == [0] * 4  # one source: "shapes"
    scenes = dm.splits["train"].datasets[0]
    assert torch.equal(batch["image"][1], scenes[int(batch["index"][1])]["image"])
    (example,) = dm.example_batch(2)  # one source: one example batch
    assert torch.equal(example["image"][0], dm.splits["val"].datasets[0][0]["image"])
    assert np.isfinite(example["image"].numpy()).all()
    assert dm.target_names == ShapesDataset.target_names
    assert dm.num_classes == ShapesDataset.num_classes and dm.eval_sources == {
        "shapes": list(ShapesDataset.target_names)
    }


def small(**options: Any) -> ShapesDataModule:
    return ShapesDataModule(
        **{"train_size": 20, "val_size": 4, "test_size": 4, "batch_size": 4, "image_size": 8}
        | {"num_workers": 0}
        | options
    )


def order(dm: ShapesDataModule, epoch: int = 0) -> list[list[int]]:
    """The indices of an epoch's training batches."""
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [[i for _, i in batch] for batch in loader.sampler]


def test_the_scenes_follow_seed_and_the_order_follows_the_runs_seed() -> None:
    assert order(small(sampling_seed=1)) == order(small(sampling_seed=1))
    assert order(small(sampling_seed=1)) != order(small(sampling_seed=2))
    assert order(small(), epoch=0) != order(small(), epoch=1)
    a, b = small(sampling_seed=1), small(sampling_seed=2, seed=0)
    assert torch.equal(a._split("val").sample(0, 1)["image"], b._split("val").sample(0, 1)["image"])
    cfg = compose_config("train", ["seed=7"])
    assert cfg.data.sampling_seed == 7 and cfg.data.seed == 0  # the run's seed, the same scenes
    # every sample once per epoch, in whole batches (20 = 5 × 4)
    assert sorted(i for batch in order(small()) for i in batch) == list(range(20))


def test_shapes_are_sharded_across_ranks_like_merged_data() -> None:
    seen = []
    for rank in range(2):
        dm = small()
        dm._rank = lambda rank=rank: (rank, 2)
        seen.append(order(dm))
    assert len(seen[0]) == len(seen[1]) == 2  # 20 samples, global batch 8: 2 steps, 4 dropped
    flat = [i for rank in seen for batch in rank for i in batch]
    assert len(flat) == len(set(flat)) == 16  # no sample on two ranks


def resumed(dm: ShapesDataModule, state: dict, loader_first: bool) -> list[list[int]]:
    """The batches of the epoch a checkpoint's ``state`` stopped in, as ``dm`` continues it:
    with the loader built before the state is restored (as when a scheduler counts the steps
    of training) or after."""
    if loader_first:
        loader = dm.train_dataloader()
        dm.load_state_dict(state)
    else:
        dm.load_state_dict(state)
        loader = dm.train_dataloader()
    return [[i for _, i in batch] for batch in loader.sampler]


@pytest.mark.parametrize("loader_first", [True, False], ids=["scheduler", "no_scheduler"])
def test_the_data_modules_state_is_the_one_resume_path(loader_first: bool) -> None:
    whole = order(small(), epoch=1)
    dm = small()
    dm.train_dataloader()
    dm._position = lambda: 2  # two batches of epoch 1 trained on
    dm._sampler.set_epoch(1)
    state = dm.state_dict()
    assert state == {"epoch": 1, "batches": 2, "global_batch": 4, "bad_read": 0, "bad_skipped": 0}
    assert resumed(small(), state, loader_first) == whole[2:]
    assert dm.train_dataloader().state_dict() == {}  # the loader holds no second copy
    # two ranks of batch 2 (the same global batch of 4): together they continue exactly
    ranks = []
    for rank in range(2):
        dm = small(batch_size=2)
        dm._rank = lambda rank=rank: (rank, 2)
        ranks.append(resumed(dm, state, loader_first))
    assert [a + b for a, b in zip(*ranks, strict=True)] == whole[2:]


def test_bad_shapes_settings_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.train_size=0: expected a positive integer"):
        ShapesDataModule(train_size=0)
    with pytest.raises(ConfigError, match=r"data\.image_size=-3"):
        ShapesDataModule(image_size=-3)
    with pytest.raises(ConfigError, match=r"data\.on_bad_sample='ignore'; accepted: raise, skip"):
        ShapesDataModule(on_bad_sample="ignore")
    with pytest.raises(ConfigError, match=r"data\.max_bad_fraction=1\.5"):
        ShapesDataModule(max_bad_fraction=1.5)
    with pytest.raises(ConfigError, match=r"data\.sampling has unknown keys \['shuffle'\]"):
        ShapesDataModule(sampling={"shuffle": True})


class Killed(RuntimeError):
    """What :class:`KillAfterStep` raises."""


class KillAfterStep(L.Callback):
    """Saves a checkpoint to ``path`` after ``step`` optimizer steps (as a checkpoint callback
    does at a step's end), then ends the process's training abruptly, as a kill would."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise Killed(f"killed after step {self.step}")


# Slow (three default-config runs): the merged-data resume tests of the default suite take the
# same data path; tests/test_kill_resume.py kills and resumes the default run too.
@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["warmup_cosine", "none"])
def test_the_default_run_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_one(
    scheduler: str, tmp_path: Path
) -> None:
    """The default Shapes data (4 steps per epoch here), 2 epochs: killed after step 5 (in
    epoch 1) and resumed from its checkpoint, the final parameters equal a run that never
    stopped. With the default schedule (which counts the steps of training, so Lightning builds
    the loader before it reads the checkpoint) and without one."""

    def run(out: Path, *more: str) -> dict[str, torch.Tensor]:
        cfg = compose_config(
            "train",
            [
                *(o for o in FAST if not o.startswith("callbacks.")),
                "callbacks=none",  # no checkpoint writes but the test's own
                "data.train_size=32",
                "trainer.max_epochs=2",
                "trainer.limit_val_batches=1",
                "test=false",
                *(["model.scheduler=null"] if scheduler == "none" else []),
                *more,
            ],
            out,
        )
        _, objects = train(cfg)
        return objects["model"].state_dict()

    whole = run(tmp_path / "whole")
    last = tmp_path / "step5.ckpt"
    with pytest.raises(Killed):
        run(
            tmp_path / "first",
            f"+callbacks.kill={{_target_: {__name__}.KillAfterStep, step: 5, path: '{last}'}}",
        )
    assert torch.load(last, weights_only=True)["ShapesDataModule"]["batches"] == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable.*")
        rest = run(tmp_path / "rest", f"ckpt_path={last}")
    assert whole.keys() == rest.keys()
    for key, value in whole.items():
        assert torch.equal(value, rest[key]), key
