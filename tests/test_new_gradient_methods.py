"""PCD, CR-MOGM, ExcessMTL, MoDo and SDMGrad at the rule level: torchjd's numbers when every task
is present, independent references, per-task state (absent tasks, re-entry, checkpoints) and
corners (one task, zero and huge gradients, singular and non-finite input)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.optimize import minimize
from torchjd import aggregation as jd

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting import StepContext, build_weighting

TASKS = ["a", "b", "c"]
CONTEXT = StepContext()
WIDTH = 8

# name -> options used by the generic tests (crmogm wraps a stateful rule to test its state too)
METHODS = {
    "pcd": {"tau": 0.2, "beta": 0.9},
    "crmogm": {"rule": "gradvac", "alpha": 0.5},
    "excess_mtl": {},
    "modo": {"gamma": 0.05},
    "sdmgrad": {},
}


def make(name: str, tasks: list[str] = TASKS, **kwargs):
    level = "params" if name in {"excess_mtl", "modo", "sdmgrad"} else "representation"
    return build_weighting(name, tasks, level=level, **{**METHODS[name], **kwargs})


def halves(m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two half-batch Jacobians of m tasks (float64), with a conflicting pair."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(m, WIDTH, generator=generator, dtype=torch.float64)
    second = first + 0.3 * torch.randn(m, WIDTH, generator=generator, dtype=torch.float64)
    if m > 1:
        first[1] -= 1.5 * first[0]
        second[1] -= 1.5 * second[0]
    return first, second


def weights(method, present: list[int], first: torch.Tensor, second: torch.Tensor):
    """The rule's weights from the present tasks' half-batch Jacobians, as the step calls it
    (with the global generator seeded, as the step seeds it, for GradVac's draw)."""
    jacobian = (first + second) / 2
    losses = torch.ones(len(present), dtype=torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if getattr(method, "needs_jacobian", False):
            return method.jacobian_weights(jacobian, present, losses, CONTEXT)
        gram = jacobian @ jacobian.T
        if getattr(method, "needs_cross_gram", False):
            return method.cross_gram_weights(first @ second.T, gram, present, losses, CONTEXT)
        return method.gram_weights(gram, present, losses, CONTEXT)


def snapshot(method) -> dict[str, torch.Tensor]:
    """The rule's state: its buffers, without the base step's cache of weights (NaN until a
    step fills it; the rule-level calls here never do)."""
    return {
        key: value.clone()
        for key, value in method.state_dict().items()
        if not key.endswith("cached_weights")
    }


def task_slices(state: dict[str, torch.Tensor], task: int, k: int) -> dict[str, torch.Tensor]:
    """Every entry of ``task`` in the state: rows (and columns) of the k-sized buffers."""
    out = {}
    for key, value in state.items():
        if value.ndim >= 1 and value.shape[0] == k:
            out[f"{key}[{task}]"] = value[task]
        if value.ndim == 2 and value.shape[1] == k:
            out[f"{key}[:, {task}]"] = value[:, task]
    return out


# ------------------------------------------------------------------------ torchjd's numbers
@pytest.mark.parametrize(
    ("options", "tau"),
    [
        ({}, 0.02),
        ({"tau": 0.5, "beta": 0.5, "eps": 0.0}, 0.5),
        (
            {"priority": ["c", "a", "d", "b"], "tau": {"a": 0.1, "d": 0.3, "b": 0.6}},
            [0.1, 0.3, 0.6],
        ),
    ],
)
def test_pcd_matches_torchjd_when_every_task_is_present(options, tau) -> None:
    tasks = ["a", "b", "c", "d"]
    method = build_weighting("pcd", tasks, **options)
    order = [tasks.index(t) for t in options.get("priority", tasks)]
    reference = jd.PCDWeighting(
        tau=torch.tensor(tau, dtype=torch.float64) if isinstance(tau, list) else tau,
        beta=options.get("beta", 0.999),
        eps=options.get("eps", 1e-8),
    )
    for seed in range(8):
        first, second = halves(4, seed)
        jacobian = (first + second) / 2 * (1 + seed)  # changing norms move the EMA
        if seed == 5:
            jacobian[order[0]] = 0.0  # a zero primary gradient: zero weights
        ours = method.gram_weights(jacobian @ jacobian.T, [0, 1, 2, 3], None, CONTEXT)
        permuted = jacobian[order]  # torchjd reads the primary as the first row
        expected = torch.empty(4, dtype=torch.float64)
        expected[order] = reference(permuted @ permuted.T)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
        if seed == 5:
            assert float(ours.abs().sum()) == 0.0


class OurRule(jd.Weighting):
    """One of our Gram rules as a torchjd weighting (all tasks present), for rules that deviate
    from torchjd's on purpose (our UPGrad projects exactly, without torchjd's 1e-4·I)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.rule = build_weighting(name, TASKS)

    def forward(self, gram: torch.Tensor, /) -> torch.Tensor:
        return self.rule.gram_weights(gram, [0, 1, 2], None, CONTEXT)


@pytest.mark.parametrize(
    ("rule", "alpha", "reference"),
    [
        ("upgrad", 0.9, lambda: OurRule("upgrad")),
        ("mgda", 0.3, lambda: jd.MGDAWeighting()),
        ("gradvac", 0.5, lambda: jd.GradVacWeighting(beta=0.5)),
    ],
)
def test_crmogm_matches_torchjd_when_every_task_is_present(rule, alpha, reference) -> None:
    options = {"beta": 0.5} if rule == "gradvac" else {}
    method = build_weighting("crmogm", TASKS, rule=rule, rule_options=options, alpha=alpha)
    expected_rule = jd.CRMOGMWeighting(reference(), alpha=alpha)
    for seed in range(6):
        first, _ = halves(3, seed)
        gram = first @ first.T
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            ours = method.gram_weights(gram, [0, 1, 2], None, CONTEXT)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # GradVac draws its order: the same draw
            expected = expected_rule(gram)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"robust_step_size": 0.3, "n_warmup_steps": 2}])
def test_excess_mtl_matches_torchjd_when_every_task_is_present(options) -> None:
    method = make("excess_mtl", **options)
    reference = jd.ExcessMTLWeighting(**options)
    generator = torch.Generator().manual_seed(0)
    for step in range(7):
        jacobian = torch.randn(3, 40, generator=generator, dtype=torch.float64)
        jacobian[step % 3] *= 3.0  # one task at a time far from its optimum
        ours = method.jacobian_weights(jacobian, [0, 1, 2], None, CONTEXT)
        torch.testing.assert_close(ours, reference(jacobian), rtol=0, atol=1e-6)
        assert float(ours.sum()) == pytest.approx(1.0)
    assert method.sq_grad_sum.shape == (3, 40) and method.sq_grad_sum.dtype == torch.float64


@pytest.mark.parametrize(
    ("name", "options", "reference"),
    [
        ("modo", {"gamma": 0.1, "rho": 0.1}, lambda: jd.MoDoWeighting(gamma=0.1, rho=0.1)),
        ("modo", {"gamma": 0.5, "rho": 0.0}, lambda: jd.MoDoWeighting(gamma=0.5, rho=0.0)),
        ("sdmgrad", {}, lambda: jd.SDMGradWeighting()),
        (
            "sdmgrad",
            {
                "lr": 2.0,
                "momentum": 0.0,
                "n_iter": 5,
                "lambda_": 1.0,
                "pref_vector": [0.5, 0.3, 0.2],
            },
            lambda: jd.SDMGradWeighting(
                lr=2.0,
                momentum=0.0,
                n_iter=5,
                lambda_=1.0,
                pref_vector=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
            ),
        ),
    ],
)
def test_modo_and_sdmgrad_match_torchjd_when_every_task_is_present(
    name, options, reference
) -> None:
    method = make(name, **options)
    expected_rule = reference()
    generator = torch.Generator().manual_seed(1)
    for _ in range(8):
        cross = torch.randn(3, 3, generator=generator, dtype=torch.float64)
        cross += 2 * torch.eye(3, dtype=torch.float64)
        ours = method.cross_gram_weights(cross, cross, [0, 1, 2], None, CONTEXT)
        torch.testing.assert_close(ours, expected_rule(cross), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------ independent references
def pcd_direction_by_qp(jacobian: np.ndarray, tau: float) -> np.ndarray:
    """PCD with β = 0, ε = 0 (unit-normalised gradients) by a generic solver in parameter space:
    ``min ½‖d − u₁‖²`` s.t. ``uⱼ·d ≥ τ``, rescaled to ‖g₁‖; row 0 is the primary."""
    units = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
    constraints = [
        {"type": "ineq", "fun": lambda d, u=u: u @ d - tau, "jac": lambda d, u=u: u}
        for u in units[1:]
    ]
    result = minimize(
        lambda d: 0.5 * np.sum((d - units[0]) ** 2),
        units[0],
        jac=lambda d: d - units[0],
        constraints=constraints,
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert result.success
    return result.x * np.linalg.norm(jacobian[0]) / np.linalg.norm(result.x)


def test_pcd_follows_the_highest_priority_present_task_under_the_constraints() -> None:
    method = build_weighting("pcd", ["a", "b", "c", "d"], priority=["c", "a", "d", "b"], tau=0.4,
                             beta=0.0, eps=0.0)  # fmt: skip
    generator = torch.Generator().manual_seed(3)
    jacobian = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    jacobian[0] = -jacobian[2] + 0.3 * jacobian[0]  # a conflicts with c
    for present in ([0, 1, 2, 3], [0, 1, 3], [1, 3]):  # primary: c, then a, then d
        rows = jacobian[present]
        w = method.gram_weights(rows @ rows.T, present, None, CONTEXT)
        direction = (w @ rows).numpy()
        by_priority = sorted(present, key=lambda i: "cadb".index("abcd"[i]))
        expected = pcd_direction_by_qp(jacobian[by_priority].numpy(), 0.4)
        np.testing.assert_allclose(direction, expected, rtol=1e-5, atol=1e-6)
        units = rows / rows.norm(dim=1, keepdim=True)
        progress = units @ torch.from_numpy(direction) / np.linalg.norm(direction)
        secondary = [j for j, i in enumerate(present) if i != by_priority[0]]
        # each secondary's unit progress along the unit direction is at least τ·‖u₁‖/‖d̃‖ > 0
        assert float(progress[secondary].min()) > 0


def test_pcd_is_scale_free_in_each_secondary_task() -> None:
    plain = build_weighting("pcd", TASKS, tau=0.3)
    scaled = build_weighting("pcd", TASKS, tau=0.3)
    for seed in range(4):
        first, _ = halves(3, seed)
        big = first.clone()
        big[2] *= 1e4  # a secondary task whose gradients are 10⁴ times larger, every step
        d_plain = plain.gram_weights(first @ first.T, [0, 1, 2], None, CONTEXT) @ first
        d_scaled = scaled.gram_weights(big @ big.T, [0, 1, 2], None, CONTEXT) @ big
        torch.testing.assert_close(d_scaled, d_plain, rtol=1e-6, atol=1e-9)


def test_crmogm_smooths_the_wrapped_weights_per_task() -> None:
    method = build_weighting("crmogm", ["a", "b", "c"], rule="mgda", alpha=0.5)
    # MGDA on orthogonal gradients of squared norms (1, 4): (0.8, 0.2); (4, 1): (0.2, 0.8)
    first = method.gram_weights(
        torch.diag(torch.tensor([1.0, 4.0]).double()), [0, 1], None, CONTEXT
    )
    assert first.tolist() == pytest.approx([0.8, 0.2], abs=2e-3)  # the first step: λ̂ itself
    second = method.gram_weights(
        torch.diag(torch.tensor([4.0, 1.0]).double()), [0, 1], None, CONTEXT
    )
    assert second.tolist() == pytest.approx([0.5, 0.5], abs=2e-3)  # ½ (0.8, 0.2) + ½ (0.2, 0.8)
    # c's first step returns its own λ̂; a keeps smoothing from 0.5
    third = method.gram_weights(
        torch.diag(torch.tensor([1.0, 4.0]).double()), [0, 2], None, CONTEXT
    )
    assert third.tolist() == pytest.approx([0.5 * 0.5 + 0.5 * 0.8, 0.2], abs=2e-3)
    assert float(method.lambdas[1]) == pytest.approx(0.5, abs=2e-3)  # b untouched


def test_modo_and_sdmgrad_step_and_converge_to_the_min_norm_weights() -> None:
    cross = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    modo = make("modo", ["a", "b"], gamma=0.1, rho=0.0)
    # λ − γ A λ = (0.5, 0.5) − 0.1 (0.5, 1.5) = (0.45, 0.35): projected, (0.55, 0.45)
    w = modo.cross_gram_weights(cross, cross, [0, 1], None, CONTEXT)
    assert w.tolist() == pytest.approx([0.55, 0.45])
    for _ in range(300):
        w = modo.cross_gram_weights(cross, cross, [0, 1], None, CONTEXT)
    # argmin λᵀAλ on the simplex for A = diag(1, 3): (3/4, 1/4)
    assert w.tolist() == pytest.approx([0.75, 0.25], abs=1e-6)

    sdmgrad = make("sdmgrad", ["a", "b"], lambda_=0.0, lr=1.0)
    for _ in range(30):
        w = sdmgrad.cross_gram_weights(cross, cross, [0, 1], None, CONTEXT)
    assert w.tolist() == pytest.approx([0.75, 0.25], abs=1e-4)
    # with a pull λ towards the uniform w̃: (w + λ w̃)/(1 + λ), w still the min-norm of A(w + λw̃)
    pulled = make("sdmgrad", ["a", "b"], lambda_=1.0, lr=1.0)
    for _ in range(30):
        w = pulled.cross_gram_weights(cross, cross, [0, 1], None, CONTEXT)
    inner = w * 2 - 0.5  # w = (inner + ½)/2
    assert float(inner.min()) >= -1e-9 and float(inner.sum()) == pytest.approx(1.0)
    assert float(w[0]) > 0.5


# ------------------------------------------------------------------------ state and corners
@pytest.mark.parametrize("name", list(METHODS))
def test_one_present_task_gets_weight_one(name: str) -> None:
    method = make(name)
    for seed in range(2):
        first, second = halves(1, seed)
        w = weights(method, [1], first, second)
        assert w.shape == (1,)
        assert float(w[0]) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("name", list(METHODS))
def test_zero_huge_and_dependent_gradients_give_finite_weights(name: str) -> None:
    method = make(name)
    for seed, edit in enumerate(["zero", "all zero", "huge", "dependent", "plain"]):
        first, second = halves(3, seed)
        if edit == "zero":
            first[2], second[2] = 0.0, 0.0
        elif edit == "all zero":
            first, second = first * 0, second * 0
        elif edit == "huge":
            first, second = first * 1e4, second * 1e4
        elif edit == "dependent":  # singular G: b is a multiple of a
            first[1], second[1] = 2 * first[0], 2 * second[0]
        w = weights(method, [0, 1, 2], first, second)
        assert w.shape == (3,) and bool(torch.isfinite(w).all()), (name, edit)
        if name in {"excess_mtl", "modo", "sdmgrad"}:  # on the simplex
            assert float(w.min()) >= 0 and float(w.sum()) == pytest.approx(1.0), (name, edit)
        if name == "pcd" and edit == "all zero":
            assert float(w.abs().sum()) == 0.0
    assert all(bool(torch.isfinite(v).all()) for v in snapshot(method).values())


def test_sdmgrad_is_scale_free_and_pcd_zero_primary_stops_the_update() -> None:
    plain, scaled = make("sdmgrad"), make("sdmgrad")
    for seed in range(3):
        first, second = halves(3, seed)
        a = weights(plain, [0, 1, 2], first, second)
        b = weights(scaled, [0, 1, 2], first * 1e4, second * 1e4)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    pcd = make("pcd")
    first, second = halves(3, 0)
    first[0], second[0] = 0.0, 0.0
    assert weights(pcd, [0, 1, 2], first, second).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("name", list(METHODS))
def test_an_absent_task_keeps_its_state_bit_for_bit_and_resumes_it(name: str) -> None:
    method = make(name)
    weights(method, [0, 1, 2], *halves(3, 0))
    kept = task_slices(snapshot(method), 1, 3)
    assert kept
    for seed in range(1, 4):  # b is absent for three steps
        w = weights(method, [0, 2], *halves(2, seed))
        assert w.shape == (2,) and bool(torch.isfinite(w).all())
        now = task_slices(snapshot(method), 1, 3)
        for key, value in kept.items():
            assert torch.equal(now[key], value), f"{name}: {key} changed while b was absent"
    weights(method, [0, 1, 2], *halves(3, 4))  # b returns: its entries move on from where it left
    now = task_slices(snapshot(method), 1, 3)
    assert any(not torch.equal(now[key], value) for key, value in kept.items()), name
    if name == "pcd":
        assert int(method.steps[1]) == 2 and int(method.steps[0]) == 5
    if name == "excess_mtl":
        assert bool(method.has_baseline[1]) and int(method.steps[1]) == 2


@pytest.mark.parametrize("name", list(METHODS))
def test_non_finite_input_leaves_the_state_untouched(name: str) -> None:
    method = make(name)
    weights(method, [0, 1, 2], *halves(3, 0))
    before = snapshot(method)
    first, second = halves(3, 1)
    first[1, 3] = float("nan")
    second[2, 0] = float("inf")
    w = weights(method, [0, 1, 2], first, second)
    assert w.shape == (3,) and bool(torch.isnan(w).all())
    after = snapshot(method)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{name}: {key} changed on non-finite input"


@pytest.mark.parametrize("name", list(METHODS))
def test_state_dict_round_trip_continues_with_the_same_weights(name: str) -> None:
    first_run = make(name)
    for seed, present in enumerate(([0, 1, 2], [0, 2], [0, 1, 2])):
        weights(first_run, present, *halves(len(present), seed))
    resumed = make(name)
    resumed.load_state_dict(first_run.state_dict())
    for seed in (7, 8):
        a = weights(first_run, [0, 1, 2], *halves(3, seed))
        b = weights(resumed, [0, 1, 2], *halves(3, seed))
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------ options and levels
def test_bad_options_are_refused_with_the_key_and_what_was_expected() -> None:
    cases = [
        ("pcd", {"priority": ["a", "b"]}, r"weighting.priority=.*missing \['c'\]"),
        ("pcd", {"priority": ["a", "b", "b", "c"]}, r"weighting.priority=.*repeated \['b'\]"),
        ("pcd", {"priority": ["a", "b", "x"]}, r"unknown \['x'\].*missing \['c'\]"),
        ("pcd", {"priority": "abc"}, r"weighting.priority='abc' must be a list"),
        ("pcd", {"tau": 1.5}, r"weighting.tau for task 'a' is 1.5; expected a number in \[0, 1\]"),
        ("pcd", {"tau": {"b": 0.1}}, r"weighting.tau=.*missing \['c'\]"),
        ("pcd", {"beta": 1.0}, r"weighting.beta=1.0"),
        ("crmogm", {"rule": "dwa"}, r"weighting.rule='dwa' is a loss-based method.*one of .*mgda"),
        ("crmogm", {"rule": "graddrop"}, r"weighting.rule='graddrop' is not a rule of the Gram"),
        ("crmogm", {"rule": "gradnorm"}, r"weighting.rule='gradnorm' is not a rule of the Gram"),
        ("crmogm", {"rule": "modo"}, r"weighting.rule='modo' is not a rule of the Gram"),
        ("crmogm", {"rule": "mgdaa"}, r"weighting.rule='mgdaa' is not a known.*Did you mean"),
        ("crmogm", {"rule_options": {"level": "params"}}, r"weighting.rule_options sets \['level'"),
        ("crmogm", {"rule_options": {"x": 1}}, r"weighting.rule_options: cannot build .*'x'"),
        ("crmogm", {"alpha": 1.2}, r"weighting.alpha=1.2"),
        ("excess_mtl", {"robust_step_size": 0}, r"weighting.robust_step_size=0"),
        ("excess_mtl", {"n_warmup_steps": -1}, r"weighting.n_warmup_steps=-1"),
        ("modo", {"gamma": 0.0}, r"weighting.gamma=0"),
        ("modo", {"rho": -1.0}, r"weighting.rho=-1.0"),
        (
            "sdmgrad",
            {"momentum": 1.0},
            r"weighting.momentum=1.0; expected a number in \[0.0, 1.0\)",
        ),
        ("sdmgrad", {"n_iter": 0}, r"weighting.n_iter=0"),
        ("sdmgrad", {"pref_vector": [1.0, 2.0]}, r"weighting.pref_vector=\[1.0, 2.0\]; expected 3"),
    ]
    for name, options, message in cases:
        with pytest.raises(ConfigError, match=message):
            make(name, **options)


def test_jacobian_and_cross_gram_rules_are_params_level_only() -> None:
    for name, why in [("excess_mtl", "squared gradient"), ("modo", "identically zero")]:
        with pytest.raises(ConfigError, match=rf"level='representation'.*accepted: params.*{why}"):
            build_weighting(name, TASKS, level="representation")
        method = make(name)
        gram = torch.eye(3, dtype=torch.float64)
        with pytest.raises(NotImplementedError, match="must call"):
            method.gram_weights(gram, [0, 1, 2], None, CONTEXT)
    assert make("excess_mtl").needs_jacobian and make("sdmgrad").needs_cross_gram


def test_excess_mtl_refuses_a_jacobian_of_another_width() -> None:
    method = make("excess_mtl")
    method.jacobian_weights(torch.ones(3, 4), [0, 1, 2], None, CONTEXT)
    with pytest.raises(ValueError, match=r"4 columns.*has 5"):
        method.jacobian_weights(torch.ones(3, 5), [0, 1, 2], None, CONTEXT)


@pytest.mark.parametrize("name", list(METHODS))
def test_config_file_builds_the_method_with_its_defaults(name: str) -> None:
    path = Path(__file__).parents[1] / "configs" / "weighting" / f"{name}.yaml"
    options = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(options, dict) and options.pop("name") == name
    if options.get("seed") == "${seed}":
        options["seed"] = 0
    assert path.read_text().startswith("# ")  # the paper, on the first line
    method = build_weighting(name, TASKS, **options)
    expected_level = "params" if name in {"excess_mtl", "modo", "sdmgrad"} else "representation"
    assert method.level == expected_level
