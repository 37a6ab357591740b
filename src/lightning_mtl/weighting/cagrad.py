"""CAGrad, Conflict-Averse Gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021): the
paper's dual solved exactly on G (torchjd's returns an all-zero update below an absolute
``norm_eps``; ``docs/torchjd_notes.md``)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import cvxpy as cp
import numpy as np
import torch
from scipy.optimize import minimize

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.aggregators import (
    psd_factor,
)
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


class CAGradSolver:
    """CAGrad's dual on the simplex for m tasks, built once as a DPP cvxpy problem and reused.

    ``min_{w ∈ Δ} bᵀw + ‖A w‖`` with ``b = G 1/m`` and ``A = φ Mᵀ`` (``M Mᵀ = G``, ``φ = c‖g₀‖``)
    as parameters, solved by CLARABEL; :meth:`polish` then solves the optimality conditions on
    the solution's support exactly: in the regular case the direction is exact to round-off.
    """

    def __init__(self, m: int) -> None:
        self.w = cp.Variable(m, nonneg=True)
        self.linear = cp.Parameter(m)
        self.factor = cp.Parameter((m, m))
        objective = cp.Minimize(self.linear @ self.w + cp.norm(self.factor @ self.w, 2))
        self.problem = cp.Problem(objective, [cp.sum(self.w) == 1])

    def solve(self, gram: np.ndarray, linear: np.ndarray, phi: float) -> np.ndarray | None:
        """The dual's solution w* (None if the solver fails)."""
        self.linear.value = linear
        self.factor.value = phi * psd_factor(gram).T
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "may be inaccurate": the polish takes over
                self.problem.solve(solver=cp.CLARABEL)
        except cp.SolverError:
            return None
        value = self.w.value
        return None if value is None else np.clip(np.asarray(value, dtype=np.float64), 0, None)

    @staticmethod
    def slsqp(gram: np.ndarray, linear: np.ndarray, phi: float) -> np.ndarray:
        """The dual by scipy's SLSQP from ``1/m``, as the official code solves it."""
        m = len(gram)

        def objective(w: np.ndarray) -> float:
            return float(linear @ w + phi * np.sqrt(max(w @ gram @ w, 0.0) + 1e-30))

        result = minimize(
            objective,
            np.full(m, 1.0 / m),
            method="SLSQP",
            bounds=[(0.0, 1.0)] * m,
            constraints={"type": "eq", "fun": lambda w: 1.0 - w.sum()},
            options={"ftol": 1e-12, "maxiter": 500},
        )
        return np.clip(np.asarray(result.x, dtype=np.float64), 0.0, None)

    @staticmethod
    def polish(
        gram: np.ndarray, linear: np.ndarray, phi: float, start: np.ndarray
    ) -> np.ndarray | None:
        """The exact solution ``y`` (weights ``1/m + φ y``) by an active set started at ``start``.

        On the support S the optimum satisfies ``g_i·d = λ`` (i ∈ S) with ``d = g₀ + φ J_Sᵀ y``,
        ``‖J_Sᵀ y‖ = 1``, ``y ≥ 0``, and ``g_i·d ≥ λ`` outside S: a quadratic in λ
        (the larger root). A negative ``y_i`` leaves S, a violated task joins it. None when the
        conditions cannot be met (e.g. the optimum is at ``g_w = 0``).
        """
        m = len(gram)
        support = set(np.flatnonzero(start > 1e-6 * start.max()).tolist()) or {int(start.argmax())}
        for _ in range(2 * m + 2):
            index = sorted(support)
            block, b = gram[np.ix_(index, index)], linear[index]
            inverse = np.linalg.pinv(block, rcond=1e-13, hermitian=True)
            a, c = inverse.sum(1), inverse @ b
            big_a, big_c, big_b = a.sum(), c.sum(), b @ c
            discriminant = big_c**2 - big_a * (big_b - phi**2)
            if big_a <= 0 or discriminant < 0:
                return None
            level = (big_c + np.sqrt(discriminant)) / big_a
            y = (level * a - c) / phi
            size = 1.0 + phi * np.abs(block).max() * np.abs(y).sum() + abs(level)
            if np.abs(phi * block @ y + b - level).max() > 1e-9 * size:
                return None  # the system on S is inconsistent (dependent support)
            if y.min() < -1e-12 * np.abs(y).max():
                support.discard(index[int(y.argmin())])
                if not support:
                    return None
                continue
            full = np.zeros(m)
            full[index] = np.clip(y, 0, None)
            margin = gram @ (np.full(m, 1.0 / m) + phi * full) - level
            outside = [i for i in range(m) if i not in support and margin[i] < -1e-9 * size]
            if not outside:
                return full
            support.add(min(outside, key=lambda i: margin[i]))
        return None


#: up to this many tasks the active set is tried from every support before the conic program
ACTIVE_SET_TASKS = 4


def _supports(m: int) -> list[np.ndarray]:
    """Starting supports for the active set, up to ``ACTIVE_SET_TASKS`` tasks: every task, then
    each subset (at most 15 tiny solves). Beyond that none: the active set may need up to 2k
    k×k solves per start there, more than the conic program costs (at k = 40 trying the full
    support first made CAGrad's step 1.24 -> 1.41× equal)."""
    if m > ACTIVE_SET_TASKS:
        return []
    return [
        np.array([(mask >> i) & 1 for i in range(m)], dtype=np.float64)
        for mask in range(2**m - 1, 0, -1)
    ]


def cagrad_weights(
    gram: torch.Tensor, c: float, solvers: dict[int, CAGradSolver] | None = None
) -> torch.Tensor:
    """CAGrad's weights ``1/m + (c‖g₀‖/‖g_w‖) w*`` from G (float64), scale-free.

    ``w* = argmin_{w∈Δ} wᵀG1/m + c‖g₀‖ √(wᵀGw)``; the c-term is dropped when ``g_w = 0`` (the
    paper's algorithm then returns the mean gradient). ``solvers`` caches one DPP problem per m.
    """
    m = len(gram)
    uniform = gram.new_full((m,), 1.0 / m)
    trace = float(gram.diagonal().sum())
    if not trace > 0:
        return uniform  # every gradient is zero
    g = (gram / trace).double().cpu().numpy()
    g = (g + g.T) / 2
    linear = g.sum(1) / m
    phi = c * np.sqrt(max(g.sum(), 0.0)) / m
    if phi <= 0:
        return uniform  # c = 0, or the mean gradient is zero: the ball is a point
    if m == 1:
        return uniform * (1 + c)
    # For a few tasks, the active set from the full support usually meets the optimality
    # conditions in a few k×k solves (they are checked, so its answer is the optimum); with
    # dependent gradients (a singular G, as at a Pareto-stationary point) it starts from each
    # smaller support. The conic program (about 9 ms per call through cvxpy) runs otherwise.
    for start in _supports(m):
        exact = CAGradSolver.polish(g, linear, phi, start)
        if exact is not None:
            return torch.from_numpy(np.full(m, 1.0 / m) + phi * exact).to(gram)
    solvers = {} if solvers is None else solvers
    if m not in solvers:
        solvers[m] = CAGradSolver(m)
    solved = solvers[m].solve(g, linear, phi)
    # None: CLARABEL failed; the official code's solver (SLSQP) instead
    start = solved if solved is not None else CAGradSolver.slsqp(g, linear, phi)
    exact = CAGradSolver.polish(g, linear, phi, start)
    if exact is not None:
        return torch.from_numpy(np.full(m, 1.0 / m) + phi * exact).to(gram)
    norm = np.sqrt(max(start @ g @ start, 0.0))
    if norm <= 1e-6 * np.sqrt(g.diagonal().max()):
        return uniform  # g_w = 0 (0 is in the hull and optimal): the paper returns the mean
    return torch.from_numpy(np.full(m, 1.0 / m) + (phi / norm) * start).to(gram)


@WEIGHTINGS.register("cagrad")
class CAGrad(GradientWeighting):
    """CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent.

    ``max_d min_i gᵢ·d`` subject to ``‖d − g₀‖ ≤ c‖g₀‖`` (g₀ the mean gradient), through its dual
    on G: ``w* = argmin_{w∈Δ} wᵀG1/k + c‖g₀‖ √(wᵀGw)`` (``‖g₀‖² = 1ᵀG1/k²``), then
    ``d = g₀ + (c‖g₀‖/‖g_w‖) g_w``, i.e. weights ``1/k + (c‖g₀‖/‖g_w‖) w*``; c trades the worst
    task's improvement against the average (c = 0 is plain averaging).

    Ours, not torchjd's: torchjd's ``CAGradWeighting`` returns all-zero weights when G's trace or
    ``‖g_w‖`` (after normalising G) falls below an absolute ``norm_eps = 1e-4``, e.g. when one task's
    gradient is zero (the paper gives the mean gradient there) or scales are 1e4 apart. Here the
    dual is solved by an active set on its optimality conditions for up to 4 tasks, else (or where
    that does not converge) by one DPP problem per task count (CLARABEL) polished by the same
    active set (whose acceptance checks the optimality conditions to a tolerance relative to the
    solution's scale, so next to Pareto-stationary points, where that scale grows like 1/‖g_w‖,
    the answer is as good as the conic program's, not exact);
    in the regular case the weights equal torchjd's (to its solver's ~1e-8). The c-term is dropped
    exactly when ``g_w = 0`` is the optimum, as the paper's algorithm does.

    ``rescale`` as the official code: 0 returns d (torchjd's convention, the default), 1 divides
    it by ``1 + c²``, 2 by ``1 + c``. One task: ``d = (1 + c) g`` (before rescaling). Cost: up to
    4 tasks a few k×k pseudo-inverses (2 ms per call at k = 2, against 9 ms through cvxpy);
    beyond, one small conic solve, a k×k eigendecomposition and the polish.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        c: float = 0.4,
        rescale: int = 0,
    ) -> None:
        super().__init__(tasks, level, seed)
        if not c >= 0:
            raise ConfigError(f"weighting.c={c}: expected a number >= 0")
        if rescale not in (0, 1, 2):
            raise ConfigError(
                f"weighting.rescale={rescale!r}: expected 0 (d), 1 (d/(1+c²)) or 2 (d/(1+c))"
            )
        self.c, self.rescale = float(c), int(rescale)
        self._solvers: dict[int, CAGradSolver] = {}

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        weights = cagrad_weights(gram, self.c, self._solvers)
        divisor = (1.0, 1.0 + self.c**2, 1.0 + self.c)[self.rescale]
        return weights / divisor
