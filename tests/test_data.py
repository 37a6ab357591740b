"""The generated Shapes data: deterministic, consistent labels, the batch format of the template."""

from __future__ import annotations

import numpy as np
import torch

from lightning_mtl.data.shapes import IMAGE_MEAN, IMAGE_STD, ShapesDataModule, ShapesDataset


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
    dm.setup("fit")
    seeds = {split: ds.seed for split, ds in dm.splits.items()}
    assert len(set(seeds.values())) == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["targets"]["segmentation"].shape == (4, 64, 64)
    assert batch["targets"]["depth"].shape == (4, 1, 64, 64)
    assert batch["targets"]["count"].shape == (4, 1)
    assert batch["targets"]["dominant_color"].shape == (4,)
    assert batch["targets"]["colors"].shape == (4, 6)
    assert batch["mask"]["depth"].dtype == torch.bool and batch["mask"]["depth"].shape == (4,)
    example = dm.example_batch(2)
    assert torch.equal(example["image"][0], dm.splits["val"][0]["image"])
    assert np.isfinite(example["image"].numpy()).all()
