"""How a gradient step gets what its rule reads: G formed in float64, the params-level Jacobian
from one batched backward (and the cross-half Gram matrix), each head's gradient from one
backward pass through its own aliases, and weights reused between updates (update_every)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchjd import aggregation as jd

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.meeting import Meeting, MeetingPlace, cut_meeting, task_views
from lightning_mtl.weighting import StepContext, build_weighting
from tests.test_gradient_methods import TASKS, random_jacobian, step


def test_g_is_formed_in_float64_so_singular_gram_rules_keep_their_direction() -> None:
    # g3 = g1 + g2 (k=3, D=1000): a float32 G read its round-off as rank, IMTL-G then collapsed
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 1000, generator=generator)
    jacobian[2] = jacobian[0] + jacobian[1]
    direction, _, _ = step(build_weighting("imtl_g", TASKS), jacobian)
    expected = jd.IMTLG()(jacobian.double())
    assert float(expected.norm()) > 1.0
    torch.testing.assert_close(direction.double(), expected, rtol=1e-5, atol=1e-6)
    # k = 10 tasks, D = 7: G has rank 7; ConFIG's direction as torchjd's (it was exactly 0)
    tasks = [f"t{i}" for i in range(10)]
    jacobian = torch.randn(10, 7, generator=generator)
    method = build_weighting("config", tasks)
    direction, _, _ = step(method, jacobian)
    expected = jd.ConFIG()(jacobian.double())
    assert float(expected.norm()) > 0.1
    torch.testing.assert_close(direction.double(), expected, rtol=1e-5, atol=1e-6)
    assert method.last_gram.dtype == torch.float64


def test_update_every_reuses_the_weights_between_updates_at_both_levels() -> None:
    jacobian = random_jacobian()
    other = random_jacobian(seed=3)
    for level in ("representation", "params"):
        method = build_weighting("mgda", TASKS, level=level, update_every=3)
        _, _, first = step(method, jacobian, level_step=0)
        weights = torch.stack([first.weights[t] for t in TASKS])
        # steps 1 and 2 reuse step 0's weights on new gradients: d = Σ wᵢ gᵢ with the old w
        direction, heads, combined = step(method, other, level_step=1)
        torch.testing.assert_close(torch.stack([combined.weights[t] for t in TASKS]), weights)
        torch.testing.assert_close(direction, weights @ other, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(heads, other.sum(0), rtol=1e-5, atol=1e-6)  # heads: own grads
        # step 3 recomputes them: MGDA's weights of the new gradients
        _, _, fresh = step(method, other, level_step=3)
        reference = jd.MGDAWeighting()(other.double() @ other.double().T).float()
        got = torch.stack([fresh.weights[t] for t in TASKS])
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
        # a task never weighted yet gets the mean of the cached weights (same on every rank)
        method = build_weighting("mgda", TASKS, level=level, update_every=2)
        step(method, jacobian, level_step=0, drop=("c",))
        _, _, combined = step(method, jacobian, level_step=1)
        cached = method.cached_weights[:2].float()
        torch.testing.assert_close(combined.weights["c"], cached.mean())


def test_update_every_is_checked() -> None:
    with pytest.raises(ConfigError, match="update_every=0; expected an integer >= 1"):
        build_weighting("upgrad", TASKS, update_every=0)
    with pytest.raises(ConfigError, match="GradDrop: it has no weights to reuse"):
        build_weighting("graddrop", TASKS, update_every=2)
    with pytest.raises(ConfigError, match=r"weighting\.update_every applies to gradient-based"):
        build_weighting("famo", TASKS, update_every=2)
    with pytest.raises(ConfigError, match="jacobian_budget_mb=-1"):
        build_weighting("upgrad", TASKS, jacobian_budget_mb=-1)


def test_heads_reading_their_own_aliases_get_their_gradients_from_one_backward_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """40 image-level heads on the pooled vector: one backward pass for all their gradients,
    and G over the pooled vector only (the maps they do not read cost nothing)."""
    torch.manual_seed(0)
    tasks = [f"attr{i}" for i in range(40)]
    backbone = nn.Conv2d(3, 8, 3, padding=1)
    heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in tasks})
    images, labels = torch.randn(6, 3, 8, 8), torch.randint(0, 2, (6, 40)).float()
    maps = backbone(images)
    pooled = maps.mean((2, 3))
    meeting = cut_meeting([pooled, maps], [backbone], tasks)
    losses = {}
    for i, t in enumerate(tasks):
        read = task_views([meeting], t, [meeting.leaves[0]])[0]
        losses[t] = nn.functional.binary_cross_entropy_with_logits(
            heads[t](read).squeeze(1), labels[:, i]
        )
    calls = []
    original = torch.autograd.grad
    monkeypatch.setattr(
        torch.autograd, "grad", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    method = build_weighting("upgrad", tasks)
    combined = method(losses, StepContext(meetings=[meeting]))
    assert len(calls) == 1  # all 40 task gradients from one pass
    monkeypatch.setattr(torch.autograd, "grad", original)
    rows = torch.stack(
        [
            torch.autograd.grad(losses[t], meeting.leaves[0], retain_graph=True)[0].flatten()
            for t in tasks
        ]
    )
    torch.testing.assert_close(method.last_gram, rows.double() @ rows.double().T)
    combined.loss.backward(retain_graph=True)
    weights = torch.stack([combined.weights[t] for t in tasks])
    expected = torch.autograd.grad(pooled, backbone.weight, (weights @ rows).view_as(pooled))[0]
    torch.testing.assert_close(backbone.weight.grad, expected, rtol=1e-5, atol=1e-7)


class LinearBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_rules_reading_the_jacobian_or_the_cross_half_gram_get_them_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=generator)
    heads = torch.randn(3, 4, generator=generator)
    backbone = LinearBackbone()

    def task_losses(z: torch.Tensor) -> list[torch.Tensor]:
        return [((z @ heads[i]) - i).square().mean() for i in range(3)]

    def jacobian_of(rows: slice) -> torch.Tensor:
        z = backbone(x[rows])
        return torch.stack(
            [
                torch.autograd.grad(loss, backbone.weight, retain_graph=True)[0].flatten()
                for loss in task_losses(z)
            ]
        )

    # the two halves of the batch interleave: even and odd samples
    whole, first, second = (
        jacobian_of(slice(0, 6)),
        jacobian_of(slice(0, 6, 2)),
        jacobian_of(slice(1, 6, 2)),
    )
    seen = {}
    for name in ("modo", "excess_mtl"):
        method = build_weighting(name, TASKS, level="params")
        hook = "cross_gram_weights" if name == "modo" else "jacobian_weights"
        original = getattr(method, hook)

        def spy(*args, _original=original, _name=name):
            # J is the step's own buffer, which then holds Jᵀw: keep a copy
            seen[_name] = args[:2] if _name == "modo" else args[0].clone()
            return _original(*args)

        monkeypatch.setattr(method, hook, spy)
        backbone.zero_grad()
        z = backbone(x)
        meeting = Meeting.of(MeetingPlace("shared", tuple(TASKS), (backbone,)), [z], cut=True)
        losses = dict(zip(TASKS, task_losses(meeting.leaves[0]), strict=True))
        combined = method(losses, StepContext(meetings=[meeting]))
        combined.loss.backward()
        weights = torch.stack([combined.weights[t] for t in TASKS]).float()
        torch.testing.assert_close(
            backbone.weight.grad.flatten(), weights @ whole, rtol=1e-5, atol=1e-6
        )
    cross, gram = seen["modo"]
    torch.testing.assert_close(cross, first.double() @ second.double().T, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gram, whole.double() @ whole.double().T, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(seen["excess_mtl"], whole, rtol=1e-5, atol=1e-7)
