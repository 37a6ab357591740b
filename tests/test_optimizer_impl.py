"""The optimizer's implementation (``model.optimizer_impl``): what each setting picks, that
fused, foreach and single-tensor updates agree, that a checkpoint resumes under another
implementation, and the errors for choices torch cannot run. Tiny modules on the CPU."""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from lightning_mtl.errors import ConfigError
from lightning_mtl.optim import (
    build_optimizer,
    fused_conflict,
    implementation_of,
    implementation_options,
)

ADAMW = functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1)


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def groups_of(net: nn.Module) -> list[dict[str, Any]]:
    """Two groups, as the module builds them (a name, an own weight decay)."""
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    return [
        {"params": weights, "name": "w"},
        {"params": biases, "name": "b", "weight_decay": 0.0},
    ]


def train(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(5, 6, generator=generator)
        y = torch.randn(5, 3, generator=generator)
        nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def built(make: Any, impl: str, net: nn.Module | None = None) -> torch.optim.Optimizer:
    return build_optimizer(make, groups_of(net or tiny()), impl)


# ------------------------------------------------------------------------------------ choice
@pytest.mark.parametrize(
    ("make", "impl", "expected"),
    [
        (ADAMW, "auto", "fused"),  # torch has a fused CPU AdamW
        (ADAMW, "fused", "fused"),
        (ADAMW, "foreach", "foreach"),
        (ADAMW, "single", "single"),
        (functools.partial(torch.optim.Adam, lr=0.01), "auto", "fused"),
        (functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9), "auto", "fused"),
        # no fused RMSprop, and torch does not default to foreach on the CPU
        (functools.partial(torch.optim.RMSprop, lr=0.01), "auto", "single"),
        (functools.partial(torch.optim.RMSprop, lr=0.01), "foreach", "foreach"),
        # a fused:/foreach: under model.optimizer wins over model.optimizer_impl
        (functools.partial(torch.optim.AdamW, lr=0.01, foreach=True), "auto", "foreach"),
        (functools.partial(torch.optim.AdamW, lr=0.01, fused=False), "fused", "single"),
    ],
)
def test_each_setting_picks_its_implementation(make: Any, impl: str, expected: str) -> None:
    optimizer = built(make, impl)
    assert implementation_of(optimizer) == expected
    fused = optimizer.defaults.get("fused")
    assert bool(fused) == (expected == "fused")
    assert all(
        bool(group.get("fused")) == (expected == "fused") for group in optimizer.param_groups
    )


def test_auto_falls_back_where_torch_has_no_fused_kernel() -> None:
    """Complex parameters (no fused kernel) and the meta device (in no device list): auto gives
    the single-tensor loop, not an error; an optimizer with neither argument gets none."""
    lbfgs = functools.partial(torch.optim.LBFGS, lr=0.01)
    assert implementation_options(lbfgs, list(tiny().parameters()), "auto") == {}
    assert implementation_options(lbfgs, list(tiny().parameters()), "single") == {}
    complex_net = nn.Linear(3, 3, dtype=torch.complex64)
    assert implementation_options(ADAMW, list(complex_net.parameters())) == {
        "fused": False,
        "foreach": False,
    }
    meta = nn.Linear(3, 3, device="meta")
    assert implementation_of(build_optimizer(ADAMW, [{"params": list(meta.parameters())}])) == (
        "single"
    )


def test_auto_leaves_fused_out_under_fp16_clipping() -> None:
    """Lightning refuses to clip the gradients of an optimizer that unscales them itself."""
    clipping = SimpleNamespace(
        gradient_clip_val=1.0, precision_plugin=SimpleNamespace(scaler=object())
    )
    reason = fused_conflict(clipping)
    assert reason is not None and "trainer.gradient_clip_val" in reason
    assert fused_conflict(SimpleNamespace(gradient_clip_val=None, precision_plugin=None)) is None
    no_scaler = SimpleNamespace(gradient_clip_val=1.0, precision_plugin=SimpleNamespace())
    assert fused_conflict(no_scaler) is None and fused_conflict(None) is None
    params = list(tiny().parameters())
    assert implementation_options(ADAMW, params, "auto", reason) == {
        "fused": False,
        "foreach": False,
    }
    with pytest.raises(ConfigError, match=r"model\.optimizer_impl=fused: .*gradient_clip_val"):
        implementation_options(ADAMW, params, "fused", reason)


# ------------------------------------------------------------------------------ same update
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_fused_and_foreach_adamw_match_the_single_tensor_update(impl: str) -> None:
    nets = {name: tiny() for name in ("single", impl)}
    for name, net in nets.items():
        train(net, built(ADAMW, name, net), steps=6)
    reference = dict(nets["single"].named_parameters())
    moved = [(p - tiny().state_dict()[n]).abs().max() for n, p in reference.items()]
    assert min(moved) > 1e-3  # the steps did move every tensor
    for name, param in nets[impl].named_parameters():
        torch.testing.assert_close(param, reference[name], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(("before", "after"), [("single", "fused"), ("fused", "single")])
def test_a_checkpoint_resumes_under_another_implementation(before: str, after: str) -> None:
    """3 steps in one implementation, its state loaded into an optimizer of the other, 3 more
    steps: the parameters of 6 uninterrupted single-tensor steps, and the resumed optimizer
    runs its own implementation (torch's load_state_dict alone would bring back the saved
    ``fused``/``foreach`` flags)."""
    straight = tiny()
    train(straight, built(ADAMW, "single", straight), steps=6)

    first = tiny()
    optimizer = built(ADAMW, before, first)
    train(first, optimizer, steps=3)
    saved = optimizer.state_dict()
    resumed = tiny()
    resumed.load_state_dict(first.state_dict())
    optimizer = built(ADAMW, after, resumed)
    optimizer.load_state_dict(saved)
    fused = after == "fused"
    assert all(group["fused"] is fused for group in optimizer.param_groups)
    assert all(group["foreach"] is False for group in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    for state in optimizer.state.values():
        assert state["step"].dtype == torch.float32 and state["step"].device.type == "cpu"
        assert float(state["step"]) == 3.0
    train(resumed, optimizer, steps=3, start=3)
    assert implementation_of(optimizer) == after
    for name, param in resumed.named_parameters():
        torch.testing.assert_close(
            param, dict(straight.named_parameters())[name], rtol=0, atol=1e-6
        )


# ----------------------------------------------------------------------------------- errors
def test_impossible_choices_are_refused_naming_the_key() -> None:
    params = list(tiny().parameters())
    with pytest.raises(ConfigError, match=r"model\.optimizer_impl='fast': accepted values: auto"):
        implementation_options(ADAMW, params, "fast")
    rmsprop = functools.partial(torch.optim.RMSprop, lr=0.01)
    with pytest.raises(ConfigError, match=r"model\.optimizer_impl=fused: .*RMSprop has no fused"):
        implementation_options(rmsprop, params, "fused")
    complex_params = list(nn.Linear(3, 3, dtype=torch.complex64).parameters())
    with pytest.raises(ConfigError, match=r"model\.optimizer_impl=fused: .*complex64"):
        implementation_options(ADAMW, complex_params, "fused")
    meta = list(nn.Linear(3, 3, device="meta").parameters())
    user_fused = functools.partial(torch.optim.AdamW, lr=0.01, fused=True)
    with pytest.raises(ConfigError, match=r"model\.optimizer\.fused=true: .*meta"):
        implementation_options(user_fused, meta, "auto")
    both = functools.partial(torch.optim.AdamW, lr=0.01, fused=True, foreach=True)
    with pytest.raises(ConfigError, match=r"model\.optimizer\.fused=true and .*foreach=true"):
        implementation_options(both, params, "auto")


def test_an_ignored_optimizer_impl_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    user = functools.partial(torch.optim.AdamW, lr=0.01, foreach=False)
    with caplog.at_level(logging.WARNING, logger="lightning_mtl.optim"):
        assert implementation_options(user, list(tiny().parameters()), "fused") == {}
    assert (
        "model.optimizer_impl=fused is ignored: model.optimizer sets foreach=False" in caplog.text
    )


def test_the_module_takes_optimizer_impl_and_checks_it_before_building() -> None:
    from lightning_mtl.module import MultiTaskModule

    tasks = {
        "colour": {
            "target": "dominant_color",
            "head": {"name": "classification", "num_classes": 6},
            "loss": {"name": "cross_entropy"},
            "metrics": ["accuracy"],
        }
    }
    backbone = {"name": "test_resnet", "pretrained": False}

    def module(impl: str, make: Any = ADAMW) -> MultiTaskModule:
        return MultiTaskModule(
            backbone=backbone, tasks=tasks, weighting={"name": "equal"}, optimizer=make,
            optimizer_impl=impl,
        )  # fmt: skip

    rmsprop = functools.partial(torch.optim.RMSprop, lr=0.01)
    with pytest.raises(ConfigError, match=r"model\.optimizer_impl=fused: .*RMSprop"):
        module("fused", rmsprop)
    model = module("foreach")
    assert model.hparams.optimizer_impl == "foreach"
    assert implementation_of(model.configure_optimizers()) == "foreach"
    model.hparams.optimizer_impl = "auto"
    assert implementation_of(model.configure_optimizers()) == "fused"
