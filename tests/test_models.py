"""Backbones, every head type, losses and metrics: shapes, numbers and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from lightning_mtl.errors import ConfigError
from lightning_mtl.metrics import (
    AngularAccuracy,
    MeanAngularError,
    ThresholdAccuracy,
    build_metrics,
)
from lightning_mtl.models.backbone import Backbone
from lightning_mtl.models.heads import HEADS
from lightning_mtl.models.losses import LOSSES
from lightning_mtl.tasks import build_tasks

# One task per head type, with labels of the shape each head expects for a 32×32 input.
TASKS = {
    "cls": {
        "head": {"name": "classification", "num_classes": 3},
        "loss": "cross_entropy",
        "metrics": ["accuracy", "f1"],
    },
    "tags": {
        "head": {"name": "multilabel", "num_labels": 5, "hidden": 16},
        "loss": "bce",
        "metrics": ["accuracy", "map"],
    },
    "reg": {"head": {"name": "regression", "out_dim": 2}, "loss": "mse", "metrics": ["mae", "r2"]},
    "seg": {
        "head": {"name": "segmentation", "num_classes": 4, "decoder_channels": 16},
        "loss": {"name": "cross_entropy", "ignore_index": 255},
        "metrics": ["miou", "pixel_accuracy"],
    },
    "depth": {
        "head": {"name": "dense_regression", "activation": "softplus", "decoder_channels": 16},
        "loss": {"name": "l1", "ignore_value": 0.0},
        "metrics": ["abs_rel", "delta1", "rmse"],
    },
    "normals": {
        "head": {"name": "normals", "decoder_channels": 16},
        "loss": "cosine",
        "metrics": ["mean_angle", "within_11_25"],
    },
}


def labels(batch: int, size: int) -> dict[str, torch.Tensor]:
    seg = torch.randint(0, 4, (batch, size, size))
    seg[:, 0] = 255
    return {
        "cls": torch.randint(0, 3, (batch,)),
        "tags": torch.randint(0, 2, (batch, 5)).float(),
        "reg": torch.randn(batch, 2),
        "seg": seg,
        "depth": torch.rand(batch, 1, size, size) * 5,
        "normals": torch.nn.functional.normalize(torch.randn(batch, 3, size, size), dim=1),
    }


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", {}),
        ("convnext_atto", {}),
        ("efficientnet_b0", {}),
        ("vit_tiny_patch16_224", {"model_kwargs": {"img_size": 32}}),
    ],
)
def test_every_head_on_every_backbone_family(name: str, kwargs: dict) -> None:
    backbone = Backbone(name, **kwargs)
    tasks = build_tasks(TASKS, backbone)
    images = torch.randn(2, 3, 32, 32)
    features = backbone(images)
    assert features.pooled.shape == (2, backbone.pooled_dim)
    assert [m.shape[1] for m in features.maps] == backbone.channels
    targets = labels(2, 32)
    total = 0.0
    for task in tasks:
        output = task.head(features, (32, 32))
        assert tuple(output.shape[1:]) in {
            (task.head.out_features,),
            (task.head.out_features, 32, 32),
        }, task.name
        assert task.head.target_shape(output[0]) == tuple(targets[task.name].shape[1:]), task.name
        loss = task.loss(output, targets[task.name])
        assert loss is not None and torch.isfinite(loss) and loss > 0, task.name
        total = total + loss
        metrics = build_metrics(task.name, task.head, task.metrics)
        metrics.update(*task.metric_inputs(output.detach(), targets[task.name]))
        assert all(torch.isfinite(v) for v in metrics.compute().values()), task.name
    total.backward()
    grads = [p.grad for p in backbone.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_normals_head_outputs_unit_vectors() -> None:
    backbone = Backbone("resnet18")
    head = HEADS.build("normals", "x", backbone, decoder_channels=8)
    out = head(backbone(torch.randn(2, 3, 32, 32)), (32, 32))
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 32, 32), atol=1e-5)


def test_losses_match_reference_values_and_skip_ignored_labels() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 2])
    expected = torch.nn.functional.cross_entropy(logits, target)
    assert torch.isclose(LOSSES.build("cross_entropy", "x")(logits, target), expected)
    ignored = LOSSES.build("cross_entropy", "x", ignore_index=2)(logits, target)
    assert torch.isclose(ignored, torch.nn.functional.cross_entropy(logits[:1], target[:1]))
    assert LOSSES.build("cross_entropy", "x", ignore_index=0)(logits[:1], target[:1]) is None
    pred, label = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 3.0, 4.0])
    l1 = LOSSES.build("l1", "x", ignore_value=0.0)
    assert torch.isclose(l1(pred, label), torch.tensor(0.5))  # |2-3| and |4-4| over 2 pixels
    assert LOSSES.build("l1", "x", ignore_value=0.0)(pred, torch.zeros(3)) is None
    assert torch.isclose(LOSSES.build("mse", "x")(pred, label), torch.tensor(2.0 / 3))
    normals = torch.nn.functional.normalize(torch.randn(2, 3, 4, 4), dim=1)
    assert torch.isclose(
        LOSSES.build("cosine", "x")(normals, normals), torch.tensor(0.0), atol=1e-6
    )
    assert torch.isclose(LOSSES.build("cosine", "x")(-normals, normals), torch.tensor(2.0))
    # bf16 outputs are reduced in float32
    assert LOSSES.build("mse", "x")(pred.bfloat16(), label).dtype == torch.float32


def test_hand_written_metrics_match_their_definitions() -> None:
    delta = ThresholdAccuracy(1.25)
    delta.update(torch.tensor([1.0, 2.0, 3.0, 10.0]), torch.tensor([1.1, 3.0, 3.0, 4.0]))
    assert float(delta.compute()) == pytest.approx(0.5)  # ratios 1.1, 1.5, 1.0, 2.5
    angle = MeanAngularError()
    within = AngularAccuracy(within=50.0)
    preds = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    angle.update(preds, target)
    within.update(preds, target)
    assert float(angle.compute()) == pytest.approx(45.0)
    assert float(within.compute()) == pytest.approx(0.5)


def test_pretrained_weights_load_from_a_local_file(tmp_path: Path) -> None:
    reference = timm.create_model("resnet18", pretrained=False)
    torch.nn.init.constant_(reference.conv1.weight, 0.125)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    loaded = Backbone("resnet18", pretrained=True, weights_file=str(path))
    assert torch.equal(loaded.model.conv1.weight, reference.conv1.weight)
    assert torch.equal(loaded.model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    fresh = Backbone("resnet18")
    assert not torch.equal(fresh.model.conv1.weight, reference.conv1.weight)
    with pytest.raises(ConfigError, match="no such file"):
        Backbone("resnet18", pretrained=True, weights_file=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="pretrained=false"):
        Backbone("resnet18", pretrained=False, weights_file=str(path))


def test_chance_baselines_are_the_best_image_independent_predictions() -> None:
    from lightning_mtl.baselines import chance_metrics

    backbone = Backbone("resnet18")
    spec = {
        "cls": {
            "head": {"name": "classification", "num_classes": 3},
            "loss": "cross_entropy",
            "metrics": ["accuracy"],
        },
        "reg": {"head": {"name": "regression"}, "loss": "mse", "metrics": ["mae"]},
        "seg": {
            "head": {"name": "segmentation", "num_classes": 2},
            "loss": "cross_entropy",
            "metrics": ["pixel_accuracy"],
        },
    }
    tasks = build_tasks(spec, backbone)
    seg_fit = torch.tensor([[[0, 1]], [[0, 1]], [[1, 1]]])  # pixel 0: mostly 0, pixel 1: always 1
    fit = [
        {
            "targets": {
                "cls": torch.tensor([0, 0, 1]),
                "reg": torch.tensor([[1.0], [2.0], [6.0]]),
                "seg": seg_fit,
            }
        }
    ]
    seg_eval = torch.tensor([[[0, 0]], [[1, 1]]])
    evaluate = [
        {
            "targets": {
                "cls": torch.tensor([0, 1, 1]),
                "reg": torch.tensor([[3.0], [5.0], [3.0]]),
                "seg": seg_eval,
            }
        }
    ]
    chance = chance_metrics(tasks, fit, evaluate)
    assert chance["cls"]["accuracy"] == pytest.approx(1 / 3)  # majority class 0
    assert chance["reg"]["mae"] == pytest.approx((0 + 2 + 0) / 3)  # mean 3
    assert chance["seg"]["pixel_accuracy"] == pytest.approx(2 / 4)  # predicts [0, 1] per pixel
