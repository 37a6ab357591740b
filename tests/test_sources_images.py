"""The image sources read their native formats: tiny files written here, read back and broken."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from lightning_mtl.data.inputs import FALLBACK_NORMALIZATION
from lightning_mtl.data.sources.celeba import CelebA
from lightning_mtl.data.sources.csv_folder import CsvImageFolder
from lightning_mtl.data.sources.images import load_image
from lightning_mtl.data.sources.office import OfficeDomain
from lightning_mtl.errors import ConfigError, DataError

ATTRIBUTES = [f"Attr_{i:02d}" for i in range(40)]


def write_image(path: Path, color: tuple[int, int, int] = (255, 0, 0), size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def denormalized(image: torch.Tensor) -> torch.Tensor:
    """Back to [0, 1] pixels: a source used alone normalises with the fallback statistics."""
    mean = torch.tensor(FALLBACK_NORMALIZATION.mean).view(3, 1, 1)
    return image * torch.tensor(FALLBACK_NORMALIZATION.std).view(3, 1, 1) + mean


# --------------------------------------------------------------------------------- images.py


def test_load_image_converts_resizes_normalises_and_names_corrupt_files(tmp_path: Path) -> None:
    write_image(tmp_path / "red.png", (255, 0, 0))
    Image.new("L", (8, 6), 128).save(tmp_path / "grey.jpg")
    red = load_image(tmp_path / "red.png", (4, 5), "Test")
    assert red.shape == (3, 4, 5) and red.dtype == torch.float32
    assert torch.allclose(denormalized(red)[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)
    halves = Image.new("RGB", (8, 6), (255, 0, 0))
    halves.paste((0, 0, 255), (4, 0, 8, 6))  # right half blue: orientation and channel order
    halves.save(tmp_path / "halves.png")
    pixels = denormalized(load_image(tmp_path / "halves.png", None, "Test"))
    assert pixels.shape == (3, 6, 8)
    assert torch.allclose(pixels[:, 5, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(pixels[:, 0, 7], torch.tensor([0.0, 0.0, 1.0]), atol=1e-5)
    grey = load_image(tmp_path / "grey.jpg", None, "Test")  # one channel -> three, size kept
    assert grey.shape == (3, 6, 8)
    assert torch.allclose(denormalized(grey), torch.full_like(grey, 128 / 255), atol=0.02)

    (tmp_path / "html.jpg").write_text("<html>not found</html>")
    data = (tmp_path / "red.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("html.jpg", "cut.png", "absent.png"):
        with pytest.raises(DataError, match=rf"Test: cannot read image .*{name}.*corrupt"):
            load_image(tmp_path / name, (4, 4), "Test")


# --------------------------------------------------------------------------------- CelebA


def attribute_row(index: int) -> list[int]:
    """A distinct ±1 pattern per image: attribute a is 1 when bit (a % 5) of index+1 is set."""
    return [1 if (index + 1) >> (a % 5) & 1 else -1 for a in range(40)]


def write_celeba(root: Path, partition: tuple[int, ...] = (0, 0, 0, 1, 1, 2)) -> list[str]:
    files = [f"{i + 1:06d}.jpg" for i in range(len(partition))]
    for i, name in enumerate(files):
        write_image(root / "img_align_celeba" / name, (20 * i, 100, 200))
    rows = [
        f"{name} " + "  ".join(f"{v:2d}" for v in attribute_row(i)) for i, name in enumerate(files)
    ]
    text = "\n".join([str(len(files)), " ".join(ATTRIBUTES) + " ", *rows]) + "\n"
    (root / "list_attr_celeba.txt").write_text(text)
    parts = "\n".join(f"{name} {p}" for name, p in zip(files, partition, strict=True))
    (root / "list_eval_partition.txt").write_text(parts + "\n")
    return files


def test_celeba_reads_the_official_partition_and_attribute_rows(tmp_path: Path) -> None:
    files = write_celeba(tmp_path)
    sizes = {s: len(CelebA(tmp_path, split=s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 3, "val": 2, "test": 1}
    val = CelebA(tmp_path, split="val", image_size=(6, 4))
    assert val.files == files[3:5]
    sample = val[1]
    assert sample["image"].shape == (3, 6, 4) and sample["image"].dtype == torch.float32
    labels = sample["targets"]["attributes"]
    assert labels.dtype == torch.float32 and labels.shape == (40,)
    expected = torch.tensor([(v + 1) / 2 for v in attribute_row(4)])  # file 000005.jpg
    assert torch.equal(labels, expected)
    assert sample["mask"]["attributes"].item() is True
    assert CelebA.num_labels == {"attributes": 40} and val.target_names == ("attributes",)

    subset = CelebA(tmp_path, split="val", attributes=["Attr_03", "Attr_00"], target="faces")
    assert subset.num_labels == {"faces": 2} and subset.attribute_names == ("Attr_03", "Attr_00")
    assert torch.equal(subset[1]["targets"]["faces"], expected[[3, 0]])
    with pytest.raises(DataError, match=r"unknown attributes \['Smiling'\].*Valid attributes: "):
        CelebA(tmp_path, attributes=["Smiling"])
    with pytest.raises(DataError, match="split='dev' is not one of train, val, test"):
        CelebA(tmp_path, split="dev")


def rewrite_line(path: Path, number: int, edit: Callable[[str], str]) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / "list_attr_celeba.txt").unlink(), r"list_attr_celeba.txt not found"),
        (
            lambda r: rewrite_line(r / "list_attr_celeba.txt", 1, lambda _: "7"),
            r"list_attr_celeba.txt, line 1: declares 7 images but 6 rows follow",
        ),
        (
            lambda r: rewrite_line(r / "list_attr_celeba.txt", 2, lambda s: s.split(" ", 1)[1]),
            r"list_attr_celeba.txt, line 2: found 39 attribute names, expected 40",
        ),
        (
            lambda r: rewrite_line(r / "list_attr_celeba.txt", 5, lambda s: s + " 1"),
            r"list_attr_celeba.txt, line 5: found 42 columns, expected 41",
        ),
        (
            lambda r: rewrite_line(
                r / "list_attr_celeba.txt", 4, lambda s: s.replace("-1", "0", 1)
            ),
            r"list_attr_celeba.txt, line 4: attribute Attr_\d\d is '0', expected 1 or -1",
        ),
        (
            lambda r: rewrite_line(r / "list_eval_partition.txt", 3, lambda s: s[:-1] + "5"),
            r"list_eval_partition.txt, line 3: expected '<file> 0\|1\|2'",
        ),
        (
            lambda r: rewrite_line(r / "list_eval_partition.txt", 6, lambda _: "999999.jpg 2"),
            r"list_eval_partition.txt: 1 images are absent from list_attr_celeba.txt: 999999.jpg",
        ),
        (
            lambda r: rewrite_line(r / "list_eval_partition.txt", 6, lambda _: ""),
            r"list_attr_celeba.txt: 1 images are absent from list_eval_partition.txt: 000006.jpg",
        ),
        (
            lambda r: (r / "img_align_celeba" / "000002.jpg").unlink(),
            r"1 images listed in list_attr_celeba.txt are missing from .*img_align_celeba: "
            r"000002.jpg",
        ),
    ],
)
def test_celeba_stops_on_malformed_files(
    tmp_path: Path, damage: Callable[[Path], None], message: str
) -> None:
    write_celeba(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        CelebA(tmp_path, split="train")
    assert "CelebA" in str(info.value)


def test_celeba_missing_folder_and_corrupt_image(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        CelebA(tmp_path / "nowhere")
    text = str(info.value)
    assert "img_align_celeba not found" in text and "Expected layout" in text
    assert "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html" in text

    write_celeba(tmp_path)
    (tmp_path / "img_align_celeba" / "000002.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    dataset = CelebA(tmp_path, split="train")  # existence is checked when built, content later
    dataset[0]
    with pytest.raises(DataError, match=r"cannot read image .*000002\.jpg"):
        dataset[1]


# --------------------------------------------------------------------------------- Office

OFFICE31_CLASSES = ["back_pack", "bike", "calculator"]


def write_office31(root: Path, per_class: int = 10) -> None:
    for d, domain in enumerate(("amazon", "dslr", "webcam")):
        for c, name in enumerate(OFFICE31_CLASSES):
            for i in range(per_class if domain != "dslr" else 3):
                write_image(root / domain / "images" / name / f"frame_{i:04d}.jpg", (c * 80, d, i))


def test_office31_domain_labels_keys_and_seeded_disjoint_splits(tmp_path: Path) -> None:
    write_office31(tmp_path)
    splits = {
        s: OfficeDomain(tmp_path, "amazon", split=s, image_size=4) for s in ("train", "val", "test")
    }
    assert {s: len(d) for s, d in splits.items()} == {"train": 18, "val": 6, "test": 6}
    paths = {s: {p for p, _ in d.samples} for s, d in splits.items()}
    assert not paths["train"] & paths["val"] and not paths["train"] & paths["test"]
    assert not paths["val"] & paths["test"]
    assert len(paths["train"] | paths["val"] | paths["test"]) == 30  # covering
    train = splits["train"]
    assert train.variant == "office31" and train.classes == tuple(OFFICE31_CLASSES)
    assert train.num_classes == {"amazon": 3} and train.target_names == ("amazon",)
    for path, label in train.samples:  # the label is the index of the class folder
        assert path.parent.name == OFFICE31_CLASSES[label]
    counts = np.bincount([label for _, label in train.samples])
    assert counts.tolist() == [6, 6, 6]  # stratified per class
    sample = train[0]
    assert sample["image"].shape == (3, 4, 4) and sample["image"].dtype == torch.float32
    target = sample["targets"]["amazon"]
    assert target.dtype == torch.int64 and target.shape == ()
    assert target.item() == train.samples[0][1] and sample["mask"]["amazon"].item() is True

    again = OfficeDomain(tmp_path, "amazon", split="train", image_size=4)
    assert again.samples == train.samples  # deterministic
    other = OfficeDomain(tmp_path, "amazon", split="train", image_size=4, seed=1)
    assert {p for p, _ in other.samples} != paths["train"]
    dslr = OfficeDomain(
        tmp_path, "dslr", split="test", target="objects", split_fractions=(0.4, 0.3, 0.3)
    )
    assert dslr.num_classes == {"objects": 3} and len(dslr) == 3  # 3 images per class: 1/1/1
    assert "objects" in dslr[0]["targets"]


def test_office_home_layout_and_class_set_checks(tmp_path: Path) -> None:
    classes = ["Alarm_Clock", "Backpack"]
    for domain in ("Art", "Clipart"):
        for name in classes:
            for i in range(5):
                write_image(tmp_path / domain / name / f"{i:05d}.jpg")
    (tmp_path / "ImageInfo.csv").write_text("not a domain\n")
    art = OfficeDomain(tmp_path, "Art", split="val", split_fractions=(0.6, 0.2, 0.2))
    assert art.variant == "office_home" and art.classes == tuple(classes)
    assert len(art) == 2 and art.num_classes == {"Art": 2}

    with pytest.raises(DataError) as info:
        OfficeDomain(tmp_path, "Product")
    text = str(info.value)
    assert re.search(r"domain folder .*Product not found\. Domains found in .*: Art, Clipart", text)
    assert "hemanthdv.org/officeHomeDataset.html" in text and "gatech.edu/~judy" in text

    write_image(tmp_path / "Clipart" / "Bucket" / "00000.jpg")
    (tmp_path / "Art" / "Backpack").rename(tmp_path / "Art" / "Bag")
    with pytest.raises(
        DataError,
        match=r"domain Clipart .* different class set from Art: "
        r"Clipart lacks \['Bag'\] and adds \['Backpack', 'Bucket'\]",
    ):
        OfficeDomain(tmp_path, "Art")


def test_office_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"(?s)Office: .*nowhere not found.*Expected layout"):
        OfficeDomain(tmp_path / "nowhere", "amazon")
    (tmp_path / "amazon" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no class folders in .*amazon/images"):
        OfficeDomain(tmp_path, "amazon")
    (tmp_path / "amazon" / "images" / "bike").mkdir()
    with pytest.raises(DataError, match=r"class folder .*amazon/images/bike holds no images"):
        OfficeDomain(tmp_path, "amazon")
    with pytest.raises(ConfigError, match=r"split_fractions=.*summing to 1"):
        OfficeDomain(tmp_path, "amazon", split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ConfigError, match="variant='office32'"):
        OfficeDomain(tmp_path, "amazon", variant="office32")
    (tmp_path / "amazon" / "images" / "bike" / "frame_0001.jpg").write_bytes(b"garbage")
    dataset = OfficeDomain(tmp_path, "amazon", split_fractions=(1.0, 0.0, 0.0))
    with pytest.raises(DataError, match=r"Office amazon: cannot read image .*frame_0001\.jpg"):
        dataset[0]


# --------------------------------------------------------------------------------- CSV folder

COLUMNS = {
    "age": {"kind": "regression"},
    "gender": {"kind": "class", "num_classes": 2},
    "tags": {"kind": "multilabel", "num_labels": 5},
}
HEADER = "image,age,gender,tags,split"
ROWS = [
    "faces/a.jpg,34.5,1,0 3,train",
    "faces/b.jpg,,0,,val",
    "faces/c.png,51,,2|4,train",
    "faces/d.jpg,20,1,none,test",
]


def write_csv(root: Path, rows: list[str] = ROWS, header: str = HEADER) -> Path:
    for name in ("a.jpg", "b.jpg", "c.png", "d.jpg"):
        write_image(root / "faces" / name)
    path = root / "labels.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_folder_values_masks_and_split_column(tmp_path: Path) -> None:
    write_csv(tmp_path)
    train = CsvImageFolder(tmp_path, split="train", columns=COLUMNS, image_size=5)
    assert [p.name for p in train.images] == ["a.jpg", "c.png"]
    assert train.num_classes == {"gender": 2} and train.num_labels == {"tags": 5}
    assert train.target_names == ("age", "gender", "tags")
    first, second = train[0], train[1]
    assert first["image"].shape == (3, 5, 5)
    assert first["targets"]["age"].dtype == torch.float32
    assert torch.equal(first["targets"]["age"], torch.tensor([34.5]))
    assert (
        first["targets"]["gender"].dtype == torch.int64 and first["targets"]["gender"].item() == 1
    )
    assert torch.equal(first["targets"]["tags"], torch.tensor([1.0, 0, 0, 1, 0]))
    assert all(m.item() for m in first["mask"].values())
    assert second["mask"]["gender"].item() is False  # empty cell: not labelled
    assert second["targets"]["gender"].shape == () and second["targets"]["gender"].item() == -100
    assert torch.equal(second["targets"]["tags"], torch.tensor([0.0, 0, 1, 0, 1]))

    val = CsvImageFolder(tmp_path, split="val", columns=COLUMNS)[0]
    assert {k: m.item() for k, m in val["mask"].items()} == {
        "age": False,
        "gender": True,
        "tags": False,
    }
    assert val["targets"]["age"].shape == (1,) and val["targets"]["tags"].shape == (5,)
    test = CsvImageFolder(tmp_path, split="test", columns=COLUMNS)[0]
    assert test["mask"]["tags"].item() is True and test["targets"]["tags"].sum().item() == 0


def test_csv_folder_seeded_split_without_split_column(tmp_path: Path) -> None:
    rows = [f"img/{i:02d}.png,{i % 3}" for i in range(20)]
    for i in range(20):
        write_image(tmp_path / "img" / f"{i:02d}.png")
    (tmp_path / "data.csv").write_text("\n".join(["file,kind", *rows]) + "\n")
    columns = {"shape": {"kind": "class", "num_classes": 3, "column": "kind"}}

    def names(split: str, seed: int = 0) -> list[str]:
        dataset = CsvImageFolder(
            tmp_path, split, csv="data.csv", image_column="file", columns=columns, seed=seed
        )
        for i in range(len(dataset)):  # the label follows its row
            assert dataset[i]["targets"]["shape"].item() == int(dataset.images[i].stem) % 3
        return [p.name for p in dataset.images]

    parts = {s: names(s) for s in ("train", "val", "test")}
    assert [len(p) for p in parts.values()] == [16, 2, 2]
    assert sorted(name for part in parts.values() for name in part) == [
        f"{i:02d}.png" for i in range(20)
    ]
    assert names("train") == parts["train"] and names("train", seed=3) != parts["train"]


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        (
            ROWS,
            "image,age,sex,tags,split",
            r"line 1: missing column\(s\) \['gender'\]; the header "
            r"found is \['image', 'age', 'sex', 'tags', 'split'\]",
        ),
        ([*ROWS[:2], "faces/c.png,51,1", *ROWS[3:]], HEADER, r"line 4: found 3 fields, expected 5"),
        (
            [ROWS[0], "faces/b.jpg,,2,,val"],
            HEADER,
            r"line 3: column gender: class id 2 out of range 0..1",
        ),
        (["faces/a.jpg,old,1,,train"], HEADER, r"line 2: column age: 'old' is not a number"),
        (
            [*ROWS[:3], "faces/z.jpg,20,1,,test"],
            HEADER,
            r"line 5: image faces/z.jpg does not exist",
        ),
        (["faces/a.jpg,1,1,7,train"], HEADER, r"line 2: column tags: label index 7 out of range"),
        (["faces/a.jpg,1,1,,dev"], HEADER, r"line 2: split='dev' is not one of train, val, test"),
        (["faces/a.jpg,1,x,,train"], HEADER, r"line 2: column gender: 'x' is not an integer"),
    ],
)
def test_csv_folder_stops_on_malformed_rows(
    tmp_path: Path, rows: list[str], header: str, message: str
) -> None:
    write_csv(tmp_path, rows, header)
    with pytest.raises(DataError, match=message) as info:
        CsvImageFolder(tmp_path, split="test", columns=COLUMNS)
    assert str(tmp_path / "labels.csv") in str(info.value)


def test_csv_folder_config_errors_and_corrupt_image(tmp_path: Path) -> None:
    write_csv(tmp_path)
    with pytest.raises(ConfigError, match=r"columns.age.kind='ordinal' is not one of class"):
        CsvImageFolder(tmp_path, columns={"age": {"kind": "ordinal"}})
    with pytest.raises(ConfigError, match=r"columns.gender.num_classes must be a positive"):
        CsvImageFolder(tmp_path, columns={"gender": {"kind": "class"}})
    with pytest.raises(ConfigError, match=r"columns.gender has unknown options \['classes'\]"):
        CsvImageFolder(
            tmp_path, columns={"gender": {"kind": "class", "num_classes": 2, "classes": 2}}
        )
    with pytest.raises(ConfigError, match="columns is required"):
        CsvImageFolder(tmp_path)
    with pytest.raises(DataError, match=r"other.csv not found"):
        CsvImageFolder(tmp_path, csv="other.csv", columns=COLUMNS)
    (tmp_path / "faces" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dataset = CsvImageFolder(tmp_path, split="train", columns=COLUMNS)
    with pytest.raises(DataError, match=r"CsvImageFolder: cannot read image .*faces/c\.png"):
        dataset[1]


# --------------------------------------------------------------------------------- loaders


def test_every_source_batches_with_default_collate(tmp_path: Path) -> None:
    write_celeba(tmp_path / "celeba")
    write_office31(tmp_path / "office31")
    write_csv(tmp_path / "own")
    datasets = {
        "attributes": CelebA(tmp_path / "celeba", "train", image_size=8),
        "amazon": OfficeDomain(tmp_path / "office31", "amazon", "train", image_size=8),
        "gender": CsvImageFolder(tmp_path / "own", "train", columns=COLUMNS, image_size=8),
    }
    shapes = {"attributes": (2, 40), "amazon": (2,), "gender": (2,)}
    for key, dataset in datasets.items():
        batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=default_collate)))
        assert batch["image"].shape == (2, 3, 8, 8) and batch["image"].dtype == torch.float32
        assert batch["targets"][key].shape == shapes[key]
        assert batch["mask"][key].shape == (2,) and batch["mask"][key].dtype == torch.bool
    assert batch["mask"]["age"].tolist() == [True, True]
    assert batch["targets"]["tags"].shape == (2, 5) and batch["targets"]["age"].shape == (2, 1)


# ------------------------------------------------------------------ pre-flight: verify, label_values


def test_verify_finds_a_truncated_jpeg_and_label_values_read_the_tables(tmp_path: Path) -> None:
    write_celeba(tmp_path / "celeba")
    path = tmp_path / "celeba" / "img_align_celeba" / "000002.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)  # a JPEG with a real entropy-coded stream
    celeba = CelebA(tmp_path / "celeba", split="train")
    for index in range(len(celeba)):
        celeba.verify(index)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(DataError, match=rf"CelebA: cannot read image {re.escape(str(path))}"):
        celeba.verify(1)
    values = celeba.label_values("attributes")
    assert values is not None and values.shape == (3, 40)
    assert torch.equal(values[2], torch.tensor([(v + 1) / 2 for v in attribute_row(2)]))
    assert celeba.label_values("Smiling") is None

    write_csv(tmp_path / "csv")
    table = CsvImageFolder(tmp_path / "csv", split="train", columns=COLUMNS)
    table.verify(1)  # a PNG: chunk checksums, no decode
    assert torch.equal(table.label_values("gender"), torch.tensor([1]))  # c.png: unlabelled
    expected_tags = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 1]])
    assert torch.equal(table.label_values("tags"), expected_tags)
    assert table.label_values("age") is None  # regression: no classes to check

    write_office31(tmp_path / "office", per_class=3)
    office = OfficeDomain(tmp_path / "office", "webcam", split="train")
    office.verify(0)
    labels = office.label_values("webcam")
    assert labels is not None and labels.dtype == torch.int64
    assert labels.tolist() == [label for _, label in office.samples]
    assert sorted(set(labels.tolist())) == [0, 1, 2]
