"""The params-level Gram matrix from the ghost engine (``ghost_gram.py``): equal to J Jᵀ of the
explicit Jacobian on every kind of layer it reads or leaves to autograd, the same update as the
Jacobian path, and a safe fallback where it cannot be exact or would be slower."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from lightning_mtl.models.meeting import Meeting, MeetingPlace
from lightning_mtl.weighting import StepContext, build_weighting
from lightning_mtl.weighting.ghost_gram import GhostGram

TASKS = ["a", "b", "c"]


class Standardised(nn.Conv2d):
    """A weight-standardised convolution: its forward does not multiply by ``self.weight`` as
    stored, so the engine must leave it to autograd (exact types only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class Mixed(nn.Module):
    """Every case the engine meets: ghost convolutions (stride, dilation, bias or none), a
    grouped one, one called twice, one whose output is changed in place, a weight-standardised
    subclass, one with ``padding="same"``, token-wise linear layers (3-D input) with a frozen
    bias, and a loose parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.wide = nn.Conv2d(16, 48, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.twice = nn.Conv2d(48, 48, 1)
        self.edited = nn.Conv2d(48, 48, 1)
        self.standard = Standardised(48, 48, 1)
        self.same = nn.Conv2d(48, 48, 1, padding="same")
        self.tokens = nn.Linear(48, 128)
        self.out = nn.Linear(128, 48)
        self.out.bias.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(48))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.tanh(self.wide(x))
        x = self.twice(self.twice(self.grouped(x)))
        x = self.same(torch.relu(self.standard(x)))
        y = self.edited(x)
        y.mul_(0.5)  # in place after the module: its output's gradient is not the layer's
        tokens = y.flatten(2).transpose(1, 2)  # (B, H·W, C)
        return self.out(torch.nn.functional.gelu(self.tokens(tokens))) * self.scale


def place(net: nn.Module) -> MeetingPlace:
    return MeetingPlace("shared", tuple(TASKS), (net,))


def task_losses(z: torch.Tensor, dependent: bool = False) -> dict[str, torch.Tensor]:
    pooled = z.mean(1)
    losses = {t: ((pooled[:, 8 * i : 8 * i + 8] - i) ** 2).mean() for i, t in enumerate(TASKS)}
    if dependent:  # c's gradient is a's plus b's: G is singular
        losses["c"] = losses["a"] + losses["b"]
    return losses


def run_step(method, net, images, *, hook=True, scale=None, dependent=False):
    """One params-level step; returns (G, the parameters' gradient)."""
    if hook:
        method.prepare([place(net)])
    net.zero_grad()
    z = net(images)
    meeting = Meeting.of(place(net), [z], cut=True)
    context = StepContext(meetings=[meeting], grad_scale=scale)
    method(task_losses(meeting.leaves[0], dependent), context).loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
    return method.last_gram, torch.cat([g.flatten() for g in grads])


def explicit_gram(net, images, dependent=False) -> torch.Tensor:
    """J Jᵀ (float64) over the trainable parameters, one ordinary backward pass per task."""
    params = [p for p in net.parameters() if p.requires_grad]
    losses = task_losses(net(images), dependent)
    rows = []
    for t in TASKS:
        grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten()
                    for g, p in zip(grads, params, strict=True)
                ]
            ).double()
        )
    jacobian = torch.stack(rows)
    return jacobian @ jacobian.T


def engine(method) -> GhostGram:
    gram = method._gramians["shared"]
    assert isinstance(gram, GhostGram)
    return gram


def test_ghost_gram_equals_explicit_gram_on_every_layer_kind_and_gives_the_same_update(
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = torch.randn(4, 3, 4, 4)
    net = Mixed()
    reference = copy.deepcopy(net)
    method = build_weighting("upgrad", TASKS, level="params")
    with caplog.at_level(logging.INFO):
        gram, grads = run_step(method, net, images)
        run_step(method, net, images)
    # the source of G is said once per place and source
    assert caplog.text.count("the params-level G at 'shared' comes from the ghost products") == 1
    ghost = engine(method)
    assert ghost.used and ghost.verified and not ghost.disabled
    assert not any(m._forward_hooks for m in net.modules())  # unhooked once G is formed
    torch.testing.assert_close(gram, explicit_gram(reference, images), rtol=1e-5, atol=1e-9)
    # the ghost products replaced exactly the plain layers' trainable parameters: not the
    # grouped conv, the conv called twice, the one edited in place, the standardised one, the
    # "same"-padded one, BN, the loose scale nor the frozen bias
    replaced = [net.stem.weight, *net.wide.parameters(), *net.tokens.parameters(), net.out.weight]
    assert ghost.ghost_parameters == sum(p.numel() for p in replaced)

    # the same step through the explicit Jacobian (a plain loop, no hook): the same G and the
    # same update, which the Jacobian path puts into the parameters itself
    plain = build_weighting("upgrad", TASKS, level="params")
    other = copy.deepcopy(reference)
    gram_plain, grads_plain = run_step(plain, other, images, hook=False)
    assert "shared" not in plain._gramians
    torch.testing.assert_close(gram, gram_plain, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grads, grads_plain, rtol=1e-5, atol=1e-7)

    # a GradScaler's scale: the same G
    scaled = build_weighting("upgrad", TASKS, level="params")
    gram_scaled, _ = run_step(scaled, copy.deepcopy(reference), images, scale=1024.0)
    assert engine(scaled).used
    torch.testing.assert_close(gram_scaled, gram, rtol=1e-5, atol=1e-9)

    # update_every=2: a step that reuses the weights forms no G, so nothing is hooked for it
    every = build_weighting("upgrad", TASKS, level="params", update_every=2)
    every.prepare([place(net)], step=2)
    assert any(m._forward_hooks for m in net.modules())
    every.prepare([place(net)], step=3)  # no weights yet: this step computes them
    assert any(m._forward_hooks for m in net.modules())
    every.cached_weights.fill_(1.0)
    every.prepare([place(net)], step=3)
    assert not any(m._forward_hooks for m in net.modules())


@pytest.mark.parametrize("name", ["imtl_g", "modo"])
def test_exact_rules_and_cross_half_rules_read_the_same_matrices_as_from_the_jacobian(
    name: str,
) -> None:
    """IMTL-G reads a pseudo-inverse of a singular G (float64 ghost products); MoDo the
    cross-half Gram matrix J₁J₂ᵀ (2k ghost rows): both as from the explicit Jacobian."""
    images = torch.randn(4, 3, 4, 4)
    net = Mixed()
    reference = copy.deepcopy(net)
    method = build_weighting(name, TASKS, level="params")
    gram, grads = run_step(method, net, images, dependent=True)
    assert engine(method).used
    plain = build_weighting(name, TASKS, level="params")
    gram_plain, grads_plain = run_step(plain, reference, images, hook=False, dependent=True)
    torch.testing.assert_close(gram, gram_plain, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grads, grads_plain, rtol=1e-4, atol=1e-6)
    if name == "imtl_g":  # c = a + b: rank 2 up to the float32 gradients' round-off (≈1e-7
        # each, squared in float64 products), not float32 products' round-off read as rank
        eigenvalues = torch.linalg.eigvalsh(gram)
        assert abs(float(eigenvalues[0])) <= 1e-10 * float(eigenvalues[-1])


class Tied(nn.Module):
    """A weight used inside its module and again outside it: the forward hook sees only the
    first use, so the check of the step that first reads it must catch it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(64, 64)
        self.second = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.second(torch.tanh(self.first(x))))
        return torch.nn.functional.linear(h, self.second.weight)


def test_a_weight_used_outside_its_module_is_caught_when_it_enters_the_ghost_products(
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = torch.randn(4, 2, 64)
    net = Tied()
    method = build_weighting("mgda", TASKS, level="params")
    # the tied layer frozen (gradual unfreezing): the first check passes without it
    net.second.requires_grad_(False)
    gram, _ = run_step(method, net, images)
    ghost = engine(method)
    assert ghost.used and ghost.verified and not ghost.disabled
    assert ghost.ghost_parameters == sum(p.numel() for p in net.first.parameters())
    torch.testing.assert_close(gram, explicit_gram(net, images), rtol=1e-5, atol=1e-9)
    # unfrozen: new parameters enter the ghost products, so they are checked, and caught
    net.second.requires_grad_(True)
    with caplog.at_level(logging.WARNING):
        gram, _ = run_step(method, net, images)
    assert ghost.disabled and not ghost.used
    assert "disagrees with explicit gradients" in caplog.text
    torch.testing.assert_close(gram, explicit_gram(net, images), rtol=1e-5, atol=1e-9)
    # off for the rest of the run, also after the budget sent the place to torchjd's engine
    # and back: nothing is hooked, and no second warning
    method.jacobian_budget_mb = 0.0
    method.prepare([place(net)])
    assert not isinstance(method._gramians["shared"], GhostGram)
    method.jacobian_budget_mb = 1024.0
    method.prepare([place(net)])
    assert engine(method) is ghost
    assert not any(m._forward_hooks for m in net.modules())
    run_step(method, net, images, hook=False)
    assert not ghost.used and caplog.text.count("ghost Gram engine") == 1


def test_an_overflowing_step_is_not_read_as_a_disagreement_and_hooks_never_outlive_a_step() -> None:
    """A GradScaler's first scales often overflow fp16: the non-finite G goes to the step's
    guard unchecked, the engine stays on, and the next finite step is checked."""
    images = torch.randn(4, 3, 4, 4)
    net = Mixed()
    method = build_weighting("upgrad", TASKS, level="params")
    gram, _ = run_step(method, net, images, scale=float("inf"))  # an overflowing backward
    ghost = engine(method)
    assert not bool(gram.isfinite().all())
    assert not ghost.disabled and not ghost.verified
    gram, _ = run_step(method, net, images)
    assert ghost.used and ghost.verified and bool(gram.isfinite().all())

    # a step that ends early (a skipped step) or raises leaves no hook and no recorded tensor
    with pytest.raises(RuntimeError, match="interrupted"), method.hooked([place(net)]):
        net(images)
        assert ghost.active and ghost._calls
        raise RuntimeError("interrupted")
    assert not ghost.active and not ghost._calls
    assert not any(m._forward_hooks for m in net.modules())


class NoGradLinear(nn.Module):
    """A trainable linear layer run without grad (its output feeds a trainable scale): hooked,
    but nothing is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 32)
        self.scale = nn.Parameter(torch.ones(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.linear(x)
        return h * self.scale


def test_the_plan_leaves_steps_to_the_jacobian_where_ghost_products_would_cost_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    caplog.set_level(logging.INFO)
    # no layer the engine can read (a depthwise convolution; a layer run without grad): the
    # ghost path's extra backward pass would buy nothing
    for net, images in [
        (nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Flatten(2)), (4, 3, 4, 8)),
        (NoGradLinear(), (4, 2, 8)),
    ]:
        method = build_weighting("mgda", TASKS, level="params")
        x = torch.randn(images)
        gram, _ = run_step(method, net, x)
        assert not engine(method).used and not engine(method).disabled
        torch.testing.assert_close(gram, explicit_gram(net, x), rtol=1e-5, atol=1e-9)
    assert "comes from the explicit k×D Jacobian" in caplog.text
    assert "ghost products" not in caplog.text
    # a head that ghost products serve (2 positions) after a large stem that they do not
    # (512 positions): the products would save less than the extra backward pass costs
    stem_and_head = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Unflatten(1, (1, 64)),
        nn.Linear(64, 64),
    )
    method = build_weighting("mgda", TASKS, level="params")
    images = torch.randn(2, 3, 16, 16)
    gram, _ = run_step(method, stem_and_head, images)
    assert not engine(method).used and not engine(method).disabled
    torch.testing.assert_close(gram, explicit_gram(stem_and_head, images), rtol=1e-5, atol=1e-9)
    # 32×32 maps (8192 positions in the first conv, above MAX_POSITIONS): the Jacobian,
    # quietly, and the engine stays on
    conv = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 48, 3, padding=1))
    big = torch.randn(8, 3, 32, 32)
    method = build_weighting("mgda", TASKS, level="params")
    gram, _ = run_step(method, conv, big)
    assert not engine(method).used and not engine(method).disabled
    torch.testing.assert_close(gram, explicit_gram(conv, big), rtol=1e-4, atol=1e-9)


def test_mixed_precision_steps_are_served_within_bfloat16_round_off() -> None:
    images = torch.randn(4, 3, 4, 4)
    net = Mixed()
    reference = copy.deepcopy(net)
    method = build_weighting("upgrad", TASKS, level="params")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gram, _ = run_step(method, net, images)
    assert engine(method).used
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = explicit_gram(reference, images)
    torch.testing.assert_close(gram, expected, rtol=1e-2, atol=1e-6 * float(expected.max()))
