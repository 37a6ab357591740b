"""Corners of the loss-reading balancers: one task, zero, negative and non-finite losses, and a
task absent for a while; FAMO against its official update, STCH against autograd of its
scalarisation in both λ/μ conventions. Pure tensor-level tests."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from omegaconf import OmegaConf

from lightning_mtl.errors import ConfigError
from lightning_mtl.utils.setup import CONFIG_DIR
from lightning_mtl.weighting import StepContext, build_weighting

TASKS = ["a", "b", "c"]
LOSS_BASED = ["equal", "static", "rlw", "uncertainty", "imtl_l", "dwa", "famo", "gls", "stch"]
BOUNDED = ["uncertainty", "imtl_l", "dwa", "famo", "gls", "stch"]  # db_mtl: tested apart
OPTIONS = {
    "static": {"weights": {"a": 2.0, "b": 0.5, "c": 1.0}},
    "rlw": {"seed": 1},
    "stch": {"warmup_steps": 2},
    "famo": {"lr": 0.1},
}
NAN, INF = float("nan"), float("inf")


def make(name: str, tasks: list[str] = TASKS, **extra: object):
    return build_weighting(name, tasks, **{**OPTIONS.get(name, {}), **extra})


def trajectory(n: int = 8) -> list[dict[str, float]]:
    """Losses falling at different rates."""
    return [{"a": 2.0 * 0.8**i, "b": 1.0 * 0.9**i + 0.1, "c": 3.0 * 0.95**i} for i in range(n)]


def run(
    method, steps: list[dict[str, float] | None], per_epoch: int = 2, start: int = 0
) -> list[dict]:
    """Each step's weights, the steps numbered from ``start`` (``None``: a step left out,
    keeping the step and epoch numbers); learned weights take an SGD step."""
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1) if list(method.parameters()) else None
    seen = []
    for i, values in enumerate(steps, start):
        if values is None:
            continue
        losses = {t: torch.tensor(v) for t, v in values.items()}
        result = method(losses, StepContext(step=i, epoch=i // per_epoch))
        for task, weight in result.weights.items():
            assert torch.isfinite(weight), (type(method).__name__, i, task, weight)
        if optimizer is not None:
            optimizer.zero_grad()
            result.loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in method.parameters())
            optimizer.step()
        seen.append({t: float(w) for t, w in result.weights.items()})
    return seen


def assert_same_state(one, two) -> None:
    first, second = one.state_dict(), two.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# ----------------------------------------------------------------------------- one task
@pytest.mark.parametrize("name", LOSS_BASED)
def test_one_task_present(name: str) -> None:
    steps = [{"a": 2.0 * 0.5**i} for i in range(6)]
    weights = [w["a"] for w in run(make(name), steps)]
    last = steps[-1]["a"]
    expected = {
        "equal": 1.0,
        "static": 2.0,
        "rlw": 1.0,
        "famo": 1.0,  # c·1/d with c = d
        "gls": 1.0,  # G/(1·d) with G = d
        "stch": 3 * (1 / 3) / (last + 1e-8),  # k·softmax(one)·λ/d
        "uncertainty": None,
        "imtl_l": None,
        "dwa": None,
    }[name]
    if expected is not None:
        assert weights[-1] == pytest.approx(expected, rel=1e-6)
    if name == "dwa":  # epochs 0,1 means (1.5, 0.375): r = 0.25 for a, 1 for the unseen b, c
        assert weights[:4] == [1.0] * 4
        ratio = torch.tensor([0.375 / 1.5, 1.0, 1.0], dtype=torch.float64)
        assert weights[4] == pytest.approx(float(3 * torch.softmax(ratio / 2, 0)[0]), rel=1e-6)


# ----------------------------------------------------------------------------- zero losses
@pytest.mark.parametrize("name", LOSS_BASED)
def test_zero_losses_give_finite_weights(name: str) -> None:
    steps = [{"a": 0.0, "b": 0.0, "c": 0.0}] * 5 + [{"a": 0.0, "b": 1.0, "c": 0.5}] * 2
    weights = run(make(name), steps)
    if name in {"famo", "gls"}:  # every distance ε: the weights of equal distances, 1/k
        assert list(weights[0].values()) == pytest.approx([1 / 3] * 3)
    if name == "stch":  # d = 0 everywhere, nadir 0: v = 0, w = k·(1/k)·(1/k)/ε
        assert weights[2]["a"] == pytest.approx(1 / (3 * 1e-8), rel=1e-6)


def test_uncertainty_and_imtl_l_at_a_zero_distance_follow_their_objective() -> None:
    """L = m: the optimum of sᵢ is at infinity; the gradient is the paper's, finite."""
    uncertainty = make("uncertainty")
    uncertainty({t: torch.tensor(0.0) for t in TASKS}).loss.backward()
    assert uncertainty.log_vars.grad.tolist() == [0.5] * 3  # ∂/∂s (½e^{-s}·0 + ½s)
    imtl = make("imtl_l")
    imtl({t: torch.tensor(0.0) for t in TASKS}).loss.backward()
    assert imtl.log_scales.grad.tolist() == [-1.0] * 3  # ∂/∂s (e^{s}·0 − s)


# ----------------------------------------------------------------------------- negative losses
@pytest.mark.parametrize("name", BOUNDED)
def test_a_loss_below_its_bound_is_refused_with_what_to_set(name: str) -> None:
    method = make(name, warmup_steps=0) if name == "stch" else make(name)
    with pytest.raises(ValueError) as error:
        run(method, [{"a": 1.0, "b": -0.5, "c": 2.0}] * 5)
    message = str(error.value)
    for part in (f"weighting={name}", "'b'", "-0.5", "bound 0", "weighting.min_losses"):
        assert part in message, (part, message)


@pytest.mark.parametrize("name", ["equal", "static", "rlw"])
def test_methods_that_read_no_value_weight_negative_losses_as_usual(name: str) -> None:
    positive = run(make(name), [{"a": 1.0, "b": 0.5, "c": 2.0}] * 3)
    negative = run(make(name), [{"a": 1.0, "b": -0.5, "c": -2.0}] * 3)
    assert positive == negative


@pytest.mark.parametrize("name", BOUNDED)
def test_min_losses_shift_every_method_onto_the_distance(name: str) -> None:
    """With bounds m, the weights are those of bounds 0 on the distances L − m."""
    bounds = {"a": -1.0, "b": 0.5, "c": -0.25}
    steps = trajectory()
    shifted_down = [{t: v + bounds[t] for t, v in s.items()} for s in steps]
    # b at exactly its bound for one step: distance 0, legal
    shifted_down[3]["b"], steps[3]["b"] = 0.5, 0.0
    with_bounds = run(make(name, min_losses=bounds), shifted_down)
    plain = run(make(name), steps)
    for got, want in zip(with_bounds, plain, strict=True):
        assert got == pytest.approx(want, rel=1e-5)


def test_famo_weights_with_a_shift_equal_the_hand_computation() -> None:
    method = make("famo", ["a", "b"], min_losses=[-0.5, 1.0], weight_decay=0.0)
    first = method({"a": torch.tensor(0.5), "b": torch.tensor(3.0)}, StepContext(step=0))
    # d = (1, 2) (+ε); z = (½, ½): c = 1/(½/1 + ½/2) = 4/3, w = c·z/d = (2/3, 1/3)
    assert [float(w) for w in first.weights.values()] == pytest.approx([2 / 3, 1 / 3])
    second = method({"a": torch.tensor(0.0), "b": torch.tensor(3.0)}, StepContext(step=1))
    # δ = (log 1 − log ½, 0): the gradient ½(δ − ½Σδ) = (+, −); Adam's first step: −lr·sign
    assert method.logits.tolist() == pytest.approx([-0.1, 0.1], rel=1e-6)
    z = torch.softmax(torch.tensor([-0.1, 0.1], dtype=torch.float64), 0)
    d = torch.tensor([0.5, 2.0], dtype=torch.float64) + 1e-8
    expected = z / d / (z / d).sum()
    assert [float(w) for w in second.weights.values()] == pytest.approx(expected.tolist())


def test_uncertainty_shift_moves_the_optimum_not_the_network_gradient() -> None:
    values = {
        "a": torch.tensor(1.0, requires_grad=True),
        "b": torch.tensor(-2.0, requires_grad=True),
    }
    method = make("uncertainty", ["a", "b"], min_losses={"b": -3.0})
    with torch.no_grad():
        method.log_vars.copy_(torch.tensor([0.5, -0.5]))
    result = method(values)
    s = [0.5, -0.5]
    expected = 0.5 * math.exp(-s[0]) * 1.0 + 0.25 + 0.5 * math.exp(-s[1]) * (-2.0 + 3.0) - 0.25
    assert float(result.loss.detach()) == pytest.approx(expected, rel=1e-6)
    result.loss.backward()
    assert float(values["b"].grad) == pytest.approx(0.5 * math.exp(0.5))  # ½e^{-s}: no shift
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    fixed = {"a": torch.tensor(0.5), "b": torch.tensor(-2.0)}
    for _ in range(300):
        optimizer.zero_grad()
        method(fixed).loss.backward()
        optimizer.step()
    assert method.log_vars.exp().tolist() == pytest.approx([0.5, 1.0], rel=1e-3)  # e^s = L − m


# ----------------------------------------------------------------------------- non-finite
#: the methods with state or learned weights to protect (equal and static read no value)
CHECKED = [name for name in LOSS_BASED if name not in ("equal", "static")]


def test_equal_and_static_weigh_a_non_finite_loss_as_any_other() -> None:
    for name, weight in (("equal", 1.0), ("static", 0.5)):
        result = make(name)({t: torch.tensor(NAN if t == "b" else 1.0) for t in TASKS})
        assert float(result.weights["b"]) == weight and math.isnan(float(result.loss))


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("name", CHECKED)
def test_a_non_finite_loss_weighs_as_if_absent_and_leaves_the_state_alone(
    name: str, bad: float, caplog: pytest.LogCaptureFixture
) -> None:
    steps = trajectory()
    poisoned = [dict(s) for s in steps]
    absent = [dict(s) for s in steps]
    for j in (1, 5):  # in warm-up (STCH, DWA's first epochs) and after
        poisoned[j]["b"] = bad
        del absent[j]["b"]
    one, two = make(name), make(name)
    with caplog.at_level(logging.WARNING):
        got = run(one, poisoned)
    want = run(two, absent)
    for j, (g, w) in enumerate(zip(got, want, strict=True)):
        if j in (1, 5):
            assert g.pop("b") == 0.0
        assert g == w, j
    assert_same_state(one, two)
    warnings = [r for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert len(warnings) == 1 and "'b'" in warnings[0].getMessage()


@pytest.mark.parametrize("name", CHECKED)
def test_a_step_with_every_loss_non_finite_is_a_step_left_out(name: str) -> None:
    steps = trajectory()
    poisoned: list[dict[str, float] | None] = [dict(s) for s in steps]
    poisoned[2] = {t: NAN for t in TASKS}
    skipped: list[dict[str, float] | None] = [dict(s) for s in steps]
    skipped[2] = None
    one, two = make(name), make(name)
    got, want = run(one, poisoned), run(two, skipped)
    assert got.pop(2) == {t: 0.0 for t in TASKS}
    assert got == want
    assert_same_state(one, two)


def test_the_combined_loss_is_nan_and_the_learned_weight_of_that_task_gets_no_gradient() -> None:
    for name, parameter in (("uncertainty", "log_vars"), ("imtl_l", "log_scales")):
        method = make(name)
        result = method({"a": torch.tensor(3.0), "b": torch.tensor(NAN), "c": torch.tensor(2.0)})
        assert math.isnan(float(result.loss.detach()))
        result.loss.backward()
        grad = getattr(method, parameter).grad
        assert grad[1] == 0.0 and bool(torch.isfinite(grad).all()) and grad[0] != 0.0
    dwa = make("dwa")
    assert math.isnan(float(dwa({"a": torch.tensor(INF)}, StepContext()).loss))


def test_ddp_a_non_finite_global_loss_is_absent_on_every_rank() -> None:
    """A rank that saw b finite and one that did not label it agree with the rank that saw inf."""
    local = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}
    weights = {}
    for name in ("famo", "gls", "rlw", "dwa", "stch"):
        one = make(name)
        got = one(local, StepContext(step=0, global_losses=torch.tensor([1.0, INF, 3.0])))
        two = make(name)
        want = two(
            {"a": local["a"]}, StepContext(step=0, global_losses=torch.tensor([1.0, NAN, 3.0]))
        )
        assert float(got.weights.pop("b")) == 0.0
        assert math.isfinite(float(got.loss))  # b is finite on this rank: 0·L_b
        assert {t: float(w) for t, w in got.weights.items()} == {
            t: float(w) for t, w in want.weights.items()
        }
        assert_same_state(one, two)
        weights[name] = got.weights
    assert set(weights["gls"]) == {"a", "c"}  # c labelled on another rank


# ----------------------------------------------------------------------------- absent tasks
@pytest.mark.parametrize("name", LOSS_BASED)
def test_a_task_absent_for_several_steps_keeps_its_state_and_returns(name: str) -> None:
    steps = trajectory(10)
    for j in range(2, 7):
        del steps[j]["c"]
    method = make(name)
    run(method, steps[:2])
    before = {k: v.clone() for k, v in method.state_dict().items()}
    seen = run(method, steps[2:7], start=2)
    assert all("c" not in w for w in seen)
    after = method.state_dict()
    # not c's state: the last step's presence (FAMO) and the running epoch's sums (DWA: every
    # task's are reset when an epoch closes)
    skip = {"prev_present", "epoch_sum", "epoch_count"}
    for key, value in before.items():
        if value.ndim == 1 and value.shape[0] == 3 and key not in skip:
            assert torch.equal(after[key][2], value[2]), key
        if value.ndim == 2 and name != "dwa":
            assert torch.equal(after[key][:, 2], value[:, 2]), key
    if name == "dwa":  # its epochs closed while c was away: c's last mean is carried over
        mean = (steps[0]["c"] + steps[1]["c"]) / 2
        assert method.history[:, 2].tolist() == pytest.approx([mean, mean], rel=1e-6)
        assert method.history_known[:, 2].tolist() == [True, True]
    for key in ("logits", "adam_m", "adam_v", "adam_t", "prev_losses", "loss_sums", "loss_counts"):
        if key in before:
            assert torch.equal(after[key][2], before[key][2]), key
    back = run(method, steps[7:], start=7)
    assert all(set(w) == set(TASKS) for w in back)


def test_famo_absent_task_keeps_logit_moments_and_step_count_bit_identical() -> None:
    method = make("famo", weight_decay=0.01)
    steps = trajectory(9)
    run(method, steps[:3])
    kept = {k: getattr(method, k)[2].clone() for k in ("logits", "adam_m", "adam_v", "adam_t")}
    assert int(kept["adam_t"]) == 2 and float(kept["logits"]) != 0.0
    run(method, [{"a": s["a"], "b": s["b"]} for s in steps[3:7]], start=3)
    for key, value in kept.items():
        assert torch.equal(getattr(method, key)[2], value), key
    assert method.adam_t.tolist() == [6, 6, 2]  # a and b moved at steps 1..6, c at 1, 2
    run(method, steps[7:], start=7)  # c back at 7; in both of the compared steps at 8
    assert method.adam_t.tolist() == [8, 8, 3]


def test_famo_without_a_task_is_exactly_famo_on_the_problem_without_it() -> None:
    steps = [{"a": s["a"], "b": s["b"]} for s in trajectory(10)]
    three, two = make("famo", weight_decay=0.01), make("famo", ["a", "b"], weight_decay=0.01)
    assert run(three, steps) == run(two, steps)  # exact equality
    assert torch.equal(three.logits[:2], two.logits) and float(three.logits[2]) == 0.0


class ReferenceFAMO:
    """FAMO's update written from the paper with torch's own pieces: autograd through the
    softmax for the logits' gradient and ``torch.optim.Adam(weight_decay=γ)`` for the step."""

    def __init__(self, k: int, lr: float, gamma: float, bounds: list[float]) -> None:
        self.logits = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        self.adam = torch.optim.Adam([self.logits], lr=lr, weight_decay=gamma)
        self.bounds = torch.tensor(bounds, dtype=torch.float64)

    def gap(self, losses: list[float]) -> torch.Tensor:
        return torch.tensor(losses, dtype=torch.float64) - self.bounds + 1e-8

    def weights(self, losses: list[float]) -> list[float]:
        z = torch.softmax(self.logits.detach(), 0)
        d = self.gap(losses)
        return (z / d / (z / d).sum()).tolist()

    def update(self, before: list[float], after: list[float]) -> None:
        delta = self.gap(before).log() - self.gap(after).log()
        (grad,) = torch.autograd.grad(torch.softmax(self.logits, 0), self.logits, delta)
        self.logits.grad = grad
        self.adam.step()


def test_famo_follows_the_official_update_with_and_without_an_absent_task() -> None:
    f32 = [{t: float(torch.tensor(v)) for t, v in s.items()} for s in trajectory(12)]
    bounds = [-0.5, 0.0, 0.25]
    ours = make("famo", lr=0.05, weight_decay=0.01, min_losses=bounds)
    reference = ReferenceFAMO(3, 0.05, 0.01, bounds)
    for i, values in enumerate(run(ours, f32)):
        losses = [f32[i][t] for t in TASKS]
        if i:
            reference.update([f32[i - 1][t] for t in TASKS], losses)
        assert list(values.values()) == pytest.approx(reference.weights(losses), rel=1e-6)
    # c absent throughout: a and b follow the official FAMO of two tasks
    pair = [{"a": s["a"], "b": s["b"]} for s in f32]
    ours = make("famo", lr=0.05, weight_decay=0.01, min_losses=bounds)
    reference = ReferenceFAMO(2, 0.05, 0.01, bounds[:2])
    for i, values in enumerate(run(ours, pair)):
        if i:
            reference.update([pair[i - 1]["a"], pair[i - 1]["b"]], [pair[i]["a"], pair[i]["b"]])
        assert list(values.values()) == pytest.approx(
            reference.weights([pair[i]["a"], pair[i]["b"]]), rel=1e-6
        )


def test_famo_loads_checkpoints_with_one_step_count_and_saved_bounds() -> None:
    method = make("famo")
    run(method, trajectory(4))
    old = dict(method.state_dict())
    old["adam_t"] = torch.tensor(3)
    old["min_losses"] = torch.zeros(3, dtype=torch.float64)
    loaded = make("famo", min_losses=-1.0)
    loaded.load_state_dict(old)
    assert loaded.adam_t.tolist() == [3, 3, 3]
    assert loaded.min_losses.tolist() == [-1.0] * 3  # the config's
    assert "min_losses" not in loaded.state_dict()


# ----------------------------------------------------------------------------- STCH λ and μ
def stch_gradient(
    losses: list[float], nadir: list[float], bounds: list[float], pref: list[float], mu: float
) -> list[float]:
    """∂/∂L of ``k · μ log Σ exp(λᵢ vᵢ/μ)``, ``vᵢ = log(L − m + ε) − log(N − m + ε)``."""
    values = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    m = torch.tensor(bounds, dtype=torch.float64)
    v = (values - m + 1e-8).log() - (torch.tensor(nadir, dtype=torch.float64) - m + 1e-8).log()
    lam = torch.tensor(pref, dtype=torch.float64)
    objective = len(losses) * mu * torch.logsumexp(lam * v / mu, 0)
    (grad,) = torch.autograd.grad(objective, values)
    return grad.tolist()


@pytest.mark.parametrize("mu_ref", [0.3, 1.0, 3.0])
def test_stch_weights_are_the_gradient_of_its_scalarisation_in_both_conventions(
    mu_ref: float,
) -> None:
    bounds = [0.0, -1.0, 0.5]
    warmup = [[2.0, 1.0, 1.5], [1.0, 0.5, 1.0]]
    nadir = [(x + y) / 2 for x, y in zip(*warmup, strict=True)]
    now = [0.5, -0.25, 1.25]
    k = 3
    # ours: λ on the simplex (uniform 1/k); the reference's μ maps to mu = μ_ref / k
    method = make("stch", mu=mu_ref / k, warmup_steps=2, min_losses=bounds)
    run(method, [dict(zip(TASKS, w, strict=True)) for w in warmup])
    got = method(dict(zip(TASKS, map(torch.tensor, now), strict=True)), StepContext(step=2))
    ours = [float(got.weights[t]) for t in TASKS]
    assert ours == pytest.approx(stch_gradient(now, nadir, bounds, [1 / k] * k, mu_ref / k))
    # the reference's convention: λ = 1 and k·μ_ref·log Σ exp(vᵢ/μ_ref): our weights × k
    reference = stch_gradient(now, nadir, bounds, [1.0] * k, mu_ref)
    assert [k * w for w in ours] == pytest.approx(reference, rel=1e-6)
    # a non-uniform preference is the same derivative
    pref = [0.5, 0.3, 0.2]
    method = make("stch", mu=0.4, warmup_steps=2, min_losses=bounds, preference=pref)
    run(method, [dict(zip(TASKS, w, strict=True)) for w in warmup])
    got = method(dict(zip(TASKS, map(torch.tensor, now), strict=True)), StepContext(step=2))
    assert [float(got.weights[t]) for t in TASKS] == pytest.approx(
        stch_gradient(now, nadir, bounds, pref, 0.4)
    )


def test_stch_task_first_seen_after_warmup_takes_its_first_loss_as_nadir() -> None:
    method = make("stch", warmup_steps=2)
    run(method, [{"a": 1.0, "b": 2.0}] * 2)
    got = run(method, [None, None, {"a": 0.5, "b": 2.0, "c": 4.0}, {"a": 0.5, "b": 2.0, "c": 2.0}])
    assert float(method.loss_sums[2]) == 4.0 and float(method.loss_counts[2]) == 1.0
    first = stch_gradient([0.5, 2.0, 4.0], [1.0, 2.0, 4.0], [0.0] * 3, [1 / 3] * 3, 0.5)
    second = stch_gradient([0.5, 2.0, 2.0], [1.0, 2.0, 4.0], [0.0] * 3, [1 / 3] * 3, 0.5)
    assert list(got[0].values()) == pytest.approx(first)
    assert list(got[1].values()) == pytest.approx(second)


# ----------------------------------------------------------------------------- DWA
def test_dwa_zero_distance_and_a_task_absent_for_an_epoch() -> None:
    method = make("dwa", min_losses={"b": 1.0})
    epochs = [
        {"a": 2.0, "b": 1.0, "c": 1.0},  # b at its bound: mean distance 0
        {"a": 1.0, "b": 1.0},  # c absent the whole epoch; b at its bound again
        {"a": 1.0, "b": 1.0, "c": 1.0},
    ]
    weights = run(method, [dict(e) for e in epochs for _ in range(2)])
    ratio = torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64)  # b: (0 + ε)/(0 + ε)
    expected = 3 * torch.softmax(ratio / 2.0, 0)
    assert list(weights[4].values()) == pytest.approx(expected.tolist(), rel=1e-6)
    assert method.history_known.tolist() == [[True] * 3, [True] * 3]


def test_dwa_loads_checkpoints_that_marked_unknown_means_by_zero() -> None:
    method = make("dwa")
    run(method, [{"a": 1.0, "b": 2.0}] * 5)
    old = {k: v for k, v in method.state_dict().items() if k != "history_known"}
    loaded = make("dwa")
    loaded.load_state_dict(old)
    assert loaded.history_known.tolist() == [[True, True, False], [True, True, False]]
    assert torch.equal(loaded.all_weights(), method.all_weights())


# ----------------------------------------------------------------------------- DB-MTL
def db_mtl_weights(method, gram: torch.Tensor, present: list[int], losses: list[float]):
    values = torch.tensor(losses, dtype=torch.float64)
    return method.gram_weights(gram, present, values, StepContext())


def test_db_mtl_loss_corners() -> None:
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    gram = jacobian @ jacobian.T
    # a shift: bounds m on L are bounds 0 on L − m; L = m is distance 0, log(ε)
    shifted = build_weighting("db_mtl", TASKS, min_losses=[-1.0, 0.0, 0.5])
    plain = build_weighting("db_mtl", TASKS)
    for losses in ([-0.5, 0.0, 1.0], [-1.0, 0.25, 0.75]):
        got = db_mtl_weights(shifted, gram, [0, 1, 2], losses)
        want = db_mtl_weights(plain, gram, [0, 1, 2], [losses[0] + 1, losses[1], losses[2] - 0.5])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        assert bool(torch.isfinite(got).all())
    with pytest.raises(ValueError, match=r"weighting=db_mtl.*'c'.*weighting\.min_losses"):
        db_mtl_weights(shifted, gram, [0, 1, 2], [0.0, 0.0, 0.25])
    # a non-finite loss value: the rule on the others' Gram matrix, its norm untouched
    method = build_weighting("db_mtl", TASKS)
    alone = build_weighting("db_mtl", TASKS)
    db_mtl_weights(method, gram, [0, 1, 2], [1.0, 2.0, 3.0])
    db_mtl_weights(alone, gram, [0, 1, 2], [1.0, 2.0, 3.0])
    norm_b, count_b = method.mean_norms[1].clone(), method.updates[1].clone()
    got = db_mtl_weights(method, gram, [0, 1, 2], [1.5, NAN, 2.5])
    want = db_mtl_weights(alone, gram[[0, 2]][:, [0, 2]], [0, 2], [1.5, 2.5])
    assert float(got[1]) == 0.0
    torch.testing.assert_close(got[[0, 2]], want, rtol=0, atol=0)
    assert torch.equal(method.mean_norms[1], norm_b) and torch.equal(method.updates[1], count_b)
    # one task present: 1/(d + ε)
    one = build_weighting("db_mtl", TASKS)
    assert db_mtl_weights(one, gram[:1, :1], [0], [0.5]).tolist() == pytest.approx([2.0])


# ----------------------------------------------------------------------------- config
def test_min_losses_config_errors_name_the_key() -> None:
    for bad, match in (
        ([0.0, 1.0], "2 numbers; expected"),
        ({"z": 1.0}, "unknown tasks"),
        ("low", "expected a finite number"),
        ([0.0, INF, 0.0], "task 'b' is inf"),
    ):
        with pytest.raises(ConfigError, match=match) as error:
            make("famo", min_losses=bad)
        assert "weighting.min_losses (weighting=famo)" in str(error.value)
    method = make("gls", min_losses={"b": -2.5})
    assert method.min_losses.tolist() == [0.0, -2.5, 0.0]


@pytest.mark.parametrize("name", [*BOUNDED, "db_mtl"])
def test_shipped_configs_build_with_their_bounds(name: str) -> None:
    config = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "weighting" / f"{name}.yaml"))
    assert config.pop("name") == name
    assert config["min_losses"] == 0.0
    method = build_weighting(name, TASKS, **config)
    assert method.min_losses.tolist() == [0.0] * 3
    override = OmegaConf.create({"min_losses": {"b": -1.5}})  # weighting.min_losses={b: -1.5}
    method = build_weighting(name, TASKS, **{**config, **OmegaConf.to_container(override)})
    assert method.min_losses.tolist() == [0.0, -1.5, 0.0]
