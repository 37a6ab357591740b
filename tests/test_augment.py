"""Training augmentation: the papers' scale-crop and flip keep NYUv2's labels on the image, each
access draws anew, evaluation never augments, and every draw is reproducible.

The NYUv2 sample is written in the native ``.npy`` layout with labels that are functions of the
pixel position, so any output pixel tells where in the file it came from: depth ``1 + x + W·y``
names the source pixel exactly (and shows the division by the scale), the image's channels are
x and y ramps, the segmentation is a band of x, and the normals point towards +x everywhere.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_mtl.data.augment import ImageAugment
from lightning_mtl.data.sources.csv_folder import CsvImageFolder
from lightning_mtl.data.sources.nyuv2 import NYUv2
from lightning_mtl.errors import ConfigError

H, W = 24, 32
BAND = 4  # segmentation class = x // BAND (8 classes of NYUv2's 13)
NORMAL = (0.6, 0.0, 0.8)
SCALES = (1.0, 1.2, 1.5)
IDENTITY = {"mean": [0.0], "std": [1.0]}  # keep pixel values readable


def write_positional_nyuv2(root: Path, count: int = 2) -> None:
    """``count`` identical train and val samples whose labels encode the pixel position."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    arrays = {
        "image": np.stack([x / (W - 1), y / (H - 1), np.full_like(x, 0.5)], axis=-1),
        "label": (x // BAND).astype(np.float32),
        "depth": (1.0 + x + W * y)[..., None],
        "normal": np.broadcast_to(np.array(NORMAL, np.float32), (H, W, 3)).copy(),
    }
    for split in ("train", "val"):
        for folder, array in arrays.items():
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                np.save(root / split / folder / f"{i}.npy", array)


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nyuv2")
    write_positional_nyuv2(root)
    return root


def decode(sample: dict) -> tuple[float, bool, torch.Tensor, torch.Tensor]:
    """The scale, whether the sample is flipped, and every output pixel's source (x, y),
    read from its depth; asserts the depth is a whole pixel id divided by one of SCALES."""
    depth = sample["targets"]["depth"][0].double()
    found = []
    for scale in SCALES:
        source = depth * scale - 1.0
        ids = source.round()
        if torch.allclose(source, ids, atol=1e-3):
            xs, ys = ids.remainder(W), ids.div(W, rounding_mode="floor")
            if int(xs.max() - xs.min()) + 1 == int(W / scale):
                found.append((scale, xs, ys))
    assert len(found) == 1, "depth is not a pixel id divided by exactly one scale"
    scale, xs, ys = found[0]
    flipped = bool(xs[0, 0] > xs[0, -1])
    return scale, flipped, xs, ys


def test_scale_crop_and_flip_keep_every_label_on_the_image(nyu_root: Path) -> None:
    dataset = NYUv2(nyu_root, normalization=IDENTITY, seed=3)
    assert dataset.scales == SCALES and dataset.augmenter is not None
    seen = set()
    for _ in range(24):
        sample = dataset[0]
        image, targets = sample["image"], sample["targets"]
        assert image.shape == (3, H, W) and targets["segmentation"].dtype == torch.int64
        scale, flipped, xs, ys = decode(sample)
        seen.add((scale, flipped))
        # The crop is a window of int(H/s) × int(W/s) source pixels, mirrored when flipped.
        assert int(ys.max() - ys.min()) + 1 == int(H / scale)
        assert bool((xs.diff(dim=1) <= 0).all() if flipped else (xs.diff(dim=1) >= 0).all())
        # Segmentation is read at the same source pixel as depth (both nearest).
        assert torch.equal(targets["segmentation"], (xs // BAND).long())
        # The bilinear image samples within a pixel of it.
        assert float((image[0].double() * (W - 1) - xs).abs().max()) <= 1.0
        assert float((image[1].double() * (H - 1) - ys).abs().max()) <= 1.0
        torch.testing.assert_close(image[2], torch.full((H, W), 0.5))
        # Normals: still unit length, x negated exactly when the image is mirrored.
        normals = targets["normals"]
        expected = torch.tensor([-NORMAL[0] if flipped else NORMAL[0], NORMAL[1], NORMAL[2]])
        torch.testing.assert_close(normals, expected.view(3, 1, 1).expand(3, H, W))
    assert {s for s, _ in seen} == set(SCALES) and {f for _, f in seen} == {False, True}


def test_two_reads_differ_in_training_and_match_in_evaluation(nyu_root: Path) -> None:
    train = NYUv2(nyu_root)
    first, second = train[0], train[0]
    assert not torch.equal(first["image"], second["image"])
    assert not torch.equal(first["targets"]["depth"], second["targets"]["depth"])
    # with independent draws 1 read in 6 would repeat its predecessor (scale 1, same flip):
    # plain reads walk through the (scale, flip) choices, so none does, at any index or seed
    for seed in range(3):
        reads = NYUv2(nyu_root, seed=seed)
        for index in range(len(reads)):
            images = [reads[index]["image"] for _ in range(7)]
            assert all(not torch.equal(a, b) for a, b in itertools.pairwise(images))
    for split in ("val", "test"):
        evaluation = NYUv2(nyu_root, split=split, augment=True)
        assert evaluation.augmenter is None
        assert torch.equal(evaluation[0]["image"], evaluation[0]["image"])
    plain = NYUv2(nyu_root, augment=False)[0]
    val = NYUv2(nyu_root, split="val")[0]
    for key in ("segmentation", "depth", "normals"):
        assert torch.equal(plain["targets"][key], val["targets"][key])
    assert torch.equal(plain["image"], val["image"])
    # flip only (scales [1.0]): the sample itself or its mirror, nothing in between
    flips = NYUv2(nyu_root, scales=[1.0], normalization=IDENTITY)
    outcomes = {decode(flips[1])[1] for _ in range(12)}
    assert outcomes == {False, True}


def test_draws_are_reproducible_and_leave_the_global_generator_alone(nyu_root: Path) -> None:
    a, b = NYUv2(nyu_root, seed=7), NYUv2(nyu_root, seed=7)
    for index in (0, 1, 0):  # the same sequence of reads gives the same samples
        assert torch.equal(a[index]["image"], b[index]["image"])
    other = NYUv2(nyu_root, seed=8)  # another seed, other draws
    differ = [not torch.equal(other.load(0, d)["image"], a.load(0, d)["image"]) for d in range(3)]
    assert any(differ)

    # An explicit draw (the data module's) is a pure function of (seed, index, draw): independent
    # of the reads before it, the same in a fresh instance, different for another draw.
    state = torch.get_rng_state()
    drawn = a.load(1, draw=41)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(NYUv2(nyu_root, seed=7).load(1, draw=41)["image"], drawn["image"])
    assert torch.equal(a.load(-1, draw=41)["image"], drawn["image"])  # a negative index too
    draws = [a.load(1, draw=d)["targets"]["depth"] for d in range(4)]
    assert len({tuple(d.flatten()[:64].tolist()) for d in draws}) > 1
    with pytest.raises(ValueError, match="draw=-1"):
        a.load(0, draw=-1)


def test_explicit_draws_give_the_same_samples_in_dataloader_workers(nyu_root: Path) -> None:
    """What the data module relies on: (index, draw) keys read in worker processes give the
    samples the main process gives, whatever worker reads them and in whatever order."""
    dataset = NYUv2(nyu_root, image_size=[12, 16])
    keys = [(0, 11), (1, 12), (0, 13), (1, 11)]

    class Keyed(torch.utils.data.Dataset):
        def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
            return dataset.load(*key)["targets"]["depth"]

    loader = torch.utils.data.DataLoader(Keyed(), sampler=keys, batch_size=None, num_workers=2)
    in_workers = list(loader)
    for key, depth in zip(reversed(keys), reversed(in_workers), strict=True):
        assert torch.equal(depth, dataset.load(*key)["targets"]["depth"])


def test_augmentation_options_are_checked(nyu_root: Path) -> None:
    for scales in ([], [0.5, 1.0], "big"):
        with pytest.raises(ConfigError, match=r"NYUv2: scales=.* numbers >= 1"):
            NYUv2(nyu_root, scales=scales, split="val")  # checked on every split
    with pytest.raises(ConfigError, match="seed=-1 must be a non-negative integer"):
        NYUv2(nyu_root, seed=-1)
    with pytest.raises(ConfigError, match=r"Test: crop_scale=\[0.0, 1.0\] must be \[low, high\]"):
        ImageAugment(crop_scale=[0.0, 1.0], dataset="Test")
    with pytest.raises(ConfigError, match=r"color_jitter=-0\.1 must be a number in"):
        ImageAugment(color_jitter=-0.1)


def test_image_sources_crop_flip_and_jitter_in_training_only(tmp_path: Path) -> None:
    halves = Image.new("RGB", (16, 12), (255, 0, 0))
    halves.paste((0, 0, 255), (8, 0, 16, 12))  # left red, right blue
    halves.save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("image,label,split\na.png,1,train\na.png,0,val\n")
    common = {"columns": {"label": {"kind": "class", "num_classes": 2}}, "image_size": [12, 16]}
    common["normalization"] = IDENTITY
    plain = CsvImageFolder(tmp_path, **common)[0]["image"]
    flips = CsvImageFolder(tmp_path, augment=True, crop_scale=None, **common)
    outcomes = set()
    for _ in range(12):  # without crop or jitter: the image or its exact mirror
        image = flips[0]["image"]
        assert torch.equal(image, plain) or torch.equal(image, plain.flip(-1))
        outcomes.add(torch.equal(image, plain))
    assert outcomes == {True, False}

    full = CsvImageFolder(tmp_path, augment=True, color_jitter=0.4, seed=1, **common)
    images = [full[0]["image"] for _ in range(3)]
    assert all(i.shape == (3, 12, 16) for i in images)
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])
    assert torch.equal(full.load(0, draw=5)["image"], full.load(0, draw=5)["image"])
    val = CsvImageFolder(tmp_path, split="val", augment=True, color_jitter=0.4, **common)
    assert val.augmenter is None and torch.equal(val[0]["image"], plain)
