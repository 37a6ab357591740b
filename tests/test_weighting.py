"""Weighting methods against their formulas, their state, and absent tasks."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting import WEIGHTINGS, StepContext, build_weighting

TASKS = ["a", "b", "c"]


def losses(*values: float) -> dict[str, torch.Tensor]:
    return {
        name: torch.tensor(v, requires_grad=True) for name, v in zip(TASKS, values, strict=False)
    }


def test_registry_holds_the_shipped_methods() -> None:
    loss_based = {
        "dwa",
        "equal",
        "famo",
        "gls",
        "go4align",
        "imtl_l",
        "ldc_mtl",
        "rlw",
        "static",
        "stch",
        "uncertainty",
    }
    gradient_based = {
        "aligned_mtl", "cagrad", "config", "db_mtl", "dualproj", "fairgrad", "graddrop",
        "gradnorm", "gradvac", "imtl_g", "mgda", "mgda_ub", "nash_mtl", "pcgrad", "upgrad",
        "crmogm", "excess_mtl", "modo", "pcd", "sdmgrad",
    }  # fmt: skip
    assert set(WEIGHTINGS.names()) == loss_based | gradient_based
    assert all(WEIGHTINGS.get(n, "x").needs_gradients for n in gradient_based)
    assert not any(WEIGHTINGS.get(n, "x").needs_gradients for n in loss_based)


def test_equal_sums_the_losses() -> None:
    result = build_weighting("equal", TASKS)(losses(1.0, 2.0, 4.0))
    assert float(result.loss) == 7.0
    assert {k: float(v) for k, v in result.weights.items()} == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_static_uses_config_weights_then_task_weights() -> None:
    method = build_weighting("static", TASKS, task_weights={"b": 3.0, "c": 0.5}, weights={"a": 2.0})
    values = losses(1.0, 2.0, 4.0)
    result = method(values)
    assert float(result.loss) == pytest.approx(2 * 1 + 3 * 2 + 0.5 * 4)
    result.loss.backward()
    assert [float(values[t].grad) for t in TASKS] == [2.0, 3.0, 0.5]
    normalized = build_weighting("static", TASKS, weights={"a": 2, "b": 1, "c": 1}, normalize=True)
    assert float(normalized(losses(1.0, 1.0, 1.0)).weights["a"]) == pytest.approx(1.5)
    with pytest.raises(ConfigError, match="unknown tasks"):
        build_weighting("static", TASKS, weights={"z": 1.0})
    with pytest.raises(ConfigError, match=">= 0"):
        build_weighting("static", TASKS, weights={"a": -1.0})


def test_uncertainty_matches_kendall_formula_and_learns_loss_scales() -> None:
    method = build_weighting("uncertainty", TASKS)
    with torch.no_grad():
        method.log_vars.copy_(torch.tensor([0.0, math.log(2.0), -1.0]))
    result = method(losses(1.0, 2.0, 4.0))
    s = method.log_vars.detach()
    expected = sum(
        0.5 * math.exp(-si) * li + 0.5 * si for si, li in zip(s.tolist(), [1, 2, 4], strict=True)
    )
    assert float(result.loss) == pytest.approx(expected, rel=1e-6)
    assert float(result.weights["b"]) == pytest.approx(0.25)
    # At the optimum exp(s_i) = L_i: the weight of a task is inversely proportional to its loss.
    method = build_weighting("uncertainty", TASKS)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    fixed = {"a": torch.tensor(0.5), "b": torch.tensor(3.0), "c": torch.tensor(20.0)}
    for _ in range(2000):
        optimizer.zero_grad()
        method(fixed).loss.backward()
        optimizer.step()
    assert torch.allclose(method.log_vars.exp(), torch.tensor([0.5, 3.0, 20.0]), rtol=1e-3)


def test_absent_tasks_get_no_weight_and_no_state_change() -> None:
    method = build_weighting("uncertainty", TASKS)
    result = method({"a": torch.tensor(2.0), "c": torch.tensor(1.0)}, StepContext(step=3))
    assert set(result.weights) == {"a", "c"}
    result.loss.backward()
    assert method.log_vars.grad[1] == 0.0 and method.log_vars.grad[0] != 0.0
    static = build_weighting("static", TASKS, weights={"a": 1.0, "b": 5.0, "c": 2.0})
    assert float(static({"c": torch.tensor(3.0)}).loss) == 6.0
    with pytest.raises(ValueError, match="at least one task"):
        static({})
    with pytest.raises(KeyError, match="unknown tasks"):
        static({"zzz": torch.tensor(1.0)})


def test_unknown_weighting_name_lists_accepted_ones() -> None:
    with pytest.raises(ConfigError) as err:
        build_weighting("uncertainy", TASKS)
    message = str(err.value)
    assert "weighting.name='uncertainy'" in message
    assert (
        f"Accepted values: {', '.join(sorted(WEIGHTINGS.names()))}." in message
        and "Did you mean 'uncertainty'" in message
    )
    with pytest.raises(ConfigError, match="cannot build weighting method 'equal'"):
        build_weighting("equal", TASKS, temperature=2.0)


# ------------------------------------------------------------------------ loss-based family
def test_dwa_follows_the_ratio_of_the_last_two_epoch_means() -> None:
    method = build_weighting("dwa", ["a", "b"], temperature=2.0)
    epochs = [[(4.0, 1.0), (2.0, 1.0)], [(2.0, 1.0), (2.0, 1.0)], [(1.0, 1.0)]]  # per-step losses
    seen = []
    for epoch, steps in enumerate(epochs):
        for step_losses in steps:
            result = method(
                dict(zip(["a", "b"], map(torch.tensor, step_losses), strict=True)),
                StepContext(epoch=epoch),
            )
            seen.append((epoch, float(result.weights["a"]), float(result.weights["b"])))
    assert seen[0][1:] == (1.0, 1.0) and seen[3][1:] == (1.0, 1.0)  # first two epochs
    # epoch means: e0 = (3, 1), e1 = (2, 1) -> r = (2/3, 1): the slower-falling task b weighs more
    r = torch.tensor([2 / 3, 1.0])
    expected = 2 * torch.softmax(r / 2.0, dim=0)
    assert seen[4][1:] == pytest.approx(expected.tolist(), rel=1e-6)
    assert seen[4][2] > seen[4][1]
    # the history is state: a copy loaded from the state dict continues identically
    clone = build_weighting("dwa", ["a", "b"])
    clone.load_state_dict(method.state_dict())
    assert torch.equal(clone.all_weights(), method.all_weights())


def test_loss_reading_methods_use_the_global_losses_under_ddp() -> None:
    # context.global_losses stands in for the all-reduced losses the module passes under DDP
    local = {"a": torch.tensor(1.0), "b": torch.tensor(3.0)}
    glob = StepContext(epoch=0, global_losses=torch.tensor([2.0, 6.0]))
    dwa = build_weighting("dwa", ["a", "b"])
    dwa(local, glob)
    assert dwa.epoch_sum.tolist() == [2.0, 6.0]
    gls = build_weighting("gls", ["a", "b"])
    weights = gls(local, glob).weights  # G = sqrt(12); wᵢ = G / (2 Lᵢ) of the global losses
    assert float(weights["a"]) == pytest.approx(12**0.5 / 4)
    famo = build_weighting("famo", ["a", "b"])
    assert float(famo(local, glob).weights["a"]) == pytest.approx(0.75)  # c z/L: (1/2)/(1/2+1/6)/2
    for name in ("dwa", "gls", "famo", "rlw", "stch"):  # rlw: for the set of labelled tasks
        assert WEIGHTINGS.get(name, "x").reads_loss_values
    for name in ("equal", "static", "uncertainty", "imtl_l"):
        assert not WEIGHTINGS.get(name, "x").reads_loss_values


def test_rlw_draws_softmax_normal_weights_from_seed_and_step() -> None:
    one, two = build_weighting("rlw", TASKS, seed=3), build_weighting("rlw", TASKS, seed=3)
    values = losses(1.0, 2.0, 3.0)
    first = one(values, StepContext(step=10)).weights
    assert {k: float(v) for k, v in first.items()} == {
        k: float(v) for k, v in two(values, StepContext(step=10)).weights.items()
    }  # the same on every rank, and after a resume
    assert sum(float(v) for v in first.values()) == pytest.approx(1.0)
    assert first != one(values, StepContext(step=11)).weights
    z = one.draw(10)
    assert [float(first[t]) for t in TASKS] == pytest.approx(torch.softmax(z, 0).tolist())
    draws = torch.stack([torch.softmax(one.draw(s), 0) for s in range(2000)])
    assert draws.mean(0).tolist() == pytest.approx([1 / 3] * 3, abs=0.02)
    partial = one({"a": torch.tensor(1.0), "c": torch.tensor(1.0)}, StepContext(step=10)).weights
    assert [float(partial["a"]), float(partial["c"])] == pytest.approx(
        torch.softmax(z[[0, 2]], 0).tolist()
    )


def test_gls_is_the_geometric_mean_and_its_gradient() -> None:
    method = build_weighting("gls", TASKS)
    values = losses(1.0, 2.0, 4.0)
    result = method(values)
    assert float(result.loss.detach()) == pytest.approx(3 * 2.0 / 3)  # Σ G/(k Lᵢ) Lᵢ = G = 2
    result.loss.backward()
    # d/dLᵢ (Π L)^(1/k) = G / (k Lᵢ)
    assert [float(values[t].grad) for t in TASKS] == pytest.approx([2 / 3, 1 / 3, 1 / 6])
    # scale invariance: multiplying a loss by 10 does not change the balance of the others
    scaled = method(
        {"a": torch.tensor(10.0), "b": torch.tensor(2.0), "c": torch.tensor(4.0)}
    ).weights
    ratio = float(scaled["b"]) / float(scaled["c"])
    assert ratio == pytest.approx(2.0)


def test_imtl_l_drives_every_scaled_loss_to_one() -> None:
    method = build_weighting("imtl_l", TASKS)
    result = method(losses(1.0, 2.0, 4.0))
    assert float(result.loss.detach()) == pytest.approx(7.0)  # s = 0: Σ Lᵢ − 0
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    fixed = {"a": torch.tensor(0.5), "b": torch.tensor(3.0), "c": torch.tensor(20.0)}
    for _ in range(3000):
        optimizer.zero_grad()
        method(fixed).loss.backward()
        optimizer.step()
    scaled = [float(method.log_scales[i].exp() * fixed[t]) for i, t in enumerate(TASKS)]
    assert scaled == pytest.approx([1.0, 1.0, 1.0], rel=1e-3)


def test_famo_weights_and_logit_update_follow_the_paper() -> None:
    method = build_weighting("famo", ["a", "b"], lr=0.1, weight_decay=0.0)
    values = {
        "a": torch.tensor(1.0, requires_grad=True),
        "b": torch.tensor(4.0, requires_grad=True),
    }
    result = method(values, StepContext(step=0))
    # z uniform: c = 1 / (½/1 + ½/4) = 1.6; wᵢ = c zᵢ / Lᵢ = (0.8, 0.2)
    assert [float(result.weights["a"]), float(result.weights["b"])] == pytest.approx([0.8, 0.2])
    result.loss.backward()
    assert float(values["a"].grad) == pytest.approx(0.8)
    # next step: a fell by half, b did not move -> the logits favour b
    method({"a": torch.tensor(0.5), "b": torch.tensor(4.0)}, StepContext(step=1))
    z = method.task_weights()
    assert float(z[1]) > 0.5 > float(z[0])
    # the first Adam step moves each logit by lr against the sign of its gradient
    delta = torch.tensor([torch.log(torch.tensor(2.0)), 0.0], dtype=torch.float64)
    grad = 0.5 * (delta - 0.5 * delta.sum())
    assert method.logits.tolist() == pytest.approx((-0.1 * grad.sign()).tolist(), rel=1e-5)
    # micro-batches of the same optimizer step do not move the logits again
    before = method.logits.clone()
    method({"a": torch.tensor(0.1), "b": torch.tensor(4.0)}, StepContext(step=1))
    assert torch.equal(method.logits, before)


def test_famo_balances_the_decrease_rate_of_two_quadratic_tasks() -> None:
    # Two tasks on one shared parameter pulling in opposite directions at different scales.
    theta = torch.nn.Parameter(torch.tensor([0.0]))
    method = build_weighting("famo", ["small", "large"], lr=0.05, weight_decay=0.0)
    optimizer = torch.optim.SGD([theta], lr=0.02)
    for step in range(400):
        values = {
            "small": (theta - 1).square().sum() + 0.01,
            "large": 100 * (theta + 1).square().sum() + 1,
        }
        optimizer.zero_grad()
        method(values, StepContext(step=step)).loss.backward()
        optimizer.step()
    # FAMO stops at a point where neither log-loss can fall without the other rising; equal
    # weighting would sit at θ ≈ -0.98 (the large task's optimum).
    assert -0.98 < float(theta) < 0.98
