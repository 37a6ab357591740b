"""The params-level Gram matrix from torchjd's autogram engine: equal to J Jᵀ of the explicit
Jacobian, kept in step with freezing, harmless to batch-norm statistics, and robust to steps the
engine cannot serve."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from lightning_mtl.models.meeting import Meeting, MeetingPlace
from lightning_mtl.weighting import StepContext, build_weighting
from lightning_mtl.weighting.shared_gramian import SharedGramian

TASKS = ["a", "b", "c"]


def backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
    )


def place(net: nn.Module) -> MeetingPlace:
    """The one meeting place of these tests: the net's output, all tasks."""
    return MeetingPlace("shared", tuple(TASKS), (net,))


def gramian(method) -> SharedGramian:
    """The method's params-level Gram engine of that place (a blank one if never prepared)."""
    return method._gramians.get("shared") or SharedGramian()


def run_step(method, net, images, drop=(), scale=None, hook=True):
    """One params-level step on a conv-BN backbone; returns (G, backbone gradient, losses)."""
    if hook:
        method.prepare([place(net)])
    net.zero_grad()
    z = net(images)
    meeting = Meeting.of(place(net), [z], cut=True)
    rep = meeting.leaves[0]
    pooled = rep.mean((2, 3))
    losses = {
        t: ((pooled[:, i] - i) ** 2).mean() + (i + 1) * rep[:, i + 3].square().mean()
        for i, t in enumerate(TASKS)
        if t not in drop
    }
    context = StepContext(meetings=[meeting], grad_scale=scale)
    combined = method(losses, context)
    combined.loss.backward()
    grads = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
            for p in net.parameters()
        ]
    )
    return method.last_gram, grads, losses


def explicit_gram(net, images, drop=()):
    """J Jᵀ over the trainable parameters, from one ordinary backward pass per task."""
    z = net(images)
    pooled = z.mean((2, 3))
    params = [p for p in net.parameters() if p.requires_grad]
    gram = torch.zeros(len(TASKS), len(TASKS), dtype=torch.float64)
    rows = {}
    for i, t in enumerate(TASKS):
        if t in drop:
            continue
        loss = ((pooled[:, i] - i) ** 2).mean() + (i + 1) * z[:, i + 3].square().mean()
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows[i] = torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).flatten()
                for g, p in zip(grads, params, strict=True)
            ]
        )
    for i, a in rows.items():
        for j, b in rows.items():
            gram[i, j] = a.double() @ b.double()
    return gram


def test_engine_gram_equals_explicit_gram_and_batch_norm_statistics_are_untouched() -> None:
    net, reference = backbone(), backbone()
    images = torch.randn(4, 3, 8, 8)
    method = build_weighting("upgrad", TASKS, level="params", jacobian_budget_mb=0)
    gram, grads, _ = run_step(method, net, images)
    assert gramian(method).used  # the engine, not the k×D Jacobian, produced G
    assert all(not m._forward_hooks for m in net.modules())  # unhooked once G is formed
    expected = explicit_gram(reference, images)
    torch.testing.assert_close(gram, expected, rtol=1e-4, atol=1e-7)
    # one training forward each: the engine's backward pass did not touch the running stats
    for a, b in zip(net.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(a, b)

    # the same step without the engine (the explicit Jacobian) gives the same gradient
    plain = build_weighting("upgrad", TASKS, level="params", jacobian_budget_mb=0)
    other = backbone()
    gram_plain, grads_plain, _ = run_step(plain, other, images, hook=False)  # a plain loop
    assert not gramian(plain).used
    torch.testing.assert_close(gram, gram_plain, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads, grads_plain, rtol=1e-4, atol=1e-6)

    # within the Jacobian budget (the default) a prepared step hooks the ghost engine
    # (ghost_gram.py, tested in test_ghost_gram.py), whose plan leaves these 8×8 maps to the
    # Jacobian (one batched backward, Jᵀw put into the parameters): the same G and update again
    ghost = build_weighting("upgrad", TASKS, level="params")
    third = backbone()
    gram_ghost, grads_ghost, _ = run_step(ghost, third, images)
    assert type(gramian(ghost)).__name__ == "GhostGram" and not gramian(ghost).used
    assert not any(m._forward_hooks for m in third.modules())
    torch.testing.assert_close(gram, gram_ghost, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads, grads_ghost, rtol=1e-4, atol=1e-6)


def test_engine_follows_freezing_absent_tasks_and_scaled_fp16_style_steps() -> None:
    net = backbone()
    images = torch.randn(4, 3, 8, 8)
    method = build_weighting("mgda", TASKS, level="params", jacobian_budget_mb=0)
    run_step(method, net, images)

    for p in net[0].parameters():  # freeze the first conv: G is over the rest only
        p.requires_grad_(False)
    gram, _, _ = run_step(method, net, images, drop=("b",))
    assert gramian(method).used
    reference = copy.deepcopy(net)
    torch.testing.assert_close(
        gram, explicit_gram(reference, images, drop=("b",)), rtol=1e-4, atol=1e-7
    )
    assert float(gram[1].abs().sum()) == 0.0

    # a step where no task is labelled, then a scaled step: both fine
    run_step(method, net, images, drop=tuple(TASKS))
    gram, _, _ = run_step(method, net, images, scale=1024.0)
    reference = copy.deepcopy(net)
    torch.testing.assert_close(gram, explicit_gram(reference, images), rtol=1e-4, atol=1e-7)


def test_stray_forward_falls_back_to_the_jacobian_with_one_warning_and_unhook_removes_hooks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = backbone()
    images = torch.randn(4, 3, 8, 8)
    method = build_weighting("upgrad", TASKS, level="params", jacobian_budget_mb=0)
    reference = copy.deepcopy(net)
    method.prepare([place(net)])
    net(images).sum()  # a hooked forward that the step does not differentiate
    with caplog.at_level(logging.WARNING):
        gram, _, _ = run_step(method, net, images, hook=False)
    assert "cannot serve this backbone" in caplog.text and not gramian(method).used
    torch.testing.assert_close(gram, explicit_gram(reference, images), rtol=1e-4, atol=1e-7)
    assert all(not m._forward_hooks for m in net.modules())
    copy.deepcopy(net)  # between steps the backbone is a plain module
    gram, _, _ = run_step(method, net, images)  # the engine stays off for the rest of the run
    assert gramian(method).disabled and not gramian(method).used
    assert caplog.text.count("cannot serve this backbone") == 1

    method = build_weighting("upgrad", TASKS, level="params", jacobian_budget_mb=0)
    method.prepare([place(net)])
    method.prepare(None)
    assert not gramian(method).active
    assert all(not m._forward_hooks for m in net.modules())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: the Jacobian path
        method.prepare([place(net)])
    assert not gramian(method).active
    # DDP (world_size > 1) never hooks: the Jacobian is all-reduced there
    method.prepare([place(net)], world_size=2)
    assert all(not m._forward_hooks for m in net.modules())


class ForeignWeight(nn.Module):
    """Uses a child's weight outside that child's forward: the engine's module hooks miss it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Conv2d(3, 6, 3, padding=1)
        self.second = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.tanh(self.first(x)), self.second.weight)


def test_a_backbone_the_engine_cannot_see_whole_is_caught_by_the_first_step_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net, reference = ForeignWeight(), ForeignWeight()
    images = torch.randn(4, 3, 8, 8)
    method = build_weighting("upgrad", TASKS, level="params", jacobian_budget_mb=0)
    with caplog.at_level(logging.WARNING):
        gram, _, _ = run_step(method, net, images)
    assert gramian(method).disabled and "disagrees with explicit gradients" in caplog.text
    torch.testing.assert_close(gram, explicit_gram(reference, images), rtol=1e-4, atol=1e-7)
    good = build_weighting("upgrad", TASKS, level="params", jacobian_budget_mb=0)
    run_step(good, backbone(), images)
    assert gramian(good).verified and gramian(good).used  # a plain CNN passes the check
