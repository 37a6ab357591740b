"""NaN or inf in a task's loss or in the gradients (``model.nonfinite_loss``): a skipped step leaves
no trace in the parameters, the optimizer or the balancer; a dropped task does not poison the
others; the events are logged and counted; too many in a row, or NaN weights at the end, stop
the run with an error."""

from __future__ import annotations

import csv
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import lightning as L
import pytest
import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from lightning_mtl.callbacks.nonfinite import NonFiniteGuard
from lightning_mtl.errors import ConfigError
from lightning_mtl.nonfinite import NonFiniteError, NonFinitePolicy, check_losses
from lightning_mtl.train import train
from tests.conftest import FAST, compose_config, run_ddp_sim
from tests.test_module import batch_of

TASKS = "task=[segmentation,count,dominant_color]"
SHORT = [
    TASKS,
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=0",
    "test=false",
    "callbacks.model_checkpoint=null",
    "callbacks.gradient_conflict=null",
    "callbacks.model_report=null",
    "callbacks.step_timer=null",
    "preflight.mode=skip",
]


class NaNGradient(torch.autograd.Function):
    """The identity whose gradient is NaN: a finite loss with a non-finite backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.nan


class InjectNaN(L.Callback):
    """Makes ``task``'s loss NaN at the training micro-batches ``loss_at`` (counted from 0 over
    the run; ``from_batch``: every one from there on) and its gradient NaN at ``grad_at``, on the
    rank ``rank`` only (None: every rank)."""

    def __init__(
        self,
        task: str = "count",
        loss_at: tuple[int, ...] = (),
        grad_at: tuple[int, ...] = (),
        from_batch: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.task, self.loss_at, self.grad_at = task, set(loss_at), set(grad_at)
        self.from_batch, self.rank, self.batch = from_batch, rank, -1

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.on_rank = self.rank is None or trainer.global_rank == self.rank
        module.losses[self.task].register_forward_hook(self._hook)

    def on_train_batch_start(self, *args: Any) -> None:
        self.batch += 1

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Under DDP: every rank ends with the same weights (they skipped the same steps)."""
        if trainer.world_size > 1:
            total = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum()
            gathered = trainer.strategy.all_gather(total)
            assert torch.equal(gathered, gathered[:1].expand_as(gathered)), gathered

    def _hook(self, loss_module: nn.Module, inputs: Any, loss: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not self.on_rank:  # validation, or another rank
            return loss
        late = self.from_batch is not None and self.batch >= self.from_batch
        if self.batch in self.loss_at or late:
            return loss * math.nan
        if self.batch in self.grad_at:
            return NaNGradient.apply(loss)
        return loss


def _clone(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    return state


class StateProbe(L.Callback):
    """At each micro-batch's start and at the end: every weight and buffer of the module, the
    optimizer's state, the balancer's state and the GradScaler's scale."""

    def __init__(self) -> None:
        self.starts: list[dict[str, Any]] = []

    def _record(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.starts.append(
            {
                "model": _clone(module.state_dict()),
                "optimizer": _clone(trainer.optimizers[0].state_dict()["state"]),
                "balancer": _clone(module.weighting.state_dict()),
                "scale": scaler.get_scale() if scaler is not None else None,
            }
        )

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        self._record(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._record(trainer, module)


def identical(a: dict, b: dict) -> bool:
    """Bit-identical nested states (NaN equal to NaN: e.g. a never-computed cache)."""
    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        if isinstance(x, dict):
            if not identical(x, b[key]):
                return False
        elif isinstance(x, torch.Tensor):
            if x.shape != b[key].shape or not torch.equal(
                torch.nan_to_num(x, nan=7.0), torch.nan_to_num(b[key], nan=7.0)
            ):
                return False
        elif x != b[key]:
            return False
    return True


def logged(path: Path, key: str) -> dict[int, float]:
    with (path / "csv" / "metrics.csv").open() as file:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(file) if r.get(key)}


def fp16_scaler(cfg: DictConfig) -> None:
    """16-mixed with a real GradScaler on the CPU (Lightning's MixedPrecision plugin), its scale
    low enough that nothing overflows: only the injected NaN can skip a step."""
    scaler = {"_target_": "torch.amp.GradScaler", "device": "cpu", "init_scale": 16.0}
    plugin = {"_target_": "lightning.pytorch.plugins.precision.MixedPrecision"}
    plugin.update(precision="16-mixed", device="cpu", scaler=scaler)
    with open_dict(cfg):
        cfg.trainer.precision = None
        cfg.trainer.plugins = [plugin]


def probe_run(
    make_cfg: Callable[..., DictConfig], *overrides: str, fp16: bool = False, **inject: Any
) -> tuple[StateProbe, dict[str, Any]]:
    cfg = make_cfg(*SHORT, *overrides, "+callbacks.probe._target_=tests.test_nonfinite.StateProbe")
    with open_dict(cfg):
        cfg.callbacks.inject = {"_target_": "tests.test_nonfinite.InjectNaN", **inject}
    if fp16:
        fp16_scaler(cfg)
    _, objects = train(cfg)
    probe = next(c for c in objects["trainer"].callbacks if isinstance(c, StateProbe))
    return probe, objects


def _cases() -> list:
    """A stateful method in fp32 by default; the rest of {loss-based, stateful, gradient} ×
    {fp32, fp16 GradScaler} in the slow suite (fp16 autocast is slow on a CPU)."""
    fast = [("famo", False)]
    slow = [("dwa", False), ("dwa", True), ("famo", True), ("upgrad", False), ("upgrad", True)]
    slow += [("mgda", False)]
    slow += [("upgrad@params", False)]
    return [*fast, *(pytest.param(*case, marks=pytest.mark.slow) for case in slow)]


@pytest.mark.parametrize(("method", "fp16"), _cases())
def test_a_nan_loss_or_gradient_skips_the_step_for_every_parameter(
    method: str,
    fp16: bool,
    make_cfg: Callable[..., DictConfig],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Step 1: a NaN loss of ``count``; step 2 (fp32 only): a NaN gradient from a finite loss.
    Across those steps nothing moves: weights, batch-norm statistics, optimizer state, balancer
    state, the GradScaler's scale. The other steps train; the counter and warnings say so."""
    grad_at = () if fp16 else (2,)  # under fp16 the GradScaler owns non-finite gradients
    name, _, level = method.partition("@")
    overrides = [f"weighting={name}", *([f"weighting.level={level}"] if level else [])]
    with caplog.at_level(logging.WARNING, logger="lightning_mtl"):
        probe, objects = probe_run(make_cfg, *overrides, fp16=fp16, loss_at=(1,), grad_at=grad_at)
    starts = probe.starts
    assert len(starts) == 5
    skipped = {1, *grad_at}
    for step in range(4):
        before, after = starts[step], starts[step + 1]
        if step in skipped:
            assert identical(before["model"], after["model"]), step
            assert identical(before["optimizer"], after["optimizer"]), step
            assert identical(before["balancer"], after["balancer"]), step
            assert before["scale"] == after["scale"]
        else:
            assert not identical(before["model"], after["model"]), step
    assert all(torch.isfinite(p).all() for p in objects["model"].parameters())
    counter = logged(tmp_path, "train/nonfinite_steps")
    assert counter == {0: 0.0, 1: 1.0, 2: float(len(skipped)), 3: float(len(skipped))}
    assert "non-finite loss at step 1: task 'count' (nan)" in caplog.text
    assert ("non-finite gradient at step 2" in caplog.text) == (not fp16)


@pytest.mark.slow
def test_with_gradient_accumulation_the_whole_window_is_skipped(
    make_cfg: Callable[..., DictConfig],
) -> None:
    """Two micro-batches per step: a NaN in the second skips the step, the first's gradients
    and balancer update included."""
    probe, objects = probe_run(
        make_cfg,
        "weighting=famo",
        "trainer.accumulate_grad_batches=2",
        "trainer.limit_train_batches=6",
        loss_at=(3,),
    )
    starts = probe.starts
    assert objects["trainer"].global_step == 3 and len(starts) == 7
    for a, b in ((2, 4),):  # the window of micro-batches 2 and 3
        assert identical(starts[a]["model"], starts[b]["model"])
        assert identical(starts[a]["optimizer"], starts[b]["optimizer"])
        assert identical(starts[a]["balancer"], starts[b]["balancer"])
    assert not identical(starts[0]["model"], starts[2]["model"])
    assert not identical(starts[4]["model"], starts[6]["model"])


def test_max_consecutive_bad_steps_stop_the_run_with_a_clear_error(
    make_cfg: Callable[..., DictConfig],
) -> None:
    cfg = make_cfg(*SHORT, "weighting=dwa", "model.nonfinite_loss.max_consecutive=2")
    with open_dict(cfg):
        cfg.callbacks.inject = {"_target_": "tests.test_nonfinite.InjectNaN", "from_batch": 1}
    with pytest.raises(NonFiniteError) as error:
        train(cfg)
    message = str(error.value)
    assert "2 training steps in a row (1 to 2)" in message
    assert "task 'count'" in message
    assert "model.nonfinite_loss.max_consecutive=2" in message and "skip_step" in message


@pytest.mark.slow
def test_a_run_never_ends_with_nan_weights(make_cfg: Callable[..., DictConfig]) -> None:
    """An absurd learning rate makes the weights inf at the last step: the end-of-training
    guard stops the run, naming the parameters, instead of testing them."""
    cfg = make_cfg(
        TASKS,
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "model.scheduler=null",
    )
    with open_dict(cfg):
        cfg.model.optimizer.lr = 1e39  # inf in float32
    with pytest.raises(NonFiniteError, match=r"at the end of training \(step 1\): net\."):
        train(cfg)


# ------------------------------------------------------------------------ the step, no trainer
@pytest.fixture(scope="module")
def modules() -> dict[str, Any]:
    """One uncertainty-weighted module per policy (built once: a resnet18 each)."""
    built = {}
    for policy in ("skip_step", "drop_task"):
        cfg = compose_config(
            "train", [*FAST, "weighting=uncertainty", f"model.nonfinite_loss.policy={policy}"]
        )
        built[policy] = hydra.utils.instantiate(cfg.model)
    return built


def test_skip_step_returns_a_zero_without_calling_the_balancer(modules: dict[str, Any]) -> None:
    """A zero loss whose zero gradient reaches every parameter (what DDP needs), not through
    the NaN; the balancer never runs."""
    module = modules["skip_step"]
    module.zero_grad(set_to_none=True)
    batch = batch_of(4)
    batch["targets"]["count"][1] = math.nan  # a NaN label
    calls = []
    handle = module.weighting.register_forward_hook(lambda *args: calls.append(1))
    try:
        loss = module.training_step(batch, 0)
    finally:
        handle.remove()
    assert not calls and module.step_record is None
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters())
    assert module.nonfinite._skip and list(module.nonfinite._tasks) == ["count"]


def test_drop_task_trains_the_others_and_never_touches_the_nan_outputs(
    modules: dict[str, Any],
) -> None:
    """The count head's outputs are NaN (``0 · NaN`` would be NaN in every gradient upstream):
    the step trains the other tasks with finite gradients, the count head gets zero ones."""
    module = modules["drop_task"]
    module.zero_grad(set_to_none=True)
    head = module.net.heads["count"]
    handle = head.register_forward_hook(lambda m, i, out: out * math.nan)
    try:
        loss = module.training_step(batch_of(4), 0)
    finally:
        handle.remove()
    assert loss is not None and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    assert all(float(p.grad.abs().sum()) == 0.0 for p in head.parameters())
    for task in ("segmentation", "dominant_color"):
        assert any(float(p.grad.abs().sum()) > 0 for p in module.net.heads[task].parameters())
    assert float(module.weighting.log_vars.grad[module.weighting.index["count"]]) == 0.0
    assert module.nonfinite._tasks == {"count": None} and not module.nonfinite._skip


# ------------------------------------------------------------------------------ the pieces
def test_the_policy_is_validated() -> None:
    assert NonFinitePolicy.parse(None) == NonFinitePolicy("skip_step", 5)
    assert NonFinitePolicy.parse({"policy": "drop_task"}).policy == "drop_task"
    for bad, key in (
        ({"policy": "ignore"}, "model.nonfinite_loss.policy='ignore'"),
        ({"max_consecutive": 0}, "model.nonfinite_loss.max_consecutive=0"),
        ({"max_consecutive": True}, "model.nonfinite_loss.max_consecutive=True"),
        ({"polcy": "skip_step"}, "unknown keys ['polcy']"),
    ):
        with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
            NonFinitePolicy.parse(bad)


def test_check_losses_agrees_over_ranks() -> None:
    tasks = ["a", "b", "c"]
    nan, one = torch.tensor(math.nan), torch.tensor(1.0)
    assert check_losses({"a": one, "b": torch.tensor(math.inf)}, tasks).bad == ("b",)
    assert not check_losses({"a": nan}, tasks).trainable
    # two ranks: a NaN of b on the other rank, a labelled only here
    other = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    check = check_losses({"a": one, "b": one}, tasks, lambda t: t + other)
    assert check.bad == ("b",) and check.trainable
    check = check_losses({"b": one}, tasks, lambda t: t + other)
    assert check.bad == ("b",) and not check.trainable


def test_the_guard_drops_gradients_restores_state_and_checks_weights() -> None:
    """Without a trainer: a window with a reported NaN loss ends with no gradient and the
    balancer and buffers restored; a NaN gradient alone skips too; non-finite weights raise."""
    module = nn.Module()
    module.net = nn.BatchNorm1d(2)
    module.weighting = nn.Module()
    module.weighting.register_buffer("state", torch.zeros(2))
    module.log = lambda *args, **kwargs: None
    parameter = module.net.weight
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    trainer = SimpleNamespace(
        accumulate_grad_batches=1, global_step=4, is_global_zero=True, precision_plugin=None
    )
    guard = NonFiniteGuard(NonFinitePolicy("skip_step", 2))
    guard.on_train_batch_start(trainer, module, None, 0)
    module.weighting.state.add_(1.0)
    module.net.running_mean.fill_(math.nan)
    parameter.grad = torch.ones(2)
    guard.report_losses(4, ["b"], {"b": math.nan}, skip=True)
    assert guard.skips_step(trainer, module, optimizer)
    assert parameter.grad is None and guard.steps == 1
    assert torch.equal(module.weighting.state, torch.zeros(2))
    assert torch.equal(module.net.running_mean, torch.zeros(2))
    # finite losses, a NaN gradient: the second bad step in a row stops
    guard.on_train_batch_start(trainer, module, None, 1)
    parameter.grad = torch.tensor([1.0, math.inf])
    with pytest.raises(NonFiniteError, match=r"2 training steps in a row \(4 to 4\)"):
        guard.skips_step(trainer, module, optimizer)
    guard.on_train_batch_start(trainer, module, None, 2)
    parameter.grad = torch.ones(2)
    assert not guard.skips_step(trainer, module, optimizer)  # a good step: the streak ends
    assert guard.consecutive == 0 and parameter.grad is not None
    assert guard.state_dict() == {"steps": 2, "consecutive": 0}
    guard.on_train_end(trainer, module)  # all finite
    with torch.no_grad():
        parameter[1] = math.nan
    with pytest.raises(NonFiniteError, match=r"net\.weight \(1 of 2 values\)"):
        guard.on_test_start(trainer, module)


# ---------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_ranks_agree_on_a_nan_of_one_rank(tmp_path: Path) -> None:
    """A NaN loss on rank 1 only: both ranks skip the step (no rank waits for the other's
    backward), the run finishes; NaN from then on stops both ranks with the error."""
    inject = "+callbacks.inject._target_=tests.test_nonfinite.InjectNaN"
    output = run_ddp_sim(
        tmp_path / "once",
        "weighting=famo",
        inject,
        "+callbacks.inject.loss_at=[1]",
        "+callbacks.inject.rank=1",
    )
    assert "non-finite loss at step 1: task 'count'" in output
    assert max(logged(tmp_path / "once", "train/nonfinite_steps").values()) == 1.0
    fast = [o for o in FAST if not o.startswith("trainer.accelerator")]
    command = [sys.executable, "-m", "lightning_mtl.train", "trainer=ddp_sim", *fast]
    command += ["weighting=upgrad", inject, "+callbacks.inject.from_batch=1"]
    command += ["+callbacks.inject.rank=1", "model.nonfinite_loss.max_consecutive=2"]
    result = subprocess.run(
        [*command, f"hydra.run.dir={tmp_path / 'stops'}"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "NonFiniteError" in result.stderr and "2 training steps in a row" in result.stderr
