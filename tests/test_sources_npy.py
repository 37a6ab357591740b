"""NYUv2 and Cityscapes read MTAN's preprocessed .npy layout, and reject malformed copies clearly.

Every test writes a tiny copy of the native layout (3 train + 2 val samples of 12×16) into
``tmp_path``: the real releases cannot be downloaded here, and the format is what is tested.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, default_collate

from lightning_mtl.data.inputs import FALLBACK_NORMALIZATION
from lightning_mtl.data.sources.cityscapes import Cityscapes
from lightning_mtl.data.sources.nyuv2 import NYUv2
from lightning_mtl.errors import DataError
from lightning_mtl.models.losses import LOSSES
from tests.conftest import compose_config

H, W = 12, 16
COUNTS = {"train": 3, "val": 2}
MTAN = "https://github.com/lorenmt/mtan"

Arrays = dict[str, dict[str, list[np.ndarray]]]  # split -> folder -> one array per index


def _unit_normals(rng: np.random.Generator) -> np.ndarray:
    normals = rng.normal(size=(H, W, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[:4, :4] = 0.0  # a missing block
    return normals


def write_layout(root: Path, label_folders: dict[str, int], with_normals: bool) -> Arrays:
    """Write the native layout under ``root``; return what was written, for comparisons."""
    rng = np.random.default_rng(0)
    written: Arrays = {}
    for split, count in COUNTS.items():
        written[split] = {}
        for i in range(count):
            arrays = {"image": rng.uniform(0, 1, size=(H, W, 3)).astype(np.float32)}
            for folder, classes in label_folders.items():
                label = rng.integers(0, classes, size=(H, W)).astype(np.float32)
                label[0, :] = -1  # an unlabelled row; MTAN stores the ids as floats
                arrays[folder] = label
            depth = rng.uniform(0.5, 10.0, size=(H, W, 1)).astype(np.float32)
            depth[4:8, 4:8] = 0.0  # missing depth
            arrays["depth"] = depth
            if with_normals:
                arrays["normal"] = _unit_normals(rng)
            for folder, array in arrays.items():
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", array)
                written[split].setdefault(folder, []).append(array)
    return written


@pytest.fixture
def nyu(tmp_path: Path) -> tuple[Path, Arrays]:
    root = tmp_path / "nyuv2"
    return root, write_layout(root, {"label": 13}, with_normals=True)


@pytest.fixture
def city(tmp_path: Path) -> tuple[Path, Arrays]:
    root = tmp_path / "cityscapes"
    return root, write_layout(root, {"label_7": 7, "label_19": 19}, with_normals=False)


def _message(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    return str(excinfo.value)


# ------------------------------------------------------------------------------------ reading
def test_nyuv2_reads_every_target_at_native_size(nyu: tuple[Path, Arrays]) -> None:
    root, written = nyu
    dataset = NYUv2(root, split="train", augment=False)
    assert len(dataset) == 3 and len(NYUv2(root, split="val")) == 2
    assert dataset.target_names == ("segmentation", "depth", "normals")
    assert NYUv2.num_classes == {"segmentation": 13} and NYUv2.num_labels == {}
    for i in range(3):
        sample = dataset[i]
        arrays = {folder: values[i] for folder, values in written["train"].items()}
        image, targets = sample["image"], sample["targets"]
        assert image.shape == (3, H, W) and image.dtype == torch.float32
        expected_image = FALLBACK_NORMALIZATION(torch.from_numpy(arrays["image"]).permute(2, 0, 1))
        torch.testing.assert_close(image, expected_image)
        assert set(targets) == {"segmentation", "depth", "normals"}
        seg = targets["segmentation"]
        assert seg.shape == (H, W) and seg.dtype == torch.int64
        assert torch.equal(seg, torch.from_numpy(arrays["label"].astype(np.int64)))
        assert int(seg[0, 5]) == -1 and int(seg[3, 7]) == int(arrays["label"][3, 7])
        depth = targets["depth"]
        assert depth.shape == (1, H, W) and depth.dtype == torch.float32
        assert torch.equal(depth[0], torch.from_numpy(arrays["depth"][..., 0]))
        assert float(depth[0, 5, 5]) == 0.0
        normals = targets["normals"]
        assert normals.shape == (3, H, W) and normals.dtype == torch.float32
        assert torch.equal(normals, torch.from_numpy(arrays["normal"]).permute(2, 0, 1))
        assert {k: bool(v) for k, v in sample["mask"].items()} == dict.fromkeys(targets, True)


def test_test_split_reads_val_and_unknown_split_is_refused(nyu: tuple[Path, Arrays]) -> None:
    root, _ = nyu
    assert NYUv2.split_folders["test"] == "val" and Cityscapes.split_folders["test"] == "val"
    test, val = NYUv2(root, split="test"), NYUv2(root, split="val")
    assert len(test) == 2 and test.split_dir == root / "val"
    assert torch.equal(test[1]["image"], val[1]["image"])
    assert torch.equal(test[1]["targets"]["depth"], val[1]["targets"]["depth"])
    with pytest.raises(DataError, match="split='holdout' is not one of train, val, test"):
        NYUv2(root, split="holdout")


def test_targets_subset_loads_and_requires_only_those_folders(nyu: tuple[Path, Arrays]) -> None:
    root, _ = nyu
    shutil.rmtree(root / "train" / "normal")
    dataset = NYUv2(root, targets=["depth", "segmentation"])
    assert dataset.target_names == ("segmentation", "depth")
    assert set(dataset[0]["targets"]) == {"segmentation", "depth"}
    assert set(dataset[0]["mask"]) == {"segmentation", "depth"}
    with pytest.raises(DataError, match="normal") as err:
        NYUv2(root)  # all targets: the normal folder is needed now
    assert str(root / "train" / "normal") in _message(err)
    with pytest.raises(DataError, match=r"targets=\['albedo'\].*segmentation, depth, normals"):
        NYUv2(root, targets=["albedo"])


def test_image_size_resizes_each_target_as_its_values_allow(nyu: tuple[Path, Arrays]) -> None:
    root, written = nyu
    label, depth = written["train"]["label"][0], written["train"]["depth"][0][..., 0]
    # Down by 2: nearest keeps every other pixel, so the values are the written ones.
    small = NYUv2(root, image_size=(6, 8), augment=False)[0]
    assert small["image"].shape == (3, 6, 8)
    seg, dep = small["targets"]["segmentation"], small["targets"]["depth"]
    assert seg.shape == (6, 8) and seg.dtype == torch.int64
    assert torch.equal(seg, torch.from_numpy(label[::2, ::2].astype(np.int64)))
    assert dep.shape == (1, 6, 8) and torch.equal(dep[0], torch.from_numpy(depth[::2, ::2]))
    assert int((dep == 0).sum()) == 4  # the 4×4 missing block, subsampled, is still 0
    assert small["targets"]["normals"].shape == (3, 6, 8)

    # Up by 2 (an int gives a square; here [24, 32] keeps the aspect).
    large = NYUv2(root, image_size=[24, 32], augment=False)[0]
    dep = large["targets"]["depth"][0]
    assert torch.equal(dep, torch.from_numpy(np.repeat(np.repeat(depth, 2, 0), 2, 1)))
    assert int((dep == 0).sum()) == 4 * 16  # missing depth stays 0, never blended
    normals = large["targets"]["normals"]
    norms = normals.norm(dim=0)
    nonzero = norms > 0
    torch.testing.assert_close(norms[nonzero], torch.ones(int(nonzero.sum())))
    assert not bool(nonzero[:6, :6].any())  # inside the missing block: still 0-vectors
    assert int(nonzero.sum()) >= 24 * 32 - 8 * 8
    assert NYUv2(root, image_size=10)[0]["image"].shape == (3, 10, 10)
    with pytest.raises(DataError, match="image_size=0 must be positive"):
        NYUv2(root, image_size=0)


def test_cityscapes_reads_the_label_folder_of_num_classes(city: tuple[Path, Arrays]) -> None:
    root, written = city
    seven = Cityscapes(root, augment=False)
    assert len(seven) == 3 and seven.target_names == ("segmentation", "depth")
    assert seven.num_classes == {"segmentation": 7}
    sample = seven[2]
    assert torch.equal(
        sample["targets"]["segmentation"],
        torch.from_numpy(written["train"]["label_7"][2].astype(np.int64)),
    )
    assert sample["targets"]["depth"].shape == (1, H, W)
    shutil.rmtree(root / "val" / "label_7")  # 19 classes needs only label_19/
    nineteen = Cityscapes(root, split="test", num_classes=19)
    assert nineteen.num_classes == {"segmentation": 19} and len(nineteen) == 2
    assert torch.equal(
        nineteen[1]["targets"]["segmentation"],
        torch.from_numpy(written["val"]["label_19"][1].astype(np.int64)),
    )
    assert Cityscapes(root, targets=["depth"], image_size=8)[0]["targets"]["depth"].shape == (
        1,
        8,
        8,
    )
    with pytest.raises(DataError) as err:
        Cityscapes(root, num_classes=5)
    assert "num_classes=5" in _message(err) and "7 or 19" in _message(err)
    with pytest.raises(DataError) as err:
        Cityscapes(root, split="val", num_classes=7)
    assert str(root / "val" / "label_7") in _message(err) and MTAN in _message(err)


def test_dataloader_collates_batches(nyu: tuple[Path, Arrays]) -> None:
    root, _ = nyu
    loader = DataLoader(NYUv2(root), batch_size=2, collate_fn=default_collate)
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [2, 1]
    batch = batches[0]
    assert batch["image"].shape == (2, 3, H, W)
    assert batch["targets"]["segmentation"].shape == (2, H, W)
    assert batch["targets"]["segmentation"].dtype == torch.int64
    assert batch["targets"]["depth"].shape == (2, 1, H, W)
    assert batch["targets"]["normals"].shape == (2, 3, H, W)
    assert batch["mask"]["depth"].shape == (2,) and batch["mask"]["depth"].dtype == torch.bool


# ------------------------------------------------------------------------------------- errors
def test_missing_root_names_path_layout_and_source(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        NYUv2(missing)
    message = _message(err)
    assert str(missing) in message and "not found" in message
    assert "Expected layout" in message and "<root>/train/normal/<i>.npy" in message
    assert MTAN in message
    with pytest.raises(DataError) as err:
        Cityscapes(missing)
    assert "label_19/<i>.npy" in _message(err) and MTAN in _message(err)


def test_malformed_folders_stop_when_built(nyu: tuple[Path, Arrays]) -> None:
    root, _ = nyu
    shutil.rmtree(root / "val" / "depth")
    with pytest.raises(DataError) as err:
        NYUv2(root, split="val")
    assert str(root / "val" / "depth") in _message(err) and "not found" in _message(err)

    (root / "train" / "depth" / "1.npy").unlink()
    with pytest.raises(DataError) as err:
        NYUv2(root)
    message = _message(err)
    assert "index 1 in image/ but not in depth/" in message
    assert str(root / "train" / "depth" / "1.npy") in message

    np.save(root / "train" / "depth" / "1.npy", np.ones((H, W, 1), np.float32))
    np.save(root / "train" / "normal" / "7.npy", np.ones((H, W, 3), np.float32))
    with pytest.raises(DataError, match="index 7 in normal/ but not in image/"):
        NYUv2(root)

    for path in (root / "train").glob("*/*.npy"):
        path.unlink()
    with pytest.raises(DataError, match=r"holds no \.npy file; expected at least one sample"):
        NYUv2(root)


@pytest.mark.parametrize(
    ("folder", "array", "found", "expected"),
    [
        ("label", np.zeros((H, W - 1), np.float32), "12×15", "12×16 (the image's H×W)"),
        ("normal", np.zeros((H, W, 2), np.float32), "12×16×2", "12×16×3"),
        ("depth", np.zeros((H, W, 3), np.float32), "12×16×3", "12×16×1 or 12×16"),
        ("image", np.zeros((H, W), np.float32), "12×16", "H×W×3"),
    ],
)
def test_wrong_shapes_name_file_found_and_expected(
    nyu: tuple[Path, Arrays], folder: str, array: np.ndarray, found: str, expected: str
) -> None:
    root, _ = nyu
    path = root / "train" / folder / "1.npy"
    np.save(path, array)
    dataset = NYUv2(root)  # shapes are checked when read, not when built
    dataset[0]
    with pytest.raises(DataError) as err:
        dataset[1]
    message = _message(err)
    assert str(path) in message
    assert f"has shape {found}; expected {expected}" in message


def test_corrupt_file_and_out_of_range_ids_name_the_file(nyu: tuple[Path, Arrays]) -> None:
    root, _ = nyu
    corrupt = root / "train" / "label" / "2.npy"
    corrupt.write_bytes(b"\x00garbage, not an array" * 4)
    dataset = NYUv2(root)
    with pytest.raises(DataError) as err:
        dataset[2]
    assert f"cannot read {corrupt}" in _message(err) and MTAN in _message(err)

    label = np.zeros((H, W), np.float32)
    label[3, 3] = 13
    np.save(root / "train" / "label" / "0.npy", label)
    with pytest.raises(DataError) as err:
        dataset[0]
    assert str(root / "train" / "label" / "0.npy") in _message(err)
    assert "class ids 0..13; expected -1 (ignore) .. 12 for 13 classes" in _message(err)


# ------------------------------------------------------------------------------------ configs
def test_configs_build_the_sources_and_the_tasks_ignore_missing_labels(
    nyu: tuple[Path, Arrays], city: tuple[Path, Arrays], tmp_path: Path
) -> None:
    nyu_root, _ = nyu
    city_root, _ = city
    cfg = compose_config(
        "train",
        ["+data/source=nyuv2", "task=[nyuv2_segmentation,nyuv2_depth,nyuv2_normals]"],
        tmp_path,
    )
    assert cfg.data.source.root.endswith("data/nyuv2")
    assert list(cfg.tasks) == ["segmentation", "depth", "normals"]
    source = OmegaConf.to_container(cfg.data.source, resolve=True)
    dataset = instantiate({**source, "root": str(nyu_root)})(split="val")
    assert isinstance(dataset, NYUv2) and len(dataset) == 2
    assert source["augment"] and dataset.augmenter is None  # evaluation never augments
    train = instantiate({**source, "root": str(nyu_root)})(split="train")
    assert train.augmenter is not None and train.augmenter.scales == (1.0, 1.2, 1.5)
    batch = default_collate([dataset[0], dataset[1]])
    targets = batch["targets"]

    # Outputs equal to the labels wherever a label exists, garbage elsewhere: each task's
    # configured loss must skip the missing values and come out (near) zero.
    tasks = OmegaConf.to_container(cfg.tasks, resolve=True)
    losses = {}
    for name, task in tasks.items():
        kwargs = dict(task["loss"])
        losses[name] = LOSSES.build(kwargs.pop("name"), name, **kwargs)
    assert tasks["segmentation"]["head"]["num_classes"] == NYUv2.num_classes["segmentation"]
    seg = targets["segmentation"]
    logits = 50.0 * torch.nn.functional.one_hot(seg.clamp_min(0), 13).permute(0, 3, 1, 2).float()
    assert float(losses["segmentation"](logits, seg)) < 1e-6
    depth = targets["depth"]
    assert float(losses["depth"](torch.where(depth == 0, 99.0, depth), depth)) == 0.0
    normals = targets["normals"]
    missing = normals.abs().sum(dim=1, keepdim=True) == 0
    output = torch.where(missing, torch.tensor([0.0, 0.0, -1.0]).view(1, 3, 1, 1), normals)
    assert float(losses["normals"](output, normals)) < 1e-6

    cfg = compose_config(
        "train", ["+data/source=cityscapes", "task=[cityscapes_segmentation,cityscapes_depth]"]
    )
    assert cfg.data.source.num_classes == cfg.tasks.segmentation.head.num_classes == 7
    assert cfg.tasks.depth.loss.ignore_value == 0.0
    source = OmegaConf.to_container(cfg.data.source, resolve=True)
    dataset = instantiate({**source, "root": str(city_root)})(split="test")
    assert isinstance(dataset, Cityscapes) and len(dataset) == 2


# ------------------------------------------------------------------------------ verify (pre-flight)
def test_verify_reads_headers_and_ids_and_names_the_broken_file(nyu: tuple[Path, Arrays]) -> None:
    root, _ = nyu
    dataset = NYUv2(root)
    for index in range(len(dataset)):
        dataset.verify(index)
    assert dataset._accesses == 0  # verifying does not shift the training's augmentation draws
    assert dataset.label_values("segmentation") is None  # dense labels: no table to read

    mask = root / "train" / "label" / "1.npy"
    np.save(mask, np.zeros((H, W - 1), np.float32))
    with pytest.raises(DataError) as err:
        dataset.verify(1)
    assert f"{mask} has shape 12×15; expected 12×16 (the image's H×W)" in _message(err)

    depth = root / "train" / "depth" / "2.npy"
    depth.write_bytes(depth.read_bytes()[:-40])  # truncated: the header promises more data
    with pytest.raises(DataError, match=rf"cannot read {depth}"):
        dataset.verify(2)

    label = np.zeros((H, W), np.float32)
    label[2, 2] = np.nan
    np.save(root / "train" / "label" / "0.npy", label)
    with pytest.raises(DataError, match=r"0\.npy holds NaN or inf class ids; expected -1"):
        dataset.verify(0)
