"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution between the tasks.

Find α > 0 with ``(G α)ᵢ = 1/αᵢ`` for every task, i.e. each task's share of the update,
``gᵢ·d`` with ``d = Jᵀα``, is inversely proportional to its weight. The paper solves it by a
sequence of convex programs; this module follows the official implementation (which torchjd's
``NashMTL`` copies): with ``Ĝ = G/‖G‖_F`` and the previous iterate αₜ,

    α_{t+1} = argmin_{α ≥ 0} Σᵢ (Ĝα)ᵢ + φ'(αₜ)ᵀα / ‖G‖_F
              s.t. log αᵢ + log (Ĝα)ᵢ ≥ −log ‖G‖_F  (i.e. αᵢ (Gα)ᵢ ≥ 1),
    φ'(αₜ) = 1/αₜ + Ĝ (1/(Ĝαₜ)),

for at most ``optim_niter`` programs, stopping (and keeping αₜ) when ``‖Ĝαₜ − 1/αₜ‖ < 1e-3``,
when ``‖α_{t+1} − αₜ‖ < 1e-6`` or when a program fails (infeasible, unbounded or a solver error:
the official code's fallback, which also happens now and then on regular problems); then
``‖d‖ = √(αᵀGα)`` is clipped to ``max_norm`` (0: no clipping). Warm start: the first αₜ is the
previous step's solution of these tasks.

Ours, not torchjd's: torchjd builds its program with the data inside non-DPP expressions, so cvxpy
compiles it again at every one of the up to ``optim_niter`` solves (0.6 s a step at 40 tasks on a
2-core CPU). Here the program is DPP (Ĝ, the linearisation ``φ'(αₜ)/‖G‖_F`` and ``−log ‖G‖_F``
are parameters), compiled once per number of bargaining tasks and re-solved with new parameter
values (ECOS, as the official code): the same weights as torchjd's (to 2e-8), 8× (3 tasks) to
30× (40 tasks) faster (``benchmarks/nash_solve.py`` times both).

Corners: one bargaining task needs no bargaining: ``αGα = 1`` gives ``α = 1/‖g‖`` (then the
clipping); a zero gradient has no solution (``0 = 1/α``), so it is left out of the bargaining
with weight 0 (torchjd's program is infeasible and falls back to its previous α); when no
direction improves every task (e.g. anti-parallel gradients) the program is infeasible and the
previous solution is kept, as the official code does, with a warning. Cost per step: at most
``optim_niter`` small conic solves (2k exponential cones each).

State: the last solution of every task (a buffer, checkpointed), read and written for the
present tasks only, so an absent task keeps its entry. ``update_every`` (every gradient
method's option) replaces the paper's ``update_weights_every``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import cvxpy as cp
import numpy as np
import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.aggregators import zero_gradients
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


class NashSolver:
    """The official implementation's convex program for m tasks, as a DPP problem built once."""

    def __init__(self, m: int) -> None:
        self.alpha = cp.Variable(m, nonneg=True)
        self.gram = cp.Parameter((m, m))
        self.linear = cp.Parameter(m)
        self.bound = cp.Parameter()
        g_alpha = self.gram @ self.alpha
        objective = cp.Minimize(cp.sum(g_alpha) + self.linear @ self.alpha)
        constraint = cp.log(self.alpha) + cp.log(g_alpha) >= self.bound
        self.problem = cp.Problem(objective, [constraint])

    def _program(self, start: np.ndarray) -> np.ndarray | None:
        """One convex program linearised at ``start`` (None: it failed; see ``problem.status``)."""
        g, bound = self.gram.value, self.bound.value
        assert bound is not None  # set by solve() before the first program
        linear = (1.0 / start + g @ (1.0 / (g @ start))) * math.exp(bound)
        if not np.isfinite(linear).all():
            return None
        self.linear.value = linear
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "may be inaccurate": the official code accepts it
                self.problem.solve(solver=cp.ECOS, max_iters=100)
        except (cp.SolverError, ValueError):
            return None
        value = self.alpha.value
        return None if value is None else np.asarray(value, dtype=np.float64)

    def solve(
        self, gram: np.ndarray, start: np.ndarray, iterations: int
    ) -> tuple[np.ndarray, bool]:
        """α from G (float64) and the warm start; also whether the program was infeasible."""
        norm = float(np.linalg.norm(gram))
        normalised = gram / norm
        self.gram.value = normalised
        self.bound.value = -math.log(norm)
        alpha = start
        for _ in range(iterations):
            following = self._program(alpha)
            if following is None:  # the official code keeps the last iterate
                return alpha, self.problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE)
            residual = np.linalg.norm(normalised @ alpha - 1 / (alpha + 1e-10))
            if residual < 1e-3 or np.linalg.norm(following - alpha) < 1e-6:
                break
            alpha = following
        return alpha, False


@WEIGHTINGS.register("nash_mtl")
class NashMTL(GradientWeighting):
    """Nash-MTL; see the module docstring for ``max_norm`` and ``optim_niter``."""

    # buffers (register_buffer in __init__), declared for the type checker
    solution: torch.Tensor

    exact_gram = True  # a solve/pseudo-inverse/eigen cut-off of G: G in float64

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        max_norm: float = 1.0,
        optim_niter: int = 20,
    ) -> None:
        super().__init__(tasks, level, seed)
        if not max_norm >= 0:
            raise ConfigError(f"weighting.max_norm={max_norm}: expected a number >= 0 (0: off)")
        if isinstance(optim_niter, bool) or int(optim_niter) != optim_niter or optim_niter < 1:
            raise ConfigError(f"weighting.optim_niter={optim_niter!r}: expected an integer >= 1")
        self.max_norm, self.optim_niter = float(max_norm), int(optim_niter)
        self.register_buffer("solution", torch.ones(len(self.tasks), dtype=torch.float64))
        #: one compiled program per number of bargaining tasks
        self._solvers: dict[int, NashSolver] = {}

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        m = len(present)
        weights = torch.zeros(m, dtype=torch.float64)
        live = (~zero_gradients(gram)).nonzero().flatten().tolist()
        if not live:
            return weights
        block = gram[live][:, live].double().cpu()
        tasks = [present[i] for i in live]
        if len(live) == 1:
            alpha = 1.0 / block.sqrt().reshape(1)
        else:
            start = self.solution[tasks].cpu().numpy()
            if len(live) not in self._solvers:
                self._solvers[len(live)] = NashSolver(len(live))
            solver = self._solvers[len(live)]
            solution, infeasible = solver.solve(block.numpy(), start, self.optim_niter)
            if infeasible:
                self.warn_once(
                    "nash-infeasible",
                    "Nash-MTL: no bargaining solution for tasks %s (no direction improves all of "
                    "them, e.g. anti-parallel gradients); keeping the last iterate (at first, the "
                    "previous step's weights), as the official code does",
                    [self.tasks[i] for i in tasks],
                )
            alpha = torch.from_numpy(solution)
        self.solution[tasks] = alpha.to(self.solution)
        # αᵀGα ≥ 0 in exact arithmetic; on a singular G (anti-parallel gradients, as at the
        # Pareto set of the CAGrad toy) round-off can make it -1e-17, whose root is complex
        norm = max(float(alpha @ block @ alpha), 0.0) ** 0.5
        if self.max_norm > 0 and norm > self.max_norm:
            alpha = alpha / norm * self.max_norm
        weights[live] = alpha
        return weights.to(gram)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # buffers of the removed update_weights_every (checkpoints written before update_every)
        for name in ("calls", "last_weights"):
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args)
