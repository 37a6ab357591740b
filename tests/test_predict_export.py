"""Using a trained model: ``mtl-predict`` on a folder of images and on a data split, and
``mtl-export`` to ONNX and TorchScript checked against the checkpoint's PyTorch model.

One tiny run is trained once for the module; every test reads its checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from lightning_mtl.data.shapes import (
    SHAPES_NORMALIZATION,
    SceneConfig,
    ShapesDataModule,
    ShapesDataset,
)
from lightning_mtl.data.sources.images import load_image
from lightning_mtl.errors import ConfigError, DataError
from lightning_mtl.eval import checkpoint_model, load_weights
from lightning_mtl.models.backbone import FeatureInfo
from lightning_mtl.predict import predict
from lightning_mtl.prediction import (
    NormalsWriter,
    Sample,
    SegmentationWriter,
    WriterOptions,
    adopt_trained_preparation,
    palette,
    predicted,
    resolve_inputs,
    warn_if_data_differs,
)
from lightning_mtl.tasks import build_tasks
from lightning_mtl.train import train
from tests.conftest import FAST, compose_config

TASKS = ["segmentation", "depth", "count", "dominant_color", "colors"]
COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
# The FAST run, smaller still: 2 training steps, 8 test scenes of 32 px, no pre-flight scan.
RUN = [
    *FAST,
    "data.train_size=16",
    "data.val_size=8",
    "data.test_size=8",
    "test=false",
    "preflight.mode=skip",
    "callbacks.model_report=null",
    "callbacks.gradient_conflict=null",
    "callbacks.step_timer=null",
]
# What predict and export take of it (their configs have no callbacks, export no trainer).
DATA = [o for o in RUN if o.startswith(("model.", "data.", "extras."))]
PREDICT = [*DATA, "trainer.accelerator=cpu", "num_workers=0"]
# Image sizes (H, W) of the folder: the model's own 32 px and two others.
SIZES = {"a.png": (32, 32), "b.png": (40, 56), "sub/c.png": (24, 30)}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained run folder (its checkpoints in checkpoints/)."""
    out = tmp_path_factory.mktemp("run")
    train(compose_config("train", RUN, out))
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """A folder of Shapes scenes saved as PNG files (one in a sub-folder), by relative path."""
    folder = tmp_path_factory.mktemp("images")
    saved = {}
    for i, (name, (height, width)) in enumerate(SIZES.items()):
        scene = ShapesDataset(1, seed=i, scene=SceneConfig(image_size=max(height, width)))
        image, _ = scene.render(np.random.default_rng((7, i)))
        pixels = (image.transpose(1, 2, 0) * 255).round().astype(np.uint8)[:height, :width]
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / name)
        saved[name] = pixels
    (folder / "notes.txt").write_text("not an image: skipped")
    return {"folder": folder, **saved}  # type: ignore[dict-item]


def predict_cfg(run: Path, out: Path, *overrides: str) -> DictConfig:
    return compose_config("predict", [*PREDICT, f"ckpt_path={run}", *overrides], out)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


def test_predict_on_a_folder_writes_every_task(run: Path, images: dict, tmp_path: Path) -> None:
    folder = images["folder"]
    cfg = predict_cfg(
        run, tmp_path, f"input={folder}", f"+class_names.dominant_color=[{','.join(COLOURS)}]"
    )
    result = predict(cfg, return_predictions=True)
    out = tmp_path / "predictions"
    assert result.folder == out and result.samples == 3
    # the inputs the model was trained with (the Shapes scenes' statistics, 32 px), not the
    # backbone's (test_resnet: mean 0.5, 160 px)
    assert result.inputs is not None
    assert result.inputs.mean == (0.42,) * 3 and result.inputs.std == (0.2,) * 3
    assert result.inputs.size == (32, 32)
    files = sorted(SIZES)

    rows = read_csv(out / "dominant_color.csv")
    assert [r["file"] for r in rows] == files
    assert list(rows[0]) == ["file", "class", *(f"prob_{c}" for c in COLOURS)]
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in COLOURS]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert row["class"] == COLOURS[int(np.argmax(probs))]
    colors = read_csv(out / "colors.csv")
    assert [r["file"] for r in colors] == files
    for row in colors:
        for i in range(6):
            assert int(row[f"pred_{i}"]) == int(float(row[f"score_{i}"]) >= 0.5)
    count = read_csv(out / "count.csv")
    assert [r["file"] for r in count] == files and list(count[0]) == ["file", "value"]

    for name, (height, width) in SIZES.items():
        stem = name.removesuffix(".png")
        mask = Image.open(out / "segmentation" / f"{stem}.png")
        assert mask.mode == "P" and mask.size == (width, height)
        assert np.asarray(mask).max() < 4  # the 4 classes of the Shapes segmentation
        assert mask.getpalette()[:12] == palette(4)[:12]
        depth = np.load(out / "depth" / f"{stem}.npy")
        assert depth.shape == (height, width) and depth.dtype == np.float32
        assert (depth > 0).all()  # softplus head
        preview = Image.open(out / "depth" / f"{stem}.png")
        assert preview.mode == "RGB" and preview.size == (width, height)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 3 and summary["tasks"]["depth"]["kind"] == "dense_regression"
    assert summary["tasks"]["count"]["output"] == "count.csv"

    # The numbers: a.png is 32 px (no resize), so the files hold the model's outputs on the
    # image normalised with the Shapes statistics.
    model = predict_model(run)
    pixels = torch.from_numpy(images["a.png"]).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        raw = model.net(SHAPES_NORMALIZATION(pixels)[None])
    expected = {t.name: predicted(t, raw[t.name])[0] for t in model.tasks}
    probs = [float(rows[0][f"prob_{c}"]) for c in COLOURS]
    assert probs == pytest.approx(expected["dominant_color"].tolist(), abs=2e-6)
    assert float(count[0]["value"]) == pytest.approx(float(expected["count"][0]), abs=2e-6)
    depth = np.load(out / "depth" / "a.npy")
    assert np.abs(depth - expected["depth"][0].numpy()).max() < 1e-5
    mask = np.asarray(Image.open(out / "segmentation" / "a.png"))
    assert (mask == expected["segmentation"].argmax(0).numpy()).mean() > 0.999

    # trainer.predict's return value: per batch, every task's post-processed output
    (batch,) = result.predictions
    assert set(batch) == set(TASKS)
    assert batch["segmentation"].shape == (3, 4, 32, 32)
    assert torch.allclose(batch["segmentation"].sum(1), torch.ones(3, 32, 32), atol=1e-5)
    assert batch["depth"].shape == (3, 1, 32, 32) and batch["count"].shape == (3, 1)
    assert torch.allclose(batch["dominant_color"].sum(1), torch.ones(3), atol=1e-5)
    assert ((batch["colors"] >= 0) & (batch["colors"] <= 1)).all()
    assert torch.allclose(batch["dominant_color"][0], expected["dominant_color"], atol=1e-6)
    # b.png (40×56) is resized as the training sources resize their images (load_image), not
    # by timm's transform (bicubic, antialiased): the model gets the pixels training gave it
    resized = load_image(folder / "b.png", (32, 32), "test", SHAPES_NORMALIZATION)
    with torch.no_grad():
        raw = model.net(resized[None])
    task = next(t for t in model.tasks if t.name == "dominant_color")
    assert torch.allclose(
        batch["dominant_color"][1], predicted(task, raw["dominant_color"])[0], atol=1e-6
    )


def predict_model(run: Path) -> torch.nn.Module:
    """The run's model with the checkpoint's weights, in eval mode (as predict builds it)."""
    cfg = compose_config("predict", [*PREDICT, f"ckpt_path={run}"], run)
    model, ckpt = checkpoint_model(cfg, "mtl-predict")
    load_weights(model, ckpt)
    return model.eval()


def test_predict_on_the_data_split(run: Path, tmp_path: Path) -> None:
    result = predict(predict_cfg(run, tmp_path), return_predictions=True)
    out = tmp_path / "predictions"
    assert result.samples == 8 and result.inputs is None
    files = [f"shapes/test/{i:06d}" for i in range(8)]
    for task in ("count", "dominant_color", "colors"):
        assert [r["file"] for r in read_csv(out / f"{task}.csv")] == files
    masks = sorted((out / "segmentation" / "shapes" / "test").glob("*.png"))
    assert [m.stem for m in masks] == [f"{i:06d}" for i in range(8)]
    assert all(Image.open(m).size == (32, 32) for m in masks)
    assert len(list((out / "depth").rglob("*.npy"))) == 8
    outputs = result.predictions
    assert sum(len(b["count"]) for b in outputs) == 8
    assert all(b["segmentation"].shape[1:] == (4, 32, 32) for b in outputs)
    assert json.loads((out / "summary.json").read_text())["split"] == "test"
    # a data config that prepares images unlike training is named in a warning
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert warn_if_data_differs(ckpt, ShapesDataModule(image_size=32)) == []
    assert warn_if_data_differs(ckpt, ShapesDataModule(image_size=64)) == ["image_size"]
    # ... and without data overrides, the checkpoint's own image size and normalisation are used
    plain = compose_config("predict", [f"ckpt_path={ckpt}"], tmp_path / "plain")
    assert plain.data.image_size == 64
    assert adopt_trained_preparation(plain, ckpt) == ["image_size"]
    assert plain.data.image_size == 32
    assert adopt_trained_preparation(plain, ckpt) == []  # nothing left to take over


def test_bad_inputs_stop_with_a_message_naming_them(run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"input='.*missing'.*no such folder"):
        predict(predict_cfg(run, tmp_path, f"input={tmp_path / 'missing'}"))
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no image here")
    with pytest.raises(DataError, match=r"input='.*empty'.*no image file"):
        predict(predict_cfg(run, tmp_path, f"input={empty}"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*x\.png"):
        predict(predict_cfg(run, tmp_path, f"input={broken}"))
    twins = tmp_path / "twins"
    twins.mkdir()
    for suffix in ("png", "jpg"):
        Image.new("RGB", (8, 8)).save(twins / f"a.{suffix}")
    with pytest.raises(DataError, match=r"a\.jpg and .*a\.png would write the same"):
        predict(predict_cfg(run, tmp_path, f"input={twins}"))
    with pytest.raises(ConfigError, match=r"class_names.dominant_color has 2 names .* 6 classes"):
        predict(predict_cfg(run, tmp_path, "+class_names.dominant_color=[a,b]"))
    with pytest.raises(ConfigError, match=r"split='train'"):
        predict(predict_cfg(run, tmp_path, "split=train"))
    with pytest.raises(ConfigError, match=r"ckpt_path is required"):
        predict(compose_config("predict", PREDICT, tmp_path))
    # preprocess: the backbone's own inputs, explicit ones, and values that are neither
    model = predict_model(run)
    own = resolve_inputs({"normalization": "backbone", "image_size": "backbone"}, model, None)
    assert own.mean == (0.5,) * 3 and own.size == (160, 160)  # timm's test_resnet config
    explicit = {"normalization": {"mean": [0.4, 0.5, 0.6], "std": [0.2]}, "image_size": [24, 40]}
    spec = resolve_inputs(explicit, model, None)
    assert (spec.mean, spec.std, spec.size) == ((0.4, 0.5, 0.6), (0.2,) * 3, (24, 40))
    with pytest.raises(ConfigError, match=r"preprocess.normalization='imagenet': expected data"):
        resolve_inputs({"normalization": "imagenet", "image_size": 32}, model, None)
    with pytest.raises(ConfigError, match=r"preprocess.image_size=\[1, 2, 3\]"):
        resolve_inputs({"normalization": "backbone", "image_size": [1, 2, 3]}, model, None)

    from lightning_mtl.export import export

    with pytest.raises(ConfigError, match=r"format='tflite'"):
        export(compose_config("export", [*DATA, f"ckpt_path={run}", "format=tflite"], tmp_path))


@pytest.mark.slow  # the ONNX (dynamo) export alone takes 10-15 s on 2 CPU cores
def test_export_to_onnx_and_torchscript_matches_the_checkpoint(run: Path, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    from lightning_mtl.export import ExportError, check_tolerance, export

    cfg = compose_config("export", [*DATA, f"ckpt_path={run}", "format=both"], tmp_path)
    description = export(cfg)
    folder = run / "export"  # the checkpoint's run folder
    assert description["folder"] == str(folder)
    assert description["files"] == {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
    differences = description["check"]["max_abs_difference"]
    for fmt in ("onnx", "torchscript"):
        assert set(differences[fmt]) == set(TASKS)
        assert max(differences[fmt].values()) <= 1e-4
    saved = json.loads((folder / "model.json").read_text())
    assert saved["input"]["shape"] == ["batch", 3, 32, 32] and saved["input"]["dtype"] == "float32"
    assert saved["input"]["mean"] == [0.42] * 3 and saved["input"]["std"] == [0.2] * 3
    assert saved["outputs"]["segmentation"]["shape"] == ["batch", 4, 32, 32]
    assert saved["check"]["max_abs_difference"] == differences

    # Both files run another batch size than the check's, and agree with PyTorch.
    model = predict_model(run)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = model.net(images)
    expected = {t.name: predicted(t, raw[t.name]) for t in model.tasks}
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    assert [o.name for o in session.get_outputs()] == TASKS
    assert session.get_inputs()[0].name == "images"
    values = session.run(None, {"images": images.numpy()})
    for name, value in zip(TASKS, values, strict=True):
        assert np.abs(value - expected[name].numpy()).max() < 1e-4
    scripted = torch.jit.load(str(folder / "model.torchscript.pt"))
    with torch.no_grad():
        outputs = scripted(images)
    assert isinstance(outputs, dict) and list(outputs) == TASKS
    assert all(torch.allclose(outputs[n], expected[n], atol=1e-5) for n in TASKS)

    # the onnxruntime snippet of docs/predict_export.md runs as written on this export
    page = (Path(__file__).parents[1] / "docs" / "predict_export.md").read_text()
    snippet = re.findall(r"```python\n(.*?)```", page, re.S)[-1]
    # a JPEG over twice the model's 32 px: decoded at half scale (PIL's draft), then resized
    image = tmp_path / "scene.jpg"
    pixels = np.random.default_rng(5).integers(0, 256, (72, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image, quality=90)
    snippet = snippet.replace("logs/train/runs/<date_time>/export", str(folder))
    namespace: dict = {}
    exec(compile(snippet.replace('"scene.png"', repr(str(image))), "snippet", "exec"), namespace)
    # ... and prepares the image exactly as training and mtl-predict do
    trained = load_image(image, (32, 32), "test", SHAPES_NORMALIZATION)
    assert np.abs(namespace["x"][0] - trained.numpy()).max() < 1e-5
    assert saved["input"]["interpolation"] == "bilinear" and saved["input"]["antialias"] is False
    with torch.no_grad():
        raw = model.net(torch.from_numpy(namespace["x"]))
    task = next(t for t in model.tasks if t.name == "dominant_color")
    colours = predicted(task, raw["dominant_color"])[0]
    assert np.abs(namespace["outputs"]["dominant_color"][0] - colours.numpy()).max() < 1e-4
    assert namespace["mask"].shape == (32, 32) and namespace["colour"] == int(colours.argmax())

    # an output beyond the tolerance stops the export with the task and the numbers
    reference = {"depth": torch.full((2, 1, 4, 4), 10.0)}
    check_tolerance("onnx", {"depth": 5e-4}, reference, 1e-4)  # relative to |depth| = 10
    with pytest.raises(ExportError, match=r"onnx export differs .* depth: 0\.002 > 0\.001"):
        check_tolerance("onnx", {"depth": 2e-3}, reference, 1e-4)


def test_dense_writers_on_tensors(tmp_path: Path) -> None:
    """Normals (no Shapes task has them) and segmentation, on hand-made outputs."""
    info = FeatureInfo((8, 16), (4, 8))
    tasks = build_tasks(
        {
            "normals": {"head": {"name": "normals"}, "loss": "cosine", "metrics": ["mean_angle"]},
            "parts": {
                "head": {"name": "segmentation", "num_classes": 3},
                "loss": "cross_entropy",
                "metrics": ["miou"],
            },
        },
        info,
    )
    normals_task, parts_task = tasks
    up = torch.zeros(3, 4, 4)
    up[2] = 1.0  # every pixel faces the camera (0, 0, 1)
    up[0, :, 2:] = 1.0  # the right half leans to +x before normalisation
    output = predicted(normals_task, up[None])[0]
    sample = Sample("dir/n.png", (6, 8))
    NormalsWriter(normals_task, tmp_path, WriterOptions()).write(sample, output)
    normals = np.load(tmp_path / "normals" / "dir" / "n.npy")
    assert normals.shape == (3, 6, 8) and normals.dtype == np.float32
    assert np.allclose(np.linalg.norm(normals, axis=0), 1.0, atol=1e-5)
    assert np.allclose(normals[:, 0, 0], [0, 0, 1], atol=1e-6)
    rgb = np.asarray(Image.open(tmp_path / "normals" / "dir" / "n.png"))
    assert rgb.shape == (6, 8, 3) and rgb[0, 0].tolist() == [128, 128, 255]

    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2, 0, 0] = logits[0, 1, 1, 1] = 5.0
    probs = predicted(parts_task, logits)[0]
    assert torch.allclose(probs.sum(0), torch.ones(2, 2))
    SegmentationWriter(parts_task, tmp_path, WriterOptions()).write(Sample("m", (2, 2)), probs)
    assert np.asarray(Image.open(tmp_path / "parts" / "m.png")).tolist() == [[2, 0], [0, 1]]


@pytest.mark.slow
def test_ddp_predict_writes_each_sample_once(run: Path, tmp_path: Path) -> None:
    """Two CPU processes (gloo): the table has one row per test scene, every mask exists."""
    command = [
        sys.executable,
        "-m",
        "lightning_mtl.predict",
        "trainer=ddp_sim",
        *[o for o in PREDICT if not o.startswith("trainer.")],
        f"ckpt_path={run}",
        "data.test_size=5",  # odd: the ranks get different numbers of batches
        "data.batch_size=2",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = tmp_path / "predictions"
    files = [f"shapes/test/{i:06d}" for i in range(5)]
    for task in ("count", "dominant_color", "colors"):
        assert [r["file"] for r in read_csv(out / f"{task}.csv")] == files
    assert len(list((out / "segmentation").rglob("*.png"))) == 5
    assert json.loads((out / "summary.json").read_text())["samples"] == 5
