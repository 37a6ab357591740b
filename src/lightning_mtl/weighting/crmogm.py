"""CR-MOGM weight smoothing (Zhou et al., "On the Convergence of Stochastic Multi-Objective
Gradient Manipulation and Beyond", NeurIPS 2022).

Stochastic Gram rules (MGDA, PCGrad, CAGrad, ...) compute their weights from one mini-batch, and
those noisy weights bias the combined gradient: the paper shows they need not converge. CR-MOGM
fixes it by smoothing the weights of any such rule with an exponential moving average,

    λₜ = α λₜ₋₁ + (1 − α) λ̂ₜ,   λ̂ₜ = rule(Gₜ),

and proves convergence of the smoothed method (with α → 1 as the step size decays; a fixed α
is used here, as in torchjd's ``CRMOGMWeighting``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS

#: options of the wrapped rule that come from the ``crmogm`` block itself
RESERVED = ("name", "level", "seed", "update_every", "jacobian_budget_mb")


def is_gram_rule(factory: object) -> bool:
    """Whether a registered method is a rule ``G ↦ w`` whose direction is ``Jᵀw``: a gradient
    method that reads neither the Jacobian nor a cross-batch Gram matrix, learns no parameters
    through an extra loss (GradNorm) and sends ``Σ wᵢ gᵢ`` (not GradDrop's masked sum)."""
    return (
        isinstance(factory, type)
        and issubclass(factory, GradientWeighting)
        and not getattr(factory, "needs_jacobian", False)
        and not getattr(factory, "needs_cross_gram", False)
        and factory.representation_direction is GradientWeighting.representation_direction
        and factory.extra_loss is GradientWeighting.extra_loss
    )


def gram_rule_names() -> list[str]:
    return [name for name in WEIGHTINGS.names() if is_gram_rule(WEIGHTINGS.get(name, "x"))]


@WEIGHTINGS.register("crmogm")
class CRMOGM(GradientWeighting):
    """CR-MOGM around the Gram rule ``rule`` (a weighting name, ``mgda`` by default) built with
    ``rule_options``; ``alpha`` ∈ [0, 1] weighs the previous weights (0: no smoothing, 1: the
    first weights forever).

    State: λ per task and whether the task has one yet (buffers, checkpointed), plus the wrapped
    rule's own state (its buffers, under ``inner.``). A task absent from a step keeps its λ;
    a task's first step returns λ̂ for it unchanged. Cost per step: the wrapped rule's, plus O(m).

    Corners: the weights are the wrapped rule's at the first step and whenever α = 0; one present
    task, a zero gradient or a singular G give whatever the wrapped rule gives for them, smoothed;
    a non-finite G gives NaN weights without calling the rule; a non-finite λ̂ is returned
    as is; neither is stored.
    """

    # buffers (register_buffer in __init__), declared for the type checker
    lambdas: torch.Tensor
    seen: torch.Tensor

    exact_gram = True  # a solve/pseudo-inverse/eigen cut-off of G: G in float64

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        rule: str = "mgda",
        rule_options: Mapping[str, Any] | None = None,
        alpha: float = 0.9,
    ) -> None:
        super().__init__(tasks, level, seed)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise ConfigError(f"weighting.alpha={alpha!r}; CR-MOGM needs a number in [0, 1]")
        self.alpha = float(alpha)
        self.inner = self._build_rule(rule, rule_options)
        self.reads_loss_values = self.inner.reads_loss_values
        k = len(self.tasks)
        self.register_buffer("lambdas", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(k, dtype=torch.bool))

    def _build_rule(self, rule: str, options: Mapping[str, Any] | None) -> GradientWeighting:
        factory = WEIGHTINGS.get(rule, "weighting.rule")
        if not is_gram_rule(factory):
            kind = (
                "a loss-based method"
                if not (isinstance(factory, type) and issubclass(factory, GradientWeighting))
                else "not a rule of the Gram matrix alone"
            )
            raise ConfigError(
                f"weighting.rule={rule!r} is {kind}; CR-MOGM smooths the weights of a Gram rule: "
                f"one of {', '.join(gram_rule_names())}"
            )
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"weighting.rule_options={options!r} must be a mapping of {rule}'s options"
            )
        reserved = [key for key in RESERVED if key in options]
        if reserved:
            raise ConfigError(
                f"weighting.rule_options sets {reserved}; give {', '.join(RESERVED[1:])} in the "
                "crmogm block itself (level and seed also reach the wrapped rule) and the rule's name as "
                "weighting.rule"
            )
        built = WEIGHTINGS.build(
            rule, "weighting.rule_options", self.tasks, level=self.level, seed=self.seed, **options
        )
        assert isinstance(built, GradientWeighting)
        return built

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        if not bool(torch.isfinite(gram).all()):  # the base step never passes one
            return torch.full((len(present),), math.nan, dtype=gram.dtype, device=gram.device)
        estimate = self.inner.gram_weights(gram, present, losses, context)
        if not present or not bool(torch.isfinite(estimate).all()):
            return estimate
        index = torch.tensor(present, device=self.lambdas.device)
        fresh = estimate.detach().to(self.lambdas)
        smoothed = self.alpha * self.lambdas[index] + (1.0 - self.alpha) * fresh
        smoothed = torch.where(self.seen[index], smoothed, fresh)
        self.lambdas[index] = smoothed
        self.seen[index] = True
        return smoothed.to(gram)
