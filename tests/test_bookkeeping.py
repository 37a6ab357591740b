"""The bookkeeping that lives outside the LightningModule, tested where it lives: metrics per
stage × task × source with the DDP agreement on updated tasks, the gradient-conflict monitor,
and the fp16 roll-back of the balancer's state."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from lightning_mtl.callbacks import BalancerRollback, GradientConflictMonitor
from lightning_mtl.models.backbone import FeatureInfo
from lightning_mtl.models.meeting import Meeting, MeetingPlace
from lightning_mtl.task_metrics import TaskMetrics
from lightning_mtl.tasks import build_tasks
from lightning_mtl.weighting import build_weighting

INFO = FeatureInfo((8,), (32,))
TASKS = {
    "cls": {
        "head": {"name": "classification", "num_classes": 3},
        "loss": "cross_entropy",
        "metrics": ["accuracy"],
    },
    "reg": {"head": "regression", "loss": "mse", "metrics": ["mae"]},
}


class Recorder:
    """What a LightningModule's ``log``/``log_dict`` and a logger's ``log_metrics`` receive."""

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, key: str, value: Any, **kwargs: Any) -> None:
        self.logged[key] = float(value)

    def log_dict(self, values: dict[str, Any], **kwargs: Any) -> None:
        for key, value in values.items():
            self.log(key, value)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self.logged.update(values)


def fake_module(world_size: int = 1, remote: torch.Tensor | None = None) -> Any:
    """Enough of a LightningModule for ``TaskMetrics.log_epoch``; under 'DDP' the other rank's
    flags of updated collections are ``remote``."""
    recorder = Recorder()

    def reduce(tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        return tensor + (remote if remote is not None else 0)

    trainer = SimpleNamespace(world_size=world_size, strategy=SimpleNamespace(reduce=reduce))
    return SimpleNamespace(
        device=torch.device("cpu"),
        trainer=trainer,
        log=recorder.log,
        log_dict=recorder.log_dict,
        logged=recorder.logged,
    )


def test_task_metrics_log_each_stage_task_and_source_once_per_epoch_and_reset() -> None:
    tasks = build_tasks(TASKS, INFO)
    metrics = TaskMetrics(tasks, train=False)
    assert "train_cls" not in metrics.metrics and "val_cls" in metrics.metrics
    metrics.add_sources({"a": ["cls", "reg"], "b": ["reg"]})
    assert metrics.source_names == ["a", "b"] and "val_b__cls" not in metrics.metrics
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    labelled = {"cls": (logits, torch.tensor([0, 2])), "reg": (torch.ones(2, 1), torch.zeros(2, 1))}
    losses = {"cls": torch.tensor(0.5), "reg": torch.tensor(1.0)}
    metrics.evaluate("val", losses, labelled, dataloader_idx=0)  # a batch of source a
    metrics.evaluate("val", {"reg": torch.tensor(3.0)}, {"reg": labelled["reg"]}, 1)  # of b
    module = fake_module()
    metrics.log_epoch("val", module)
    logged = module.logged
    assert logged["val/cls/accuracy"] == 0.5 and logged["val/a/cls/accuracy"] == 0.5
    assert logged["val/reg/mae"] == 1.0 and logged["val/b/reg/mae"] == 1.0
    # mean losses weighted by labelled samples: reg saw 1.0 (2 samples) then 3.0 (2 samples)
    assert logged["val/reg/loss"] == 2.0 and logged["val/loss"] == 2.5
    assert logged["val/a/total_loss"] == 1.5 and logged["val/b/total_loss"] == 3.0
    assert "val/b/cls/accuracy" not in logged
    module = fake_module()
    metrics.log_epoch("val", module)  # reset: an epoch without batches logs nothing
    assert module.logged == {}
    metrics.add_sources({})  # another data module: the per-source collections go
    assert metrics.source_names == [] and "val_a__cls" not in metrics.metrics


def test_ranks_agree_on_which_tasks_to_compute_before_gathering() -> None:
    """A task updated on another rank only is still computed (and gathered) on this one, or
    the ranks' collective calls would not match."""
    tasks = build_tasks(TASKS, INFO)
    metrics = TaskMetrics(tasks, train=True)
    metrics.update("train_", {"reg": (torch.ones(2, 1), torch.zeros(2, 1))})
    remote = torch.tensor([1.0, 0.0])  # train_cls, train_reg: the other rank updated cls only
    module = fake_module(world_size=2, remote=remote)
    with pytest.warns(UserWarning):  # torchmetrics: cls computed with no local update
        metrics.log_epoch("train", module)
    assert {"train/cls/accuracy", "train/reg/mae"} <= set(module.logged)
    assert "train/loss" not in module.logged  # train stages log no mean loss


class Net(nn.Module):
    """``z = W x`` shared by two linear 'heads'; tasks a and b conflict by construction."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4, bias=False)
        with torch.no_grad():
            self.shared.weight.copy_(torch.eye(4, 3))


def test_gradient_conflict_monitor_logs_norms_and_cosines_of_the_task_gradients() -> None:
    net = Net()
    x = torch.tensor([[1.0, 2.0, 3.0]])
    z = net.shared(x)
    losses = {"a": z[:, 0].sum() * 2.0, "b": -z[:, 0].sum() + z[:, 1].sum()}
    meeting = Meeting.of(MeetingPlace("shared", ("a", "b"), (net,)), [z], cut=False)
    record = SimpleNamespace(losses=losses, meetings=[meeting], grad_scale=None, batch_idx=0)
    recorder = Recorder()
    module = SimpleNamespace(
        step_record=record,
        weighting=build_weighting("equal", ["a", "b"]),
        tasks=[SimpleNamespace(name="a"), SimpleNamespace(name="b")],
    )
    trainer = SimpleNamespace(
        global_step=4,
        accumulate_grad_batches=1,
        world_size=1,
        loggers=[recorder],
        is_global_zero=True,
    )
    monitor = GradientConflictMonitor(every_n_steps=2, heatmap=False)
    monitor.on_before_backward(trainer, module, torch.zeros(()))
    # gradients at z: a = (2, 0, 0, 0), b = (-1, 1, 0, 0)
    assert recorder.logged["train/grad_norm/a"] == pytest.approx(2.0)
    assert recorder.logged["train/grad_norm/b"] == pytest.approx(2**0.5)
    assert recorder.logged["train/grad_cos/a/b"] == pytest.approx(-(2**-0.5))
    names, cosine, step = monitor.last
    assert names == ["a", "b"] and step == 4 and cosine.shape == (2, 2)
    recorder.logged.clear()
    trainer.global_step = 5  # not a measuring step
    monitor.on_before_backward(trainer, module, torch.zeros(()))
    assert recorder.logged == {}
    net.requires_grad_(False)  # a frozen trunk: nothing to measure, no crash
    trainer.global_step = 6
    z = net.shared(x)
    record.meetings = [Meeting.of(MeetingPlace("shared", ("a", "b"), (net,)), [z], cut=False)]
    record.losses = {"a": z[:, 0].sum(), "b": z[:, 1].sum()}
    monitor.on_before_backward(trainer, module, torch.zeros(()))
    assert recorder.logged == {}


class Scaler:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def get_scale(self) -> float:
        return self.scale


def test_a_step_the_grad_scaler_skips_leaves_no_trace_in_the_balancer() -> None:
    balancer = build_weighting("famo", ["a", "b"])
    scaler = Scaler(2.0**16)
    trainer = SimpleNamespace(
        precision_plugin=SimpleNamespace(scaler=scaler), accumulate_grad_batches=1, global_step=0
    )
    module = SimpleNamespace(weighting=balancer)
    rollback = BalancerRollback()
    before = {k: v.clone() for k, v in balancer.state_dict().items()}
    key = next(k for k, v in before.items() if v.is_floating_point())
    rollback.on_train_batch_start(trainer, module, None, 0)
    balancer.state_dict()[key].add_(1.0)  # the balancer moved during the step
    scaler.scale /= 2  # ... and the scaler skipped it
    rollback.on_train_batch_end(trainer, module, None, None, 0)
    torch.testing.assert_close(balancer.state_dict()[key], before[key])
    rollback.on_train_batch_start(trainer, module, None, 1)
    balancer.state_dict()[key].add_(1.0)  # a step that was taken: the state stays
    rollback.on_train_batch_end(trainer, module, None, None, 1)
    torch.testing.assert_close(balancer.state_dict()[key], before[key] + 1.0)
    # without a scaler (fp32, bf16) nothing is snapshotted
    trainer.precision_plugin = SimpleNamespace()
    fresh = BalancerRollback()
    fresh.on_train_batch_start(trainer, module, None, 2)
    assert fresh._snapshot is None
