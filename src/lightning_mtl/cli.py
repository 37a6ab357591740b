"""The console scripts. Each names its job function by module, so ``mtl-train --help`` or
``--cfg job`` composes and prints without importing torch (utils/entry.py)."""

from __future__ import annotations

from lightning_mtl.utils.entry import run_entry_point


def train() -> None:
    """``mtl-train``: fit and test (configs/train.yaml); returns ``optimized_metric`` to a
    sweeper."""
    run_entry_point("lightning_mtl.train:optimized_metric", "train")


def evaluate() -> None:
    """``mtl-eval``: validate and test a checkpoint (configs/eval.yaml)."""
    run_entry_point("lightning_mtl.eval:evaluate", "eval")


def predict() -> None:
    """``mtl-predict``: each task's outputs for a folder of images or a data split
    (configs/predict.yaml)."""
    run_entry_point("lightning_mtl.predict:predict", "predict")


def export() -> None:
    """``mtl-export``: the multi-head model to ONNX and TorchScript, checked against the
    checkpoint (configs/export.yaml)."""
    run_entry_point("lightning_mtl.export:export", "export")
