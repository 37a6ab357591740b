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
    assert {"equal", "static", "uncertainty"} <= set(WEIGHTINGS.names())


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
    assert "equal, static, uncertainty" in message and "Did you mean 'uncertainty'" in message
    with pytest.raises(ConfigError, match="cannot build weighting method 'equal'"):
        build_weighting("equal", TASKS, temperature=2.0)
