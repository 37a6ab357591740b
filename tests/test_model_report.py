"""The model report: exact parameter ownership from the autograd graph, trainable and frozen
counts with the flags left as found, analytic FLOPs, and a short real run whose metrics.csv and
model summary carry the numbers."""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig
from torch import nn

from lightning_mtl.callbacks.model_report import ModelReport
from lightning_mtl.model_report import build_report

TASKS = ["a", "b", "c"]


def numel(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


class TinyNet(nn.Module):
    """A trunk every task reads, a layer only tasks a and b read, one head per task, and a layer
    no task reads."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8))
        self.pair = nn.Linear(8, 6)
        self.unused = nn.Linear(8, 3)
        self.heads = nn.ModuleDict(
            {"a": nn.Linear(6, 2), "b": nn.Linear(6, 3), "c": nn.Linear(8, 1, bias=False)}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.trunk(x)
        paired = self.pair(shared).relu()
        return {
            "a": self.heads["a"](paired),
            "b": self.heads["b"](paired),
            "c": self.heads["c"](shared),
        }


class Balancer(nn.Module):
    """Learned log-variances, plus a reference to a network module (counted once, in the net)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(3))
        self.borrowed = net.trunk


def test_ownership_is_exact_on_a_hand_built_net() -> None:
    net = TinyNet()
    report = build_report(net, TASKS, torch.randn(5, 4), balancer=Balancer(net))
    heads = net.heads
    assert report.shared.total == numel(net.trunk) == 4 * 8 + 8 + 2 * 8
    assert report.groups == {("a", "b"): report.owners[("a", "b")]}
    assert report.owners[("a", "b")].total == numel(net.pair)
    assert [report.specific(t).total for t in TASKS] == [numel(heads[t]) for t in TASKS]
    assert report.unused.total == numel(net.unused)
    assert report.balancer.total == 3
    assert report.total.total == numel(net) + 3
    assert report.used_by["a"].total == numel(net.trunk, net.pair, heads["a"])
    assert report.used_by["c"].total == numel(net.trunk, heads["c"])

    metrics = report.as_metrics()
    assert metrics["model/params/shared"] == numel(net.trunk)
    assert metrics["model/params/group/a+b"] == numel(net.pair)
    assert metrics["model/params/task/b"] == numel(heads["b"])
    assert metrics["model/params/unused"] == numel(net.unused)
    assert metrics["model/params/balancer"] == 3
    assert metrics["model/params/trainable"] == numel(net) + 3
    assert metrics["model/params/frozen"] == 0
    text = report.format()
    assert "shared by a+b" in text and "shared by all 3 tasks" in text
    assert "| a only |" in report.markdown()


def test_frozen_parameters_are_counted_and_flags_and_modes_are_restored() -> None:
    net = TinyNet()
    net.trunk.requires_grad_(False)
    net.heads["c"].weight.requires_grad_(False)
    net.train()
    net.trunk[2].eval()  # a frozen batch norm kept on its running statistics
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    modes = {n: m.training for n, m in net.named_modules()}

    report = build_report(net, TASKS, torch.randn(2, 4))

    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert {n: m.training for n, m in net.named_modules()} == modes
    # ownership does not depend on what trains: frozen parameters are still found
    assert report.shared == type(report.shared)(numel(net.trunk), 0)
    assert report.specific("c").frozen == 8 and report.specific("c").trainable == 0
    frozen = numel(net.trunk) + 8
    assert report.as_metrics()["model/params/frozen"] == frozen
    assert report.as_metrics()["model/params/trainable"] == numel(net) - frozen


def test_flags_are_restored_when_the_forward_fails() -> None:
    net = TinyNet()
    net.pair.requires_grad_(False)
    with pytest.raises(KeyError, match="no output"):
        build_report(net, [*TASKS, "missing"], torch.randn(1, 4))
    assert not any(p.requires_grad for p in net.pair.parameters())
    assert all(p.requires_grad for p in net.trunk.parameters())
    assert net.training


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.architecture = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.heads = nn.ModuleDict({"x": nn.Linear(8, 5), "y": nn.Conv2d(8, 2, 1)})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.architecture(images)
        return {"x": self.heads["x"](maps.mean(dim=(2, 3))), "y": self.heads["y"](maps)}


def test_flops_per_image_equal_the_analytic_count() -> None:
    net = ConvNet()
    h = w = 16
    report = build_report(net, ["x", "y"], torch.randn(4, 3, h, w))  # one image is measured
    conv = 2 * (8 * h * w) * (3 * 3 * 3)  # 2 FLOPs per multiply-add, per output element
    linear = 2 * 8 * 5
    pointwise = 2 * (2 * h * w) * 8
    assert report.input_shape == (1, 3, h, w)
    assert report.flops == conv + linear + pointwise
    assert report.module_flops == {"architecture": conv, "heads/x": linear, "heads/y": pointwise}
    metrics = report.as_metrics()
    assert metrics["model/flops_per_image"] == conv + linear + pointwise
    assert metrics["model/flops_per_image/heads/x"] == linear
    assert build_report(net, ["x", "y"], torch.randn(1, 3, h, w), flops=False).flops is None


def test_a_single_task_owns_everything_it_uses() -> None:
    net = ConvNet()
    report = build_report(net, ["x"], torch.randn(1, 3, 8, 8))
    assert report.shared.total == 0
    assert report.specific("x").total == numel(net.architecture, net.heads["x"])
    assert report.unused.total == numel(net.heads["y"])


def test_wandb_gets_the_numbers_in_its_summary_too() -> None:
    net = TinyNet()
    report = build_report(net, TASKS, torch.randn(1, 4))
    wandb = mock.Mock(spec=WandbLogger)
    trainer = mock.Mock(loggers=[wandb], global_step=0)
    ModelReport()._send(trainer, report)
    wandb.log_metrics.assert_called_once_with(report.as_metrics(), step=0)
    wandb.experiment.summary.update.assert_called_once_with(report.as_metrics())


def graph_owners(net: nn.Module, tasks: list[str], image: torch.Tensor) -> dict[str, set[str]]:
    """Per task, the parameters with a gradient from its output (torch.autograd.grad), for a
    cross-check of the graph walk."""
    names = dict(net.named_parameters())
    was = net.training
    net.eval()
    outputs = net(image)
    owners = {}
    for task in tasks:
        grads = torch.autograd.grad(
            outputs[task].sum(), list(names.values()), allow_unused=True, retain_graph=True
        )
        owners[task] = {n for n, g in zip(names, grads, strict=True) if g is not None}
    net.train(was)
    return owners


def test_default_run_logs_the_report_and_the_summary_counts_flops(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_mtl.train import train

    cfg = make_cfg(
        "model.backbone.name=resnet18",  # the default backbone: its stages are checked below
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "test=false",
        "+trainer.num_sanity_val_steps=0",
        "callbacks.gradient_conflict=null",
        "callbacks.model_checkpoint=null",
        "callbacks.model_summary={_target_:lightning.pytorch.callbacks.RichModelSummary,max_depth:1}",
    )
    _, objects = train(cfg)
    model = objects["model"]
    net, tasks = model.net, [t.name for t in model.tasks]

    # Lightning's summary ran forward on the example input: real FLOPs, not "Total FLOPs: 0"
    printed = capsys.readouterr().out
    total = re.search(r"Total FLOPs:\s*([\d.]+)\s*([KMGT]?)", printed)
    assert total is not None, printed[-2000:]
    assert float(total.group(1)) > 0
    assert tuple(model.example_input_array.shape) == (1, 3, 32, 32)

    with (tmp_path / "csv" / "metrics.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row.get("model/params/shared")]
    assert len(rows) == 1
    logged = {k: float(v) for k, v in rows[0].items() if k.startswith("model/") and v}
    # hard sharing: the backbone is shared by all tasks, each head is its task's own
    assert logged["model/params/shared"] == numel(net.architecture)
    for task in tasks:
        assert logged[f"model/params/task/{task}"] == numel(net.heads[task])
        assert logged[f"model/params/used_by/{task}"] == numel(net.architecture, net.heads[task])
    assert logged["model/params/unused"] == 0
    assert logged["model/params/total"] == numel(model)
    assert logged["model/params/trainable"] == numel(model) and logged["model/params/frozen"] == 0
    assert logged["model/flops_per_image"] > logged["model/flops_per_image/architecture"] > 0
    assert f"{logged['model/flops_per_image'] / 1e6:.1f}" == f"{float(total.group(1)):.1f}"
    assert total.group(2) == "M"
    markdown = (tmp_path / "model_report.md").read_text()
    assert markdown.startswith("# Model report")
    # resnet18's five stages, named as in timm's model, their sizes summing to the backbone
    callback = next(c for c in objects["trainer"].callbacks if isinstance(c, ModelReport))
    stages = callback.report.stages
    assert [label.split(": ")[1] for label, _ in stages] == [
        "conv1, bn1, act1",  # timm's first feature level is before the max-pool
        "maxpool, layer1",
        "layer2",
        "layer3",
        "layer4",
    ]
    assert [c.total for _, c in stages] == [
        sum(p.numel() for p in ps) for ps in net.architecture.stage_parameters()
    ]
    assert sum(c.total for _, c in stages) == numel(net.architecture)
    assert "| 1: maxpool, layer1 | 147,968 | 147,968 | 0 |" in markdown

    # the graph walk agrees with torch.autograd.grad on the real network
    image = model.example_input_array
    expected = graph_owners(net, tasks, image)
    owners: dict[tuple[str, ...], int] = {}
    for name, p in net.named_parameters():
        key = tuple(t for t in tasks if name in expected[t])
        owners[key] = owners.get(key, 0) + p.numel()
    assert {k: c.total for k, c in build_report(net, tasks, image).owners.items()} == owners


def test_a_network_compiled_in_place_is_measured_eagerly() -> None:
    net = TinyNet()
    # what nn.Module.compile() sets (without importing dynamo): calls go through this instead
    net._compiled_call_impl = mock.Mock(side_effect=AssertionError("compiled for one image"))
    report = build_report(net, TASKS, torch.randn(1, 4))
    assert report.shared.total == numel(net.trunk)
    net._compiled_call_impl.assert_not_called()
