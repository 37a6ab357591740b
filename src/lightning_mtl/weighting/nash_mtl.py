"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution between the tasks.

Find w > 0 with ``(G w)ᵢ = 1/wᵢ`` for every task, i.e. each task's share of the update,
``gᵢ·d`` with ``d = Jᵀw``, is inversely proportional to its weight; solved by the paper's
sequence of convex programs (cvxpy/ECOS, ``optim_niter`` iterations, warm-started from the
previous solution), and ``‖d‖`` clipped to ``max_norm``. ``update_weights_every`` re-solves only
every that many steps (the paper's cheaper variant) and reuses the weights in between.

The solver is torchjd's. It reads the Jacobian, but only through ``J Jᵀ``, so it gets a k×k
factor M with ``M Mᵀ = G`` (from an eigendecomposition) instead: the same weights without a
k×D matrix. The previous solution and the last weights are buffers of this module
(checkpointed), so a resumed run warm-starts where it stopped; a task absent from a batch keeps
its entry. One solver per set of present tasks is built lazily.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torchjd import aggregation as jd

from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


def gram_factor(gram: torch.Tensor) -> torch.Tensor:
    """A square M with ``M Mᵀ = G`` for a symmetric PSD G (negative round-off clipped)."""
    values, vectors = torch.linalg.eigh(gram)
    return vectors * values.clamp_min(0).sqrt()


@WEIGHTINGS.register("nash_mtl")
class NashMTL(GradientWeighting):
    """Nash-MTL; see the module docstring for ``max_norm``, ``update_weights_every``, ``optim_niter``."""

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ) -> None:
        super().__init__(tasks, level, seed)
        if update_weights_every < 1:
            raise ValueError(f"weighting.update_weights_every={update_weights_every}; need >= 1")
        k = len(self.tasks)
        self.max_norm, self.every, self.optim_niter = max_norm, update_weights_every, optim_niter
        self.register_buffer("solution", torch.ones(k, dtype=torch.float64))
        self.register_buffer("last_weights", torch.ones(k, dtype=torch.float64))
        self.register_buffer("calls", torch.tensor(0))
        self._solvers: dict[tuple[int, ...], jd.NashMTL] = {}

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        calls = int(self.calls)
        self.calls += 1
        if calls % self.every != 0:
            return self.last_weights[present].to(gram)
        key = tuple(present)
        if key not in self._solvers:
            self._solvers[key] = jd.NashMTL(
                n_tasks=len(present), max_norm=self.max_norm, optim_niter=self.optim_niter
            )
        solver = self._solvers[key].weighting
        solver.prvs_alpha = self.solution[present].cpu().numpy().astype(np.float64)
        with warnings.catch_warnings():
            # cvxpy notes once per solve that the paper's problem is not DPP (no speed-up on
            # re-solving); it is expected and says nothing about the result
            warnings.filterwarnings("ignore", message=".*not DPP.*")
            weights = solver(gram_factor(gram))
        self.solution[present] = torch.as_tensor(solver.prvs_alpha, dtype=torch.float64).to(
            self.solution
        )
        self.last_weights[present] = weights.to(self.last_weights)
        return weights
