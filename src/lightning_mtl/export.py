"""Export a checkpoint's multi-task model to ONNX and TorchScript, and check the exported model.

    mtl-export ckpt_path=logs/train/runs/<date_time>                 # both formats
    mtl-export ckpt_path=.../checkpoints/last.ckpt format=onnx output_dir=deploy/
    python -m lightning_mtl.export ckpt_path=... preprocess.normalization=backbone

**What is exported** is what a user deploys: the network with every task head, taking a batch of
*normalised* images and returning one named output per task. The input is ``images``, float32
N×3×H×W, RGB in [0, 1] normalised with ``(x - mean) / std`` per channel, at the size the model was
trained with; the batch axis is dynamic, H and W are fixed. The outputs, named after the tasks,
are those of the module's ``predict_step`` (``activation=true``: class probabilities, per pixel
for segmentation; multi-label sigmoid scores; regression values; depth maps; unit normals) or
the heads' raw logits (``activation=false``). ONNX output names are the task names; the
TorchScript module returns ``Dict[str, Tensor]``. ``model.json`` beside the files records the
input (shape, dtype, layout, mean, std, size; from ``configs/preprocess/``, as ``mtl-predict``
prepares images; and the resize: interpolation, antialias, align_corners), each output's kind,
shape and meaning, and the check's numbers.

**Exporters.** ONNX goes through ``torch.onnx.export(..., dynamo=True)`` (``torch.export``
then onnxscript), the exporter torch maintains. The older TorchScript-based ONNX exporter
(``dynamo=False``) fails on the MTAN architecture (adaptive pooling whose output size comes from
the input's shape is not constant to it), while the dynamo exporter handled every architecture
tried (hard, branched, mtan, mmoe, ple, cross_stitch, adapters; resnet18 and timm's test_resnet).
TorchScript goes through ``torch.jit.trace``: ``torch.jit.script`` cannot compile timm models
and the architectures' Python (dataclasses, registries), and the traced graph of these
feed-forward networks has no data-dependent control flow. Tracing with ``strict=False`` keeps
the dict output.

**The check** runs the PyTorch model of the checkpoint and the exported files (onnxruntime for
ONNX, ``torch.jit.load`` for TorchScript) on one seeded batch of random normalised images, of
another batch size than the export's example (so the dynamic batch axis is exercised), and
reports each output's max absolute difference. It fails (:class:`ExportError`) when a difference
exceeds ``tolerance * max(1, max |PyTorch output|)``: ``tolerance=1e-4`` by default, an absolute
bound for outputs of order one (probabilities, unit normals) and a relative one for larger values
(depth, counts). float32 kernels that sum in another order differ by about 1e-7 relative per
layer; the template's models differ by 1e-8 to 1e-6 (measured), so 1e-4 leaves two orders of
margin while a wrong export (a missing or changed operation) moves outputs by 1e-2 or more.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from lightning_mtl.checkpointing import run_folder
from lightning_mtl.cli import export as main  # the console script: mtl-export
from lightning_mtl.errors import ConfigError, ExportError
from lightning_mtl.eval import checkpoint_model, load_weights
from lightning_mtl.prediction import (
    reads_data,
    resolve_inputs,
    trained_datamodule,
    write_summary,
    writer_class,
)
from lightning_mtl.tasks import TaskSpec
from lightning_mtl.utils.setup import apply_extras

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "both")
INPUT_NAME = "images"
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
# The protobuf limit of one ONNX file: larger models keep their weights in model.onnx.data.
ONNX_SINGLE_FILE_BYTES = 1_800_000_000

#: what each kind's output holds, for model.json (activation=true, then false)
MEANINGS = {
    "classification": ("class probabilities (softmax)", "class logits"),
    "multilabel": ("label probabilities (sigmoid, independent)", "label logits"),
    "regression": ("values", "values"),
    "segmentation": ("per-pixel class probabilities (softmax over dim 1)", "per-pixel logits"),
    "dense_regression": ("per-pixel values", "per-pixel values"),
    "normals": ("per-pixel unit normals (x, y, z)", "per-pixel unit normals (x, y, z)"),
}


class DeployedModel(nn.Module):
    """The network of a :class:`~lightning_mtl.module.MultiTaskModule` as deployed:
    ``forward(images) -> {task: output}``, each output activated as ``predict_step`` does
    (``activation=True``) or raw."""

    def __init__(self, net: nn.Module, tasks: list[TaskSpec], activation: bool = True) -> None:
        super().__init__()
        self.net = net
        identity: Callable[[torch.Tensor], torch.Tensor] = lambda x: x  # noqa: E731
        self.activations: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            t.name: writer_class(t).activate if activation else identity for t in tasks
        }

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.net(images)
        return {name: activate(outputs[name]) for name, activate in self.activations.items()}


# -------------------------------------------------------------------------------------- formats
def export_onnx(model: DeployedModel, example: torch.Tensor, path: Path, opset: int | None) -> None:
    """``model`` to ONNX with the dynamo exporter (see the module docstring): input ``images``
    with a dynamic batch axis, one output per task named after it."""
    for package in ("onnx", "onnxscript"):
        _require(package)
    names = list(model.activations)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    kwargs: dict[str, Any] = {} if opset is None else {"opset_version": int(opset)}
    with warnings.catch_warnings():
        # the exporter's notes about torch internals it uses, not about this model
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
            dynamo=True,
            external_data=size >= ONNX_SINGLE_FILE_BYTES,
            verbose=False,
            **kwargs,
        )


def export_torchscript(model: DeployedModel, example: torch.Tensor, path: Path) -> None:
    """``model`` traced to TorchScript (``strict=False`` keeps the dict output)."""
    with torch.no_grad(), warnings.catch_warnings():
        # Python numbers taken from shapes (the output size of an upsampling) are traced as
        # constants: right here, the spatial size is fixed; the check below runs another batch.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # torch 2.13 marks torch.jit deprecated (in favour of torch.export, which the ONNX
        # export uses); TorchScript files are still what LibTorch (C++) deployments load.
        warnings.filterwarnings("ignore", r"`torch\.jit\.", DeprecationWarning)
        traced = torch.jit.trace(model, (example,), strict=False)
    traced.save(str(path))


def run_onnx(path: Path, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ONNX file's outputs on ``images`` (onnxruntime, CPU), by output name."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    values = session.run(names, {INPUT_NAME: images.numpy()})
    return {name: torch.from_numpy(value) for name, value in zip(names, values, strict=True)}


def run_torchscript(path: Path, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The TorchScript file's outputs on ``images`` (``torch.jit.load``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return dict(module(images))


EXPORTERS: dict[str, Callable[..., None]] = {
    "onnx": lambda model, example, path, cfg: export_onnx(model, example, path, cfg.get("opset")),
    "torchscript": lambda model, example, path, cfg: export_torchscript(model, example, path),
}
RUNNERS: dict[str, Callable[[Path, torch.Tensor], dict[str, torch.Tensor]]] = {
    "onnx": run_onnx,
    "torchscript": run_torchscript,
}


def _require(package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ConfigError(
            f"format=onnx needs the package {package!r} of the export extra: `uv sync --inexact --extra "
            "export` (onnx, onnxscript, onnxruntime), or format=torchscript"
        ) from error


# -------------------------------------------------------------------------------------- checking
def compare(
    reference: Mapping[str, torch.Tensor], exported: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """Each output's max absolute difference (an ExportError when names or shapes differ)."""
    if list(exported) != list(reference):
        raise ExportError(
            f"the exported model's outputs are {list(exported)}, expected the tasks "
            f"{list(reference)} in that order"
        )
    differences = {}
    for name, expected in reference.items():
        got = exported[name]
        if tuple(got.shape) != tuple(expected.shape):
            raise ExportError(
                f"output {name!r} has shape {tuple(got.shape)}, the PyTorch model's "
                f"{tuple(expected.shape)}"
            )
        differences[name] = float((got.float() - expected.float()).abs().max())
    return differences


def check_tolerance(
    fmt: str,
    differences: Mapping[str, float],
    reference: Mapping[str, torch.Tensor],
    tolerance: float,
) -> None:
    """Fail when an output differs by more than ``tolerance * max(1, max |reference|)``."""
    failed = {}
    for name, difference in differences.items():
        bound = tolerance * max(1.0, float(reference[name].abs().max()))
        if not difference <= bound:  # NaN fails too
            failed[name] = (difference, bound)
    if failed:
        shown = ", ".join(f"{n}: {d:.3g} > {b:.3g}" for n, (d, b) in failed.items())
        raise ExportError(
            f"the {fmt} export differs from the PyTorch model of the checkpoint beyond "
            f"tolerance={tolerance:g} (× max(1, max |output|)): {shown}. The file is kept for "
            "inspection; an operation was exported differently"
        )


# -------------------------------------------------------------------------------------- the run
def export_folder(cfg: DictConfig, ckpt_path: str) -> Path:
    """``output_dir``, else the checkpoint's run folder's ``export/``, else this run's."""
    if cfg.get("output_dir"):
        return Path(str(cfg.output_dir)).expanduser()
    run = run_folder(ckpt_path)
    return (run if run is not None else Path(cfg.paths.output_dir)) / "export"


def describe_outputs(
    tasks: list[TaskSpec], outputs: Mapping[str, torch.Tensor], activation: bool
) -> dict[str, Any]:
    """Each output's kind, shape (batch first, named) and meaning, for model.json."""
    described = {}
    for task in tasks:
        kind = task.head.metric_kind
        meaning = MEANINGS.get(kind, ("values", "values"))[0 if activation else 1]
        described[task.name] = {
            "kind": kind,
            "shape": ["batch", *outputs[task.name].shape[1:]],
            "dtype": "float32",
            "values": meaning,
        }
    return described


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path`` in ``cfg.format`` and check it; return the description written
    to ``model.json`` (files, input, outputs, and the max abs differences per format and task)."""
    fmt = str(cfg.get("format", "both"))
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: accepted values: {', '.join(FORMATS)}")
    formats = ["onnx", "torchscript"] if fmt == "both" else [fmt]
    batch_size, tolerance = cfg.get("batch_size", 2), cfg.get("tolerance", 1e-4)
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ConfigError(
            f"batch_size={batch_size!r}: expected an integer >= 2 (torch.export fixes a batch "
            "axis of size 1)"
        )
    if not isinstance(tolerance, int | float) or tolerance <= 0:
        raise ConfigError(f"tolerance={tolerance!r}: expected a number > 0")
    model, ckpt_path = checkpoint_model(cfg, "mtl-export")
    apply_extras(cfg)
    preprocess = cfg.get("preprocess") or {}
    datamodule = trained_datamodule(cfg, model, ckpt_path) if reads_data(preprocess) else None
    inputs = resolve_inputs(preprocess, model, datamodule)
    load_weights(model, ckpt_path)
    model = model.to("cpu").eval()
    deployed = DeployedModel(model.net, model.tasks, bool(cfg.get("activation", True))).eval()

    generator = torch.Generator().manual_seed(int(cfg.get("seed") or 0))
    shape = (3, *inputs.size)
    example = torch.randn((batch_size, *shape), generator=generator)
    sample = torch.randn((batch_size + 1, *shape), generator=generator)
    with torch.no_grad():
        reference = deployed(sample)

    folder = export_folder(cfg, ckpt_path)
    folder.mkdir(parents=True, exist_ok=True)
    differences: dict[str, dict[str, float]] = {}
    files = {}
    for name in formats:
        path = folder / FILES[name]
        started = time.perf_counter()
        EXPORTERS[name](deployed, example, path, cfg)
        log.info("%s export written to %s (%.1f s)", name, path, time.perf_counter() - started)
        try:
            outputs = RUNNERS[name](path, sample)
        except Exception as error:
            raise ExportError(f"the {name} export {path} cannot be run: {error}") from error
        differences[name] = compare(reference, outputs)
        files[name] = path.name
        for task, difference in differences[name].items():
            log.info("%s vs PyTorch, max |difference| of %s: %.3g", name, task, difference)
        check_tolerance(name, differences[name], reference, float(tolerance))

    description = {
        "checkpoint": str(Path(ckpt_path).resolve()),
        "backbone": model.hparams["backbone"]["name"],
        "architecture": dict(model.hparams["architecture"]),
        "files": files,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", *shape],
            "dtype": "float32",
            "layout": "NCHW, RGB",
            "preprocessing": "pixel values / 255 (RGB in [0, 1]), resized to size (H, W), "
            "then (x - mean) / std per channel",
            **inputs.as_dict(),
        },
        "outputs": describe_outputs(model.tasks, reference, bool(cfg.get("activation", True))),
        "check": {
            "batch_size": batch_size + 1,
            "tolerance": float(tolerance),
            "max_abs_difference": differences,
        },
    }
    write_summary(folder / "model.json", description)
    log.info("export checked within tolerance %g: %s", tolerance, differences)
    return {**description, "folder": str(folder)}


if __name__ == "__main__":
    main()
