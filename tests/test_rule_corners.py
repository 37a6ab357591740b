"""Every Gram rule on the corners a step can produce, against torchjd where it follows the paper,
independent solves (CAGrad, the dual-cone projections) and closed forms (one task).

The corners: one present task, a zero task gradient, gradients 1e4 apart in scale, a singular G
(dependent, parallel, anti-parallel gradients), more tasks than dimensions (k=10, D=7), all
gradients zero, and a task absent for several steps. Tensor level only: ``gram_weights`` on the
float64 G of a float64 J (as ``gradient.py`` forms it), the direction is ``Jᵀw``.
"""

from __future__ import annotations

import logging
import math
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torchjd import aggregation as jd
from torchjd.linalg import QuadprogProjector

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting import StepContext, build_weighting
from lightning_mtl.weighting.cagrad import CAGradSolver, cagrad_weights
from tests.test_gradient_methods import step

RULES = {
    "mgda": {},
    "mgda_ub": {},
    "pcgrad": {},
    "cagrad": {"c": 0.4},
    "imtl_g": {},
    "aligned_mtl": {},
    "upgrad": {},
    "dualproj": {},
    "fairgrad": {"alpha": 1.0},
    "config": {},
    "nash_mtl": {},
    "gradvac": {"beta": 0.5},
    "graddrop": {},
    "gradnorm": {},
}
SEED = 11  # the per-step draw (PCGrad's and GradVac's orders, GradDrop's mask)


def gaussian(k: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(k, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def corner(name: str) -> torch.Tensor:
    """The task Jacobian (float64) of each corner."""
    if name == "one":
        return torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    if name == "regular":
        jacobian = gaussian(3, 20, 1)
        jacobian[1] -= 1.5 * jacobian[0]  # a conflicting pair
        return jacobian
    if name == "zero":
        jacobian = gaussian(3, 20, 2)
        jacobian[1] = 0.0
        return jacobian
    if name == "scales":
        jacobian = gaussian(3, 20, 3)
        jacobian[0] *= 1e4
        return jacobian
    if name == "dependent":
        jacobian = gaussian(3, 1000, 4)
        jacobian[2] = jacobian[0] + jacobian[1]
        return jacobian
    if name == "parallel":
        jacobian = gaussian(2, 20, 5)
        jacobian[1] = 2.0 * jacobian[0]
        return jacobian
    if name == "antiparallel":
        jacobian = gaussian(2, 20, 6)
        jacobian[1] = -0.5 * jacobian[0]
        return jacobian
    if name == "wide":
        return gaussian(10, 7, 7)
    if name == "all_zero":
        return torch.zeros(3, 5, dtype=torch.float64)
    raise KeyError(name)


CORNERS = [
    "one",
    "regular",
    "zero",
    "scales",
    "dependent",
    "parallel",
    "antiparallel",
    "wide",
    "all_zero",
]
# where the paper's own direction is 0: 0 in the hull (MGDA), mutual cancellation (PCGrad and
# GradVac from zero targets), the dual cone is the hyperplane ⊥ g (UPGrad, DualProj), no
# direction has equal cosine to g and −g (ConFIG), and FairGrad's equation has no solution
ZERO_DIRECTION = {
    ("mgda", "zero"),
    ("mgda_ub", "zero"),
    ("mgda", "antiparallel"),
    ("mgda_ub", "antiparallel"),
    ("pcgrad", "antiparallel"),
    ("gradvac", "antiparallel"),
    ("upgrad", "antiparallel"),
    ("dualproj", "antiparallel"),
    ("config", "antiparallel"),
    ("fairgrad", "antiparallel"),
}


def tasks_of(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


def run(rule, jacobian: torch.Tensor, present: list[int] | None = None, step_index: int = 0):
    """The rule's weights for the tasks ``present`` (all by default) and the direction."""
    present = list(range(len(jacobian))) if present is None else present
    rows = jacobian[present]
    gram = rows @ rows.T
    losses = torch.ones(len(present), dtype=torch.float64)
    context = StepContext(step=step_index)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        weights = rule.gram_weights(gram, present, losses, context)
        if rule.registered_name == "graddrop":
            direction = rule.representation_direction(rows, weights, present, context)
        else:
            direction = rows.T @ weights.to(rows)
    return weights, direction


def reference(aggregator, jacobian: torch.Tensor) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(SEED)
        return aggregator(jacobian)


def relative(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    return float((a - b).norm()) / max(float(b.norm()), floor)


# ------------------------------------------------------------------ the battery, every rule
@pytest.mark.parametrize("corner_name", CORNERS)
@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_is_defined_on_every_corner(name: str, corner_name: str, caplog) -> None:
    jacobian = corner(corner_name)
    k = len(jacobian)
    rule = build_weighting(name, tasks_of(k), **RULES[name])
    with caplog.at_level(logging.WARNING):
        weights, direction = run(rule, jacobian)
    assert weights.shape == (k,) and weights.dtype == torch.float64
    assert torch.isfinite(weights).all() and torch.isfinite(direction).all()
    norms = jacobian.norm(dim=1)
    if corner_name == "all_zero" or (name, corner_name) in ZERO_DIRECTION:
        assert float(direction.norm()) <= 1e-9 * max(float(norms.max()), 1.0)
    else:  # the paper's direction is not zero here, so neither is ours (not even round-off)
        assert float(direction.norm()) > 1e-6 * float(norms[norms > 0].min())


ONE_TASK = {  # d for the single gradient g (closed forms of each paper)
    "cagrad": lambda g: 1.4 * g,
    "fairgrad": lambda g: g / g.norm(),  # G w = 1/w: w = 1/‖g‖
    "nash_mtl": lambda g: g / g.norm(),  # α G α = 1, ‖d‖ = 1 = max_norm: no clipping
}


@pytest.mark.parametrize("name", list(RULES))
def test_one_present_task_has_the_papers_closed_form(name: str) -> None:
    jacobian = corner("regular")
    rule = build_weighting(name, tasks_of(3), **RULES[name])
    for task in range(3):  # one of three tasks present, in turn
        _, direction = run(rule, jacobian, present=[task])
        g = jacobian[task]
        expected = ONE_TASK.get(name, lambda g: g)(g)
        assert relative(direction, expected) < 1e-10, (name, task)


def test_one_present_task_through_a_step_and_nash_clipping() -> None:
    jacobian = corner("regular").float()
    for name in RULES:
        method = build_weighting(name, tasks_of(3), **RULES[name])
        direction, _, combined = step(method, jacobian, drop=("t0", "t2"))
        assert set(combined.weights) == {"t1"}, name
        assert torch.isfinite(direction).all() and direction.norm() > 0, name
    nash = build_weighting("nash_mtl", tasks_of(3), max_norm=0.5)
    _, direction = run(nash, jacobian.double(), present=[1])
    torch.testing.assert_close(direction, 0.5 * jacobian[1].double() / jacobian[1].norm())


# where torchjd 0.18 follows the paper on a corner (see docs/torchjd_notes.md for the others)
TORCHJD = {
    "mgda": (jd.MGDA, CORNERS),
    "mgda_ub": (jd.MGDA, CORNERS),
    "pcgrad": (jd.PCGrad, CORNERS),
    "imtl_g": (jd.IMTLG, CORNERS),
    "aligned_mtl": (jd.AlignedMTL, CORNERS),
    "config": (jd.ConFIG, [c for c in CORNERS if c != "antiparallel"]),
    "fairgrad": (
        lambda: jd.FairGrad(alpha=1.0),
        [c for c in CORNERS if c not in ("antiparallel", "scales")],
    ),
    "gradvac": (lambda: jd.GradVac(beta=0.5), CORNERS),
}


@pytest.mark.parametrize("name", list(TORCHJD))
def test_direction_equals_torchjd_where_it_follows_the_paper(name: str) -> None:
    make, corners = TORCHJD[name]
    for corner_name in corners:
        jacobian = corner(corner_name)
        rule = build_weighting(name, tasks_of(len(jacobian)), **RULES[name])
        _, direction = run(rule, jacobian)
        expected = reference(make(), jacobian)
        scale = max(float(jacobian.norm(dim=1).max()), 1.0)  # zero directions: round-off
        assert float((direction - expected).norm()) <= 1e-5 * float(expected.norm()) + 1e-8 * scale


def imtl_g_from_svd(jacobian: torch.Tensor) -> torch.Tensor:
    """IMTL-G (``w ∝ G⁺n``) with ``G⁺ = J⁺ᵀJ⁺`` from the SVD of J itself (rank from J)."""
    inverse = torch.linalg.pinv(jacobian, rtol=1e-6)
    v = inverse.T @ (inverse @ jacobian.norm(dim=1))
    return jacobian.T @ (v / v.sum())


def aligned_mtl_from_svd(jacobian: torch.Tensor) -> torch.Tensor:
    """Aligned-MTL (``d = σ_min Σ U Σ⁻¹ Uᵀ π`` over the kept singular values) from the SVD of J."""
    u, sigma, _ = torch.linalg.svd(jacobian, full_matrices=False)
    keep = sigma > 1e-6 * sigma[0]
    u, sigma = u[:, keep], sigma[keep]
    pref = torch.full((len(jacobian),), 1.0 / len(jacobian), dtype=jacobian.dtype)
    return jacobian.T @ (sigma[-1] * (u / sigma) @ u.T @ pref)


@pytest.mark.parametrize("name", ["imtl_g", "aligned_mtl", "config"])
def test_round_off_of_long_dependent_gradients_is_not_rank(name: str) -> None:
    """``g₃ = g₁ + g₂`` computed in float32 (as autograd would), D = 1e5, G formed in float64:
    the direction is that of the exactly dependent system, computed from J's SVD (torchjd's IMTL-G
    and Aligned-MTL can read G's round-off as rank at this length: docs/torchjd_notes.md, 5)."""
    rows = torch.randn(3, 100_000, generator=torch.Generator().manual_seed(8))
    rows[2] = rows[0] + rows[1]
    exact = rows.double()
    exact[2] = exact[0] + exact[1]
    _, direction = run(build_weighting(name, tasks_of(3)), rows.double())
    references = {"imtl_g": imtl_g_from_svd, "aligned_mtl": aligned_mtl_from_svd}
    expected = references.get(name, jd.ConFIG())(exact)
    assert relative(direction, expected) < 1e-6


# --------------------------------------------------------------------------------- CAGrad
def cagrad_slsqp(jacobian: torch.Tensor, c: float) -> torch.Tensor:
    """The official algorithm's direction: the dual by scipy SLSQP, then g₀ + (c‖g₀‖/‖g_w‖) g_w."""
    gram = (jacobian @ jacobian.T).numpy()
    gram = gram / np.trace(gram)
    k = len(gram)
    b, phi = gram.mean(1), c * math.sqrt(gram.mean())

    def objective(w: np.ndarray) -> float:
        return float(w @ b + phi * math.sqrt(max(w @ gram @ w, 0.0) + 1e-30))

    result = minimize(
        objective,
        np.full(k, 1.0 / k),
        method="SLSQP",
        bounds=[(0.0, 1.0)] * k,
        constraints={"type": "eq", "fun": lambda w: 1.0 - w.sum()},
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    w = torch.from_numpy(result.x)
    g0, gw = jacobian.mean(0), jacobian.T @ w
    if float(gw.norm()) <= 1e-7 * float(jacobian.norm(dim=1).max()):
        return g0
    return g0 + c * g0.norm() / gw.norm() * gw


def cagrad_primal_value(jacobian: torch.Tensor, c: float) -> float:
    """``max_d min_i gᵢ·d`` over ``‖d − g₀‖ ≤ c‖g₀‖``: the paper's primal, solved in R^D."""
    J = jacobian.numpy()
    g0 = J.mean(0)
    d, t = cp.Variable(J.shape[1]), cp.Variable()
    constraints = [J @ d >= t, cp.norm(d - g0) <= c * np.linalg.norm(g0)]
    cp.Problem(cp.Maximize(t), constraints).solve(solver=cp.CLARABEL)
    return float(t.value)


def test_cagrad_zero_gradient_gives_the_mean_as_the_paper() -> None:
    jacobian = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    _, direction = run(build_weighting("cagrad", ["a", "b"], c=0.4), jacobian)
    torch.testing.assert_close(direction, torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))


@pytest.mark.parametrize("corner_name", ["regular", "scales", "dependent", "wide", "antiparallel"])
def test_cagrad_equals_the_official_algorithm_and_solves_the_primal(corner_name: str) -> None:
    jacobian = corner(corner_name)
    if corner_name == "dependent":
        jacobian = jacobian[:, :40].clone()
        jacobian[2] = jacobian[0] + jacobian[1]
    rule = build_weighting("cagrad", tasks_of(len(jacobian)), c=0.4)
    _, direction = run(rule, jacobian)
    assert relative(direction, cagrad_slsqp(jacobian, 0.4)) < 1e-5
    g0 = jacobian.mean(0)  # d is on the ball's surface and attains the primal's optimum
    assert float((direction - g0).norm()) == pytest.approx(0.4 * float(g0.norm()), rel=1e-9)
    best = cagrad_primal_value(jacobian, 0.4)
    assert (
        float((jacobian @ direction).min()) >= best - 1e-6 * float(jacobian.norm(dim=1).max()) ** 2
    )


def test_cagrad_random_problems_torchjd_agreement_rescale_and_scale_freedom() -> None:
    for seed in range(4):
        k = 2 + seed % 3
        jacobian = gaussian(k, 12, 20 + seed)
        jacobian[1] -= jacobian[0]
        rule = build_weighting("cagrad", tasks_of(k), c=0.5)
        weights, direction = run(rule, jacobian)
        assert relative(direction, cagrad_slsqp(jacobian, 0.5)) < 1e-5
        # torchjd solves the same dual with CLARABEL's default tolerances: up to ~1e-4 off (notes)
        assert relative(direction, reference(jd.CAGrad(c=0.5), jacobian)) < 1e-3
        # the official code's rescale options divide d by 1 + c² or 1 + c
        for option, divisor in ((1, 1.25), (2, 1.5)):
            scaled = build_weighting("cagrad", tasks_of(k), c=0.5, rescale=option)
            torch.testing.assert_close(run(scaled, jacobian)[0], weights / divisor)
        # small gradients (trace of G below torchjd's norm_eps) give the same, scaled direction
        _, small = run(rule, jacobian * 1e-4)
        assert relative(small, direction * 1e-4) < 1e-8
    assert float(reference(jd.CAGrad(c=0.5), jacobian * 1e-4).norm()) == 0.0  # torchjd: zero
    with pytest.raises(ConfigError, match="rescale"):
        build_weighting("cagrad", ["a", "b"], rescale=3)


def test_cagrad_active_set_and_conic_program_give_the_same_optimum() -> None:
    """Up to 4 tasks the active set (tried first) and the conic program it falls back on agree,
    on regular and wide (k > D) problems; the program is a DPP one, compiled once per k."""
    for seed, k, n in ((0, 2, 12), (1, 3, 12), (2, 4, 12), (3, 4, 3), (4, 3, 2)):
        jacobian = gaussian(k, n, 40 + seed)
        jacobian[1] -= jacobian[0]
        gram = (jacobian @ jacobian.T).numpy()
        gram = gram / np.trace(gram)
        linear, phi = gram.sum(1) / k, 0.5 * np.sqrt(gram.sum()) / k
        solver = CAGradSolver(k)
        assert solver.problem.is_dcp(dpp=True)
        conic = CAGradSolver.polish(gram, linear, phi, solver.solve(gram, linear, phi))
        weights = cagrad_weights(torch.from_numpy(gram), 0.5).numpy()
        assert conic is not None
        np.testing.assert_allclose(weights, 1 / k + phi * conic, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------- UPGrad and DualProj
@pytest.mark.parametrize("corner_name", ["regular", "zero", "scales", "dependent", "wide"])
def test_dual_cone_projections_are_exact(corner_name: str) -> None:
    """KKT of ``min vᵀGv, v ≥ u``: ``Gv ≥ 0`` (no conflict), ``v ≥ u``, ``(Gv)ᵢ(vᵢ−uᵢ) = 0``."""
    jacobian = corner(corner_name)
    k = len(jacobian)
    gram = jacobian @ jacobian.T
    for name in ("upgrad", "dualproj"):
        _, direction = run(build_weighting(name, tasks_of(k)), jacobian)
        products = jacobian @ direction  # gᵢ·d ≥ 0: d conflicts with no task, at any scale
        assert (products >= -1e-9 * jacobian.norm(dim=1) * direction.norm()).all(), name
    from lightning_mtl.weighting.dual_cone import dual_cone_weights

    for u in torch.eye(k, dtype=torch.float64) / k:
        v = dual_cone_weights(gram, u)
        pushed = gram @ v
        size = float(gram.diagonal().max()) * float(v.abs().max())
        assert (v >= u - 1e-12).all()
        assert (pushed >= -1e-9 * size).all()
        assert float(((v - u) * pushed).abs().max()) <= 1e-9 * size * float((v - u).abs().max() + 1)


def test_dual_cone_rules_equal_torchjd_without_its_regularisation() -> None:
    projector = QuadprogProjector(reg_eps=1e-10)
    for corner_name in ("regular", "dependent"):
        jacobian = corner(corner_name)
        k = len(jacobian)
        for name, make in (("upgrad", jd.UPGrad), ("dualproj", jd.DualProj)):
            _, direction = run(build_weighting(name, tasks_of(k)), jacobian)
            assert relative(direction, reference(make(projector=projector), jacobian)) < 1e-6
    # torchjd's defaults: the trace of G below 1e-4 turns UPGrad into the mean
    jacobian = corner("regular") * 1e-4
    _, direction = run(build_weighting("upgrad", tasks_of(3)), jacobian)
    mean = jacobian.mean(0)
    assert relative(reference(jd.UPGrad(), jacobian), mean) < 1e-12
    assert relative(direction, mean) > 1e-2
    exact = QuadprogProjector(norm_eps=0.0, reg_eps=1e-10)
    assert relative(direction, reference(jd.UPGrad(projector=exact), jacobian)) < 1e-6


def test_fairgrad_solves_its_equation_at_any_scale() -> None:
    """``wᵢ (Gw)ᵢ = 1`` (α = 1); torchjd's least squares on G stops short with scales 1e4 apart."""
    for corner_name in ("regular", "scales", "zero", "wide"):
        jacobian = corner(corner_name)
        k = len(jacobian)
        weights, _ = run(build_weighting("fairgrad", tasks_of(k), alpha=1.0), jacobian)
        live = jacobian.norm(dim=1) > 0
        gram = (jacobian @ jacobian.T)[live][:, live]
        products = weights[live] * (gram @ weights[live])
        torch.testing.assert_close(products, torch.ones_like(products), rtol=0, atol=1e-6)
        assert bool((weights[~live] == 0).all())  # a zero gradient: no solution, weight 0
    jacobian = corner("scales")
    official = reference(jd.FairGrad(alpha=1.0), jacobian)
    ours = run(build_weighting("fairgrad", tasks_of(3)), jacobian)[1]
    assert relative(official, ours) > 0.1
    for alpha in (0.5, 2.0):  # G w = w^(-1/α)
        rule = build_weighting("fairgrad", tasks_of(3), alpha=alpha)
        weights, _ = run(rule, corner("regular"))
        gram = corner("regular") @ corner("regular").T
        torch.testing.assert_close(gram @ weights, weights ** (-1 / alpha), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------- Nash-MTL
def test_nash_mtl_equals_torchjd_over_successive_warm_started_calls() -> None:
    for k in (3, 5):
        rule = build_weighting("nash_mtl", tasks_of(k))
        official = jd.NashMTL(n_tasks=k)
        generator = torch.Generator().manual_seed(30 + k)
        for _ in range(4):
            jacobian = torch.randn(k, 30, generator=generator, dtype=torch.float64)
            jacobian[1] -= 0.5 * jacobian[0]
            weights, _ = run(rule, jacobian)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = official.weighting(jacobian)
            assert relative(weights, expected) < 1e-5
        solver = rule._solvers[k]  # one DPP program per number of tasks, reused
        assert list(rule._solvers) == [k] and solver.problem.is_dcp(dpp=True)
        # the solution satisfies the paper's equation αᵢ (Gα)ᵢ = 1 (before the clipping)
        alpha = rule.solution.double()
        gram = jacobian @ jacobian.T
        assert float((alpha * (gram @ alpha) - 1).abs().max()) < 1e-2


def test_nash_mtl_zero_gradient_and_no_solution(caplog) -> None:
    jacobian = corner("zero")
    weights, _ = run(build_weighting("nash_mtl", tasks_of(3)), jacobian)
    alone, _ = run(build_weighting("nash_mtl", tasks_of(2)), jacobian[[0, 2]])
    assert float(weights[1]) == 0.0  # left out of the bargaining; the others bargain alone
    torch.testing.assert_close(weights[[0, 2]], alone)
    rule = build_weighting("nash_mtl", tasks_of(2))
    with caplog.at_level(logging.WARNING):
        weights, direction = run(rule, corner("antiparallel"))
    assert "no bargaining solution" in caplog.text  # the previous weights (ones), clipped to 1
    assert float(weights[0]) == pytest.approx(float(weights[1]))
    assert float(direction.norm()) == pytest.approx(1.0)


# ------------------------------------------------------- an absent task keeps its state
@pytest.mark.parametrize("name", ["gradvac", "nash_mtl", "gradnorm"])
def test_absent_task_for_several_steps_keeps_its_state(name: str) -> None:
    rule = build_weighting(name, tasks_of(3), **RULES[name])
    optimizer = (
        torch.optim.SGD(rule.parameters(), lr=0.1, momentum=0.9) if name == "gradnorm" else None
    )

    def one_step(present: list[int], index: int) -> torch.Tensor:
        jacobian = gaussian(3, 20, 40 + index)
        jacobian[1] -= 0.7 * jacobian[0]
        rows = jacobian[present]
        gram, losses = rows @ rows.T, torch.full((len(present),), 1.0 + index, dtype=torch.float64)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(index)
            weights = rule.gram_weights(gram, present, losses, StepContext(step=index))
        if optimizer is not None:
            optimizer.zero_grad()
            extra = rule.extra_loss(gram, present, losses, StepContext(step=index))
            extra.backward()
            optimizer.step()  # momentum moves every weight, the absent task's too
        return weights

    one_step([0, 1, 2], 0)
    snapshot = {key: value.clone() for key, value in rule.state_dict().items()}
    held = rule.task_weight.detach()[1].clone() if name == "gradnorm" else None
    for index in range(1, 4):
        one_step([0, 2], index)
        if name == "gradnorm":  # moved by momentum, put back at the start of the next step
            assert float(rule.task_weight.detach()[1]) != float(held)
            rule.gram_weights(
                torch.eye(2, dtype=torch.float64), [0, 2], torch.ones(2), StepContext()
            )
            weight = rule.task_weight.detach()
            assert float(weight[1]) == float(held)
            assert float(weight.sum()) == pytest.approx(3.0)
    after = rule.state_dict()
    for key, value in snapshot.items():
        if key == "task_weight":
            continue
        if value.ndim >= 1 and value.shape[0] == 3:
            torch.testing.assert_close(after[key][1], value[1], msg=key, equal_nan=True)
        if value.ndim == 2:
            torch.testing.assert_close(after[key][:, 1], value[:, 1], msg=key, equal_nan=True)
    weights = one_step([0, 1, 2], 4)  # present again: it takes part, with finite weights
    assert weights.shape == (3,) and torch.isfinite(weights).all() and float(weights[1]) > 0


# ------------------------------------------------------------------- GradNorm and GradDrop
def test_gradnorm_zero_losses_give_no_nan_target() -> None:
    rule = build_weighting("gradnorm", tasks_of(2))
    gram = torch.tensor([[4.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    rule.gram_weights(gram, [0, 1], zero, StepContext())
    extra = rule.extra_loss(gram, [0, 1], zero, StepContext())
    extra.backward()
    assert torch.isfinite(extra) and torch.isfinite(rule.task_weight.grad).all()


def test_graddrop_corners_keep_or_sum_gradients() -> None:
    rule = build_weighting("graddrop", tasks_of(3))
    row = corner("one")
    _, direction = run(rule, row, present=[0])
    torch.testing.assert_close(direction, row[0])  # purity 0 or 1: all of it is kept
    rows = corner("zero")
    _, direction = run(rule, rows)
    assert torch.isfinite(direction).all()
    kept = (direction == rows[0]) | (direction == rows[2]) | (direction == rows[0] + rows[2])
    assert bool(kept.all())  # each element: one sign's gradients, the zero task adds nothing
    assert type(rule).reuses_weights is False  # update_every > 1 has no weights to reuse


def test_nash_mtl_norm_of_a_round_off_negative_quadratic_form(monkeypatch) -> None:
    """Exactly anti-parallel gradients: αᵀGα can come out as −1e-16 in float64; the rescaling
    must read it as 0 (it took a complex square root and crashed before), not as a norm."""
    from lightning_mtl.weighting.nash_mtl import NashSolver

    monkeypatch.setattr(NashSolver, "solve", lambda self, *a: (np.array([1.0, 1.0]), False))
    gram = torch.tensor([[1.0, -1.0], [-1.0, 1.0 - 1e-16]], dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)
    assert float(ones @ gram @ ones) < 0
    rule = build_weighting("nash_mtl", tasks_of(2))
    weights = rule.gram_weights(gram, [0, 1], torch.ones(2), StepContext())
    assert weights.tolist() == [1.0, 1.0]  # norm 0: nothing to clip


def test_rank_cut_follows_the_precision_of_the_gradients() -> None:
    """Full float32: singular values of the unit gradients below 1e-5 of the largest are noise;
    under autocast (or TF32 on CUDA) the gradients carry ~1e-3 noise and the cut is k·eps₃₂ on
    the eigenvalues (~6e-4 on the singular values at k = 3)."""
    from lightning_mtl.weighting.aggregators import rank_tolerance

    values = torch.tensor([1e-9, 1.0, 2.0], dtype=torch.float64)
    assert rank_tolerance(values) == pytest.approx(2.0 * 1e-10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coarse = rank_tolerance(values)
    assert coarse == pytest.approx(2.0 * 3 * float(torch.finfo(torch.float32).eps))
    # IMTL-G on g₃ = g₁ + g₂ with 3e-5 relative noise: the fine cut inverts the noise, the
    # reduced-precision cut reads it as the dependence it is
    rows = gaussian(3, 100_000, 9)
    noisy = rows.clone()
    noisy[2] = (rows[0] + rows[1]) * (1 + 3e-5 * gaussian(1, 100_000, 10)[0])
    exact = rows.clone()
    exact[2] = rows[0] + rows[1]
    expected = imtl_g_from_svd(exact)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, direction = run(build_weighting("imtl_g", tasks_of(3)), noisy)
    assert relative(direction, expected) < 1e-3
