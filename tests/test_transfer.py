"""Transfer learning inputs: the backbone's statistics and input size reach the data transforms,
and pretrained weights load offline from a file or from a local Hugging Face cache.

The ViT used here (``vit_tiny_patch16_224``) normalises with mean = std = 0.5, not ImageNet's,
so an image that comes out as ``(pixels - 0.5) / 0.5`` proves the backbone's numbers were used.
"""

from __future__ import annotations

import functools
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from lightning_mtl.data import MergedDataModule, ShapesDataModule, ShapesSource
from lightning_mtl.data.inputs import (
    FALLBACK_NORMALIZATION,
    InputConfig,
    backbone_input_config,
    share_backbone_inputs,
)
from lightning_mtl.data.shapes import IMAGE_MEAN, IMAGE_STD
from lightning_mtl.data.sources.csv_folder import CsvImageFolder
from lightning_mtl.errors import ConfigError
from lightning_mtl.models.backbone import Backbone
from lightning_mtl.train import train
from tests.conftest import compose_config
from tests.test_merged_data import fast

VIT = "vit_tiny_patch16_224"
HALF = (0.5, 0.5, 0.5)
EXPLICIT = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 2.0]}


def as_model(backbone: Backbone) -> SimpleNamespace:
    """Where the LightningModule keeps its backbone: ``module.net.architecture.backbone``."""
    return SimpleNamespace(net=SimpleNamespace(architecture=SimpleNamespace(backbone=backbone)))


@pytest.fixture(scope="module")
def vit() -> InputConfig:
    config = backbone_input_config(as_model(Backbone(VIT)))
    assert config is not None
    return config


def write_csv_folder(root: Path, height: int = 6, width: int = 5) -> np.ndarray:
    """Three labelled PNG images (one per split) of random pixels; returns the val image."""
    rng = np.random.default_rng(0)
    rows = ["image,label,split"]
    arrays = {}
    for i, split in enumerate(("train", "val", "test")):
        arrays[split] = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(arrays[split]).save(root / f"{i}.png")
        rows.append(f"{i}.png,{i % 2},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return arrays["val"]


def pixels(array: np.ndarray) -> torch.Tensor:
    """An H×W×3 uint8 image as the 3×H×W floats in [0, 1] a source normalises."""
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def normalised(image: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    shape = (-1, 1, 1)
    return (image - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def csv_source(root: Path, **options: Any) -> functools.partial:
    columns = {"label": {"kind": "class", "num_classes": 2}}
    return functools.partial(CsvImageFolder, root=root, columns=columns, **options)


def val_image(datamodule: Any) -> torch.Tensor:
    batches = datamodule.example_batch(1)
    batch = batches[0] if isinstance(batches, list) else batches
    return batch["image"][0]


# ------------------------------------------------------------------------ the backbone's config
def test_the_input_config_is_timms_data_config_of_the_backbone() -> None:
    resnet = backbone_input_config(as_model(Backbone("resnet18")))
    assert resnet == InputConfig(
        FALLBACK_NORMALIZATION.mean, FALLBACK_NORMALIZATION.std, (224, 224)
    )
    small_vit = Backbone(VIT, model_kwargs={"img_size": 64})
    # timm's data config still says 224; the patch embedding accepts 64 px only
    assert tuple(small_vit.data_config()["input_size"]) == (3, 224, 224)
    config = backbone_input_config(as_model(small_vit))
    assert config == InputConfig(HALF, HALF, (64, 64))
    assert backbone_input_config(SimpleNamespace()) is None  # no backbone: nothing to share
    assert share_backbone_inputs(object(), as_model(small_vit)) is None  # no use_backbone_inputs


def test_the_training_module_exposes_its_backbone_to_the_data(tmp_path: Path) -> None:
    """train.py hands a ViT's statistics and built size to merged Shapes data set to follow it."""
    overrides = fast(
        "data.normalization=backbone",
        f"model.backbone.name={VIT}",
        "+model.backbone.model_kwargs.img_size=32",
        "train=false",
        "test=false",
    )
    _, objects = train(compose_config("train", overrides, tmp_path))
    datamodule = objects["datamodule"]
    assert datamodule.inputs == InputConfig(HALF, HALF, (32, 32))
    source = datamodule.splits["val"].datasets[0]
    scene, _ = source.render(np.random.default_rng((source.seed, 0)))
    expected = (torch.from_numpy(scene) - 0.5) / 0.5
    torch.testing.assert_close(val_image(datamodule), expected, rtol=0, atol=1e-6)


# -------------------------------------------------------------------------- natural images
def test_sources_normalise_with_the_backbone_statistics(tmp_path: Path, vit: InputConfig) -> None:
    val = write_csv_folder(tmp_path)
    datamodule = MergedDataModule({"mine": csv_source(tmp_path, image_size=None)}, batch_size=2)
    share_backbone_inputs(datamodule, as_model(Backbone(VIT)))
    assert datamodule.inputs == vit
    torch.testing.assert_close(
        val_image(datamodule), normalised(pixels(val), HALF, HALF), rtol=0, atol=1e-6
    )
    # Used alone (no backbone known), a natural-image source falls back to ImageNet's numbers
    alone = CsvImageFolder(tmp_path, "val", columns={"label": "regression"}, image_size=None)
    expected = normalised(pixels(val), FALLBACK_NORMALIZATION.mean, FALLBACK_NORMALIZATION.std)
    torch.testing.assert_close(alone[0]["image"], expected, rtol=0, atol=1e-6)


def test_image_size_backbone_takes_the_backbone_input_size(
    tmp_path: Path, vit: InputConfig
) -> None:
    write_csv_folder(tmp_path)
    datamodule = MergedDataModule({"mine": csv_source(tmp_path, image_size="backbone")})
    datamodule.use_backbone_inputs(InputConfig(HALF, HALF, (40, 24)))
    assert val_image(datamodule).shape == (3, 40, 24)
    datamodule.use_backbone_inputs(vit)  # a new config drops the splits built with the old one
    assert val_image(datamodule).shape == (3, 224, 224)
    with pytest.raises(ConfigError, match="image_size=backbone needs the backbone's input size"):
        CsvImageFolder(tmp_path, "val", columns={"label": "regression"}, image_size="backbone")


def test_explicit_statistics_override_the_backbone(tmp_path: Path, vit: InputConfig) -> None:
    val = write_csv_folder(tmp_path)
    expected = normalised(pixels(val), EXPLICIT["mean"], EXPLICIT["std"])
    per_source = {"mine": csv_source(tmp_path, image_size=None, normalization=EXPLICIT)}
    for datamodule in (
        MergedDataModule(per_source),  # the source's own setting
        MergedDataModule({"mine": csv_source(tmp_path, image_size=None)}, normalization=EXPLICIT),
    ):
        datamodule.use_backbone_inputs(vit)
        torch.testing.assert_close(val_image(datamodule), expected, rtol=0, atol=1e-6)
    # data.normalization applies to every source, over the source's own setting
    datamodule = MergedDataModule(per_source, normalization="backbone")
    datamodule.use_backbone_inputs(vit)
    torch.testing.assert_close(
        val_image(datamodule), normalised(pixels(val), HALF, HALF), rtol=0, atol=1e-6
    )


def test_source_configs_compose_with_the_switches(tmp_path: Path, vit: InputConfig) -> None:
    val = write_csv_folder(tmp_path)
    cfg = compose_config(
        "train",
        [
            "data=merged",
            "+data/source@data.sources.mine=csv_folder",
            f"data.sources.mine.root={tmp_path}",
            "data.sources.mine.image_size=null",
            "data.normalization={mean: [0.1, 0.2, 0.3], std: [0.5, 0.25, 2.0]}",
        ],
    )
    assert cfg.data.sources.mine.normalization == "backbone"  # the natural-image default
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.use_backbone_inputs(vit)
    expected = normalised(pixels(val), EXPLICIT["mean"], EXPLICIT["std"])
    torch.testing.assert_close(val_image(datamodule), expected, rtol=0, atol=1e-6)
    for source in ("celeba", "office31", "office_home", "nyuv2", "cityscapes", "csv_folder"):
        cfg = compose_config("train", [f"+data/source={source}"])
        assert cfg.data.source.normalization == "backbone", source
    assert compose_config("train", ["data=celeba"]).data.normalization is None


# -------------------------------------------------------------------------------- Shapes
def test_shapes_keep_their_own_statistics_by_default_and_can_follow_the_backbone(
    vit: InputConfig,
) -> None:
    def module(**options: Any) -> ShapesDataModule:
        dm = ShapesDataModule(train_size=4, val_size=2, test_size=2, num_workers=0, **options)
        dm.use_backbone_inputs(vit)
        return dm

    default = module()
    default.setup("validate")
    dataset = default.splits["val"].datasets[0]  # the one source, "shapes"
    scene, _ = dataset.render(np.random.default_rng((dataset.seed, 0)))
    # the default run's images, bit for bit: the generated data's statistics, backbone or not
    assert torch.equal(dataset[0]["image"], torch.from_numpy((scene - IMAGE_MEAN) / IMAGE_STD))
    assert compose_config("train", []).data.normalization == "dataset"
    follows = module(normalization="backbone")
    follows.setup("validate")
    image = follows.splits["val"].datasets[0][0]["image"]
    assert torch.equal(image, (torch.from_numpy(scene) - 0.5) / 0.5)
    explicit = module(normalization=EXPLICIT)
    explicit.setup("validate")
    expected = normalised(torch.from_numpy(scene), EXPLICIT["mean"], EXPLICIT["std"])
    image = explicit.splits["val"].datasets[0][0]["image"]
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)
    assert follows.hparams.normalization == "backbone"
    saved = ShapesDataModule(normalization=OmegaConf.create(EXPLICIT)).hparams.normalization
    assert saved == EXPLICIT and type(saved) is dict  # plain values in checkpoints

    # merged Shapes sources: their own statistics unless told otherwise
    sizes = {"train": 2, "val": 2, "test": 2}
    factory = functools.partial(ShapesSource, sizes=sizes, image_size=16)
    for normalization, mean, std in ((None, IMAGE_MEAN, IMAGE_STD), ("backbone", 0.5, 0.5)):
        merged = MergedDataModule({"scenes": factory}, normalization=normalization)
        merged.use_backbone_inputs(vit)
        built = merged._split("val").datasets[0]
        scene, _ = built.render(np.random.default_rng((built.seed, 0)))
        assert torch.equal(val_image(merged), torch.from_numpy((scene - mean) / std))


# ---------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    ("normalization", "message"),
    [
        ({"mean": [0.5, 0.5], "std": [0.5, 0.5, 0.5]}, r"data\.normalization\.mean=\[0\.5, 0\.5\]"),
        ({"mean": 0.5, "std": [0.2, 0.0, 0.2]}, r"data\.normalization\.std=.*each > 0"),
        ({"mean": "zero", "std": 1}, r"data\.normalization\.mean='zero'"),
        ({"mean": [0.5] * 3}, r"data\.normalization has keys \['mean'\]"),
        ("imagenet", r"data\.normalization='imagenet' is not a normalization: expected backbone"),
        (7, r"data\.normalization=7: expected backbone or dataset"),
    ],
)
def test_bad_normalization_settings_are_refused_naming_the_key(
    normalization: Any, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        MergedDataModule({"mine": csv_source(tmp_path)}, normalization=normalization)
    with pytest.raises(ConfigError, match=message):
        ShapesDataModule(normalization=normalization)


def test_sources_refuse_what_they_cannot_honour(tmp_path: Path, vit: InputConfig) -> None:
    write_csv_folder(tmp_path)
    with pytest.raises(ConfigError, match=r"CsvImageFolder: normalization\.mean=\[1, 2\]"):
        CsvImageFolder(
            tmp_path, columns={"label": "regression"}, normalization={"mean": [1, 2], "std": 1}
        )
    with pytest.raises(ConfigError, match="CsvImageFolder has no statistics of its own"):
        CsvImageFolder(tmp_path, columns={"label": "regression"}, normalization="dataset")

    def plain_factory(split: str) -> CsvImageFolder:
        return CsvImageFolder(tmp_path, split, columns={"label": "regression"})

    datamodule = MergedDataModule({"plain": plain_factory}, normalization="backbone")
    datamodule.use_backbone_inputs(vit)
    with pytest.raises(ConfigError, match=r"data.sources.plain takes no normalization argument"):
        datamodule.example_batch()
    # without data.normalization such a factory is simply not given the backbone's config
    assert val_image(MergedDataModule({"plain": plain_factory})).shape == (3, 64, 64)


# ---------------------------------------------------------------------- pretrained, offline
@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any attempt to reach the network is recorded and fails at once; the hub library is set
    as in a process started *without* HF_HUB_OFFLINE, so only the backbone's switch keeps it
    off the network."""
    from huggingface_hub import constants

    attempts: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return attempts


def write_hub_cache(cache: Path, state: dict[str, torch.Tensor]) -> Path:
    """``state`` as the Hugging Face cache holds timm's default resnet18 weights."""
    pretrained = timm.models.get_pretrained_cfg("resnet18")
    assert pretrained.hf_hub_id == "timm/resnet18.a1_in1k" and pretrained.hf_hub_filename is None
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + pretrained.hf_hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    # timm asks for pytorch_model.bin and tries its safetensors twin, model.safetensors, first
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_pretrained_weights_load_from_a_local_hugging_face_cache(
    tmp_path: Path, no_network: list[str]
) -> None:
    from huggingface_hub import constants

    reference = timm.create_model("resnet18", pretrained=False)
    torch.nn.init.constant_(reference.conv1.weight, 0.125)
    write_hub_cache(tmp_path / "hub", reference.state_dict())
    start = time.perf_counter()
    loaded = Backbone("resnet18", pretrained=True, cache_dir=str(tmp_path / "hub"))
    assert time.perf_counter() - start < 20
    saved = reference.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert no_network == [] and constants.HF_HUB_OFFLINE is False  # the switch was restored


def test_an_empty_cache_is_a_quick_clear_config_error(
    tmp_path: Path, no_network: list[str]
) -> None:
    (tmp_path / "empty").mkdir()
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        Backbone("resnet18", pretrained=True, cache_dir=str(tmp_path / "empty"))
    assert time.perf_counter() - start < 20 and no_network == []
    message = str(error.value)
    for part in (
        "no weights for 'resnet18'",
        "timm/resnet18.a1_in1k",
        str(tmp_path / "empty"),
        "models--timm--resnet18.a1_in1k/snapshots/<commit>/model.safetensors",
        "hf download timm/resnet18.a1_in1k model.safetensors --cache-dir",
        "model.backbone.weights_file=",
    ):
        assert part in message, part
