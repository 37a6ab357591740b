"""Gradient-based balancers: the combined gradient against torchjd and hand-computed cases,
heads' own gradients, levels, absent tasks, state round trips and fp16 scaling."""

from __future__ import annotations

import math

import pytest
import torch
from torchjd import aggregation as jd
from torchjd.linalg import QuadprogProjector

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.meeting import cut_meeting
from lightning_mtl.weighting import StepContext, build_weighting
from lightning_mtl.weighting.rule_step import step_generator_seed

TASKS = ["a", "b", "c"]


def step(
    method,
    jacobian,
    values=None,
    level_step=0,
    dtype=torch.float32,
    scale=None,
    drop=(),
    factor=1.0,
):
    """One step of ``method`` on linear losses ``Lᵢ = vᵢ + Jᵢ·z`` with an identity backbone.

    The backbone is ``z = θ`` (so representation and parameter gradients coincide); returns the
    backbone gradient (the combined direction), the gradient the "heads" side received and the
    weights.
    """
    k, n = jacobian.shape
    values = values if values is not None else [1.0 + i for i in range(k)]
    backbone = torch.nn.Module()
    backbone.theta = torch.nn.Parameter(torch.zeros(n))
    theta = backbone.theta
    z = (theta * 1.0).to(dtype)
    meeting = cut_meeting([z], [backbone], method.tasks)
    rep = meeting.leaves[0]
    losses = {
        t: values[i] + factor * (jacobian[i].to(dtype) * rep).sum().float()
        for i, t in enumerate(method.tasks)
        if t not in drop
    }
    context = StepContext(step=level_step, meetings=[meeting], grad_scale=scale)
    combined = method(losses, context)
    # as a GradScaler does: back-propagate the scaled loss, unscale the gradients
    (combined.loss * (scale or 1.0)).backward()
    heads = rep.grad if rep.grad is not None else torch.zeros_like(rep)
    return theta.grad / (scale or 1.0), heads.float() / (scale or 1.0), combined


def random_jacobian(k: int = 3, n: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(k, n, generator=generator)
    jacobian[1] -= 1.5 * jacobian[0]  # a conflicting pair
    return jacobian


# name, config arguments, the torchjd aggregator of the same rule on the explicit Jacobian
REFERENCES = [
    ("mgda", {}, lambda: jd.MGDA()),
    ("pcgrad", {}, lambda: jd.PCGrad()),
    ("cagrad", {"c": 0.4}, lambda: jd.CAGrad(c=0.4)),
    ("imtl_g", {}, lambda: jd.IMTLG()),
    ("aligned_mtl", {}, lambda: jd.AlignedMTL()),
    # ours project exactly (torchjd adds 1e-4·I by default: docs/torchjd_notes.md)
    ("upgrad", {}, lambda: jd.UPGrad(projector=QuadprogProjector(reg_eps=1e-10))),
    ("dualproj", {}, lambda: jd.DualProj(projector=QuadprogProjector(reg_eps=1e-10))),
    ("fairgrad", {"alpha": 1.0}, lambda: jd.FairGrad(alpha=1.0)),
    ("config", {}, lambda: jd.ConFIG()),
    ("nash_mtl", {}, lambda: jd.NashMTL(n_tasks=3)),
    ("gradvac", {"beta": 0.5}, lambda: jd.GradVac(beta=0.5)),
    ("graddrop", {}, lambda: jd.GradDrop()),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "reference"), REFERENCES, ids=[r[0] for r in REFERENCES]
)
@pytest.mark.parametrize("level", ["representation", "params"])
def test_combined_gradient_equals_torchjd_aggregation_of_the_jacobian(
    name, kwargs, reference, level
) -> None:
    if name == "graddrop" and level == "params":
        pytest.skip("graddrop is defined at the representation level only")
    method = build_weighting(name, TASKS, level=level, seed=7, **kwargs)
    aggregator = reference()
    for i in range(3):  # several steps: stateful rules (GradVac, Nash-MTL) carry state over
        jacobian = random_jacobian(seed=i)
        direction, heads, _ = step(method, jacobian, level_step=i)
        with torch.random.fork_rng():
            torch.manual_seed(step_generator_seed(7, i))  # the same draw as the step's
            # GradDrop draws in the gradients' dtype (float32); the Gram rules run in float64
            exact = jacobian if name == "graddrop" else jacobian.double()
            expected = aggregator(exact).float()
        torch.testing.assert_close(direction, expected, rtol=2e-3, atol=2e-4)
        # the heads side received every task's own gradient, unweighted
        torch.testing.assert_close(heads, jacobian.sum(0))


def test_mgda_pcgrad_and_friends_on_hand_computed_cases() -> None:
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    direction, _, combined = step(build_weighting("mgda", ["a", "b"]), orthogonal)
    # min ‖w₁g₁ + w₂g₂‖² = w₁² + 4w₂² on the simplex: w = (0.8, 0.2)
    assert [float(combined.weights[t]) for t in "ab"] == pytest.approx([0.8, 0.2], abs=1e-3)
    torch.testing.assert_close(direction, torch.tensor([0.8, 0.4]), atol=2e-3, rtol=0)

    conflicting = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    direction, _, combined = step(build_weighting("pcgrad", ["a", "b"]), conflicting)
    # g₁' = g₁ + ½g₂ = (½, ½), g₂' = g₂ + g₁ = (0, 1): d = (½, 3/2), weights (2, 3/2)
    torch.testing.assert_close(direction, torch.tensor([0.5, 1.5]))
    assert [float(combined.weights[t]) for t in "ab"] == pytest.approx([2.0, 1.5])

    jacobian = random_jacobian()
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    direction, _, _ = step(build_weighting("imtl_g", TASKS), jacobian)
    projections = units @ direction  # IMTL-G: equal projection on every unit gradient
    torch.testing.assert_close(projections, projections.mean().expand(3), rtol=1e-4, atol=1e-5)

    direction, _, _ = step(build_weighting("config", TASKS), jacobian)
    cosines = units @ direction / direction.norm()  # ConFIG: equal cosine with every task
    torch.testing.assert_close(cosines, cosines.mean().expand(3), rtol=1e-4, atol=1e-5)
    assert float(cosines.min()) > 0
    # ConFIG's length: the sum of the projections of the gradients on the direction
    norm = direction.norm()
    assert float(norm) == pytest.approx(float((jacobian @ direction).sum() / norm), rel=1e-4)

    for name, kwargs in [("nash_mtl", {"max_norm": 0.0}), ("fairgrad", {"alpha": 1.0})]:
        _, _, combined = step(build_weighting(name, TASKS, **kwargs), jacobian)
        w = torch.stack([combined.weights[t] for t in TASKS]).double()
        gram = jacobian.double() @ jacobian.double().T
        # the bargaining solution: each task's share of the update is 1/wᵢ, (G w)ᵢ = 1/wᵢ
        torch.testing.assert_close(gram @ w, 1.0 / w, rtol=2e-2, atol=1e-3)


def test_levels_that_a_rule_does_not_define_are_refused() -> None:
    for name in ("mgda_ub", "graddrop"):
        with pytest.raises(
            ConfigError, match=r"weighting.level='params'.*accepted: representation"
        ):
            build_weighting(name, TASKS, level="params")
    with pytest.raises(ConfigError, match=r"weighting.level='layer'.*representation, params"):
        build_weighting("upgrad", TASKS, level="layer")


def test_absent_task_gets_no_weight_and_keeps_its_state() -> None:
    jacobian = random_jacobian()
    for name in ("gradvac", "nash_mtl", "db_mtl", "gradnorm"):
        method = build_weighting(name, TASKS)
        step(method, jacobian)
        before = {k: v.clone() for k, v in method.state_dict().items()}
        direction, heads, combined = step(method, jacobian, level_step=1, drop=("b",))
        assert set(combined.weights) == {"a", "c"}, name
        assert torch.isfinite(direction).all() and torch.isfinite(heads).all(), name
        after = method.state_dict()
        for key, value in before.items():  # every per-task entry of b is untouched
            if value.ndim >= 1 and value.shape[0] == 3:
                torch.testing.assert_close(after[key][1], value[1], msg=f"{name}.{key}")
            if value.ndim == 2:
                torch.testing.assert_close(after[key][:, 1], value[:, 1], msg=f"{name}.{key}")
    # no local loss at all: a zero direction that still reaches the backbone (DDP needs it)
    direction, _, combined = step(build_weighting("upgrad", TASKS), jacobian, drop=TASKS)
    assert combined.weights == {} and float(direction.abs().sum()) == 0.0


STATEFUL = ["gradvac", "nash_mtl", "db_mtl", "gradnorm", "pcgrad", "graddrop", "mgda"]


@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_round_trip_continues_with_the_same_weights(name: str) -> None:
    first = build_weighting(name, TASKS, seed=3)
    for i in range(3):
        step(first, random_jacobian(seed=i), level_step=i)
    resumed = build_weighting(name, TASKS, seed=3)
    resumed.load_state_dict(first.state_dict())
    jacobian = random_jacobian(seed=9)
    a, _, wa = step(first, jacobian, level_step=3)
    b, _, wb = step(resumed, jacobian, level_step=3)
    torch.testing.assert_close(a, b)
    assert {k: float(v) for k, v in wa.weights.items()} == {
        k: float(v) for k, v in wb.weights.items()
    }


def test_db_mtl_weights_follow_the_formula() -> None:
    method = build_weighting("db_mtl", ["a", "b"], beta=0.5, beta_sigma=0.0, eps=0.0)
    jacobian = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    _, _, combined = step(method, jacobian, values=[2.0, 0.5])
    # n = ‖∇ log L‖ = (3/2, 1/0.5) = (1.5, 2); scale = max n / n = (4/3, 1); w = scale / L
    assert [float(combined.weights[t]) for t in "ab"] == pytest.approx([4 / 3 / 2, 1 / 0.5])
    _, _, combined = step(method, jacobian * 2, values=[2.0, 0.5], level_step=1)
    # running norms: n̄ = n + ½(n̄ − n) with n = (3, 4): (2.25, 3); w = (3/2.25)/2, 1/0.5
    assert [float(combined.weights[t]) for t in "ab"] == pytest.approx([3 / 2.25 / 2, 2.0])


def test_gradnorm_raises_the_weight_of_the_slower_task_and_keeps_the_sum() -> None:
    method = build_weighting("gradnorm", ["a", "b"], alpha=1.5)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05)
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # equal gradient norms
    step(method, jacobian, values=[4.0, 4.0])  # the initial losses
    for i in range(1, 20):  # task a trains fast (its loss halves), b does not
        optimizer.zero_grad()
        _, _, combined = step(method, jacobian, values=[2.0, 4.0], level_step=i)
        optimizer.step()
    w = combined.weights
    assert float(w["b"]) > 1.2 > 0.8 > float(w["a"])
    assert float(w["a"] + w["b"]) == pytest.approx(2.0, abs=1e-4)


def test_stch_is_equal_during_warmup_then_the_smooth_max_gradient() -> None:
    method = build_weighting("stch", ["a", "b"], mu=0.5, warmup_steps=2)
    for i in range(2):
        values = {"a": torch.tensor(2.0), "b": torch.tensor(1.0)}
        assert [float(v) for v in method(values, StepContext(step=i)).weights.values()] == [1, 1]
    values = {"a": torch.tensor(1.0), "b": torch.tensor(1.0)}
    weights = method(values, StepContext(step=2)).weights
    v = torch.tensor([math.log(1 / 2), math.log(1 / 1)])  # log L − log(nadir)
    soft = torch.softmax(0.5 * v / 0.5, dim=0)
    expected = 2 * soft * 0.5 / 1.0
    assert [float(weights[t]) for t in "ab"] == pytest.approx(expected.tolist(), rel=1e-5)
    assert float(weights["b"]) > float(weights["a"])  # the task furthest above its nadir leads


def test_fp16_scaled_gradients_do_not_underflow_and_overflow_skips_state() -> None:
    # gradients of about 1e-8 reach the fp16 representation: below fp16's smallest subnormal
    jacobian, factor = random_jacobian() * 1e-3, 1e-5
    method = build_weighting("upgrad", TASKS)
    reference, _, _ = step(method, jacobian, factor=factor)
    unscaled, _, _ = step(method, jacobian, dtype=torch.float16, factor=factor)
    assert float(unscaled.abs().max()) < 0.5 * float(reference.abs().max())  # lost to underflow
    direction, _, combined = step(
        method, jacobian, dtype=torch.float16, scale=2.0**12, factor=factor
    )
    assert all(torch.isfinite(w) for w in combined.weights.values())
    torch.testing.assert_close(direction, reference, rtol=2e-2, atol=1e-11)

    method = build_weighting("gradvac", TASKS)
    step(method, random_jacobian(), dtype=torch.float16, scale=2.0**8)
    before = method.targets.clone()
    big = random_jacobian() * 1e3  # at scale 2¹⁶ these overflow fp16 (max 65504)
    direction, _, combined = step(method, big, dtype=torch.float16, scale=2.0**16, level_step=1)
    assert all(math.isnan(float(w)) for w in combined.weights.values())
    assert torch.isnan(direction).all()  # the GradScaler sees inf/NaN and skips the step
    torch.testing.assert_close(method.targets, before)  # and the rule's state is untouched


def test_rules_run_with_blas_on_one_thread_and_the_limit_is_restored(monkeypatch) -> None:
    """NumPy's BLAS is held to one thread while a rule solves (its idle workers would otherwise
    spin through the rest of the step on the cores it needs), and given back afterwards."""
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    seen: list[list[int]] = []
    method = build_weighting("upgrad", TASKS)
    original = type(method).gram_weights

    def spy(self, *args, **kwargs):
        seen.append(blas_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(method), "gram_weights", spy)
    step(method, random_jacobian())
    assert seen and all(threads == [1] * len(before) for threads in seen), seen
    assert blas_threads() == before
