"""FairGrad (Ban & Ji, ICML 2024): α-fair allocation of the update, ``G w = w^(−1/α)``, solved for
per-task scaled unknowns."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchjd import aggregation as jd

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.aggregators import (
    zero_gradients,
)
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("fairgrad")
class FairGrad(GradientWeighting):
    """FairGrad (Ban & Ji, ICML 2024): α-fair utility maximisation over the tasks.

    Solves ``G w = w^{-1/α}`` (elementwise) for w > 0 with torchjd's rule (scipy's
    ``least_squares`` from ``1/k``, as the official code): α = 1 is proportional fairness (as
    Nash-MTL), α → ∞ approaches max-min fairness, α = 0 is the mean. Cost: a small root solve.

    Wrapped: torchjd's solver runs on the scaled unknowns ``yᵢ = wᵢ / sᵢ`` with
    ``sᵢ = ‖gᵢ‖^{-2α/(α+1)}`` (each task's solution alone), i.e. on ``H y = y^{-1/α}`` with
    ``Hᵢⱼ = Gᵢⱼ sⱼ sᵢ^{1/α}`` of unit diagonal (for α = 1 the cosine matrix). On G itself,
    least squares stops ~1e-3 short for gradients 1e4 apart in scale (its tolerances are absolute
    in w); in the regular case both give the same root. A zero gradient has no solution
    (``0 = w^{-1/α}``; least squares drifts to w ≈ 600): it gets weight 0 and the others are solved
    alone (the direction is the same). One task: ``w = ‖g‖^{-2α/(α+1)}``. When no positive solution
    exists (gradients so conflicting that no direction improves all tasks, e.g. anti-parallel)
    the least-squares point is used, as the
    official code does, with a warning.
    """

    exact_gram = True  # a solve/pseudo-inverse/eigen cut-off of G: G in float64

    def __init__(
        self, tasks: Sequence[str], level: str = "representation", seed: int = 0, alpha: float = 1.0
    ) -> None:
        super().__init__(tasks, level, seed)
        if not alpha >= 0:
            raise ConfigError(f"weighting.alpha={alpha}: expected a number >= 0")
        self.alpha = float(alpha)
        self._rule = jd.FairGradWeighting(alpha=self.alpha)

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        m = len(present)
        if self.alpha == 0:
            return gram.new_full((m,), 1.0 / m)
        weights = gram.new_zeros(m)
        live = (~zero_gradients(gram)).nonzero().flatten()
        if len(live) == 0:
            return weights
        block = gram[live][:, live]
        # wᵢ = sᵢ yᵢ, sᵢ = ‖gᵢ‖^(-2α/(α+1)) each task's own solution: H y = y^(-1/α), diag H = 1
        own = block.diagonal().sqrt() ** (-2 * self.alpha / (self.alpha + 1))
        scaled = block * own[None, :] * (own ** (1 / self.alpha))[:, None]
        solution = self._rule(scaled) if len(live) > 1 else gram.new_ones(1)
        residual = scaled @ solution - solution.clamp_min(1e-300) ** (-1 / self.alpha)
        if float(residual.norm()) > 1e-4 * float(solution.pow(-1 / self.alpha).norm()):
            self.warn_once(
                "fairgrad-no-solution",
                "FairGrad: G w = w^(-1/alpha) has no positive solution for tasks %s (their "
                "gradients conflict so that no direction improves all of them); using the "
                "least-squares point, as the official code does",
                [self.tasks[present[i]] for i in live.tolist()],
            )
        weights[live] = solution.to(weights) * own
        return weights
