"""LDC-MTL (Xiao, Dong, Zou & Ji, 2025, "LDC-MTL: Balancing Multi-Task Learning through Scalable
Loss Discrepancy Control", arXiv 2502.08585; its first version is titled "Scalable Bilevel Loss
Balancing for Multi-Task Learning").

A router gives the tasks weights ``σ = softmax(W)`` on the simplex. After a coarse
pre-normalisation of each loss, ``ℓ̃ᵢ``, the bilevel problem is: the model x minimises the
weighted loss ``g = Σᵢ σᵢ ℓ̃ᵢ``, and the router W minimises the *loss discrepancy* of the
weighted losses, consecutive tasks taken in task order,

    f = Σᵢ₌₁..ₘ₋₁ | σᵢ ℓ̃ᵢ − σᵢ₊₁ ℓ̃ᵢ₊₁ |.

Its scalable first-order algorithm (O(1): no per-task gradient, no inner loop) penalises the
lower level into one single-level objective, which the official code descends for model and
router alike

    F = g + λ f        (λ = ``penalty``; the official code's ``lamb``)

The model receives ``Σᵢ wᵢ ∇Lᵢ`` with ``wᵢ = ℓ̃ᵢ′ σᵢ (1 + λ (sᵢ − sᵢ₋₁))``,
``sᵢ = sign(σᵢℓ̃ᵢ − σᵢ₊₁ℓ̃ᵢ₊₁)`` (s₀ = sₘ = 0), ``ℓ̃ᵢ′ = dℓ̃ᵢ/dLᵢ``: a task whose weighted loss
exceeds its neighbours' gets a little more weight (without bounds, all are ≥ 0 when λ ≤ ½).
The router receives ∇_W F: the discrepancy term pulls the weighted losses together, g's moves
weight towards the tasks with the smallest normalised loss, so over a long run σ can concentrate
on one task; the official NYUv2 and Cityscapes code clamps σ to [0.2, 0.8] against this
(``weight_bounds``; g is then divided by Σσ, as there, and wᵢ's ``1`` becomes ``1/Σσ``).

``normalization`` (the paper's pre-normalisations, one per experiment of the official code):
``initial`` (default) ``ℓ̃ᵢ = Dᵢ / Dᵢ(0)``, each loss in units of its first value (the method is
then invariant to the scale of any loss); ``log``: ``log(Dᵢ / Dᵢ(0))`` (the QM9 code);
``none``: ``ℓ̃ᵢ = Lᵢ`` (the Cityscapes code). ``Dᵢ = Lᵢ − min_lossᵢ + ε`` (ε = 1e-8) and
``Dᵢ(0)`` is task i's first finite loss, kept in a buffer. The official NYUv2 code also
multiplies ``initial`` by the smallest first loss of all tasks: a constant factor on the whole
objective (i.e. on the learning rate), left out here so that a task appearing late changes
nothing for the others.

How this maps onto one optimizer and :class:`LossWeighting`:

* The router is a free logit per task (``logits``, an ``nn.Parameter``): the official CelebA
  and QM9 experiments also learn one free parameter per task (through a sigmoid; we keep the
  softmax of the other routers), while the NYUv2 and Cityscapes routers feed pooled decoder
  features to a linear layer, which a balancer (it sees losses only) cannot do.
* Model and router are trained by the model's single optimizer, as in the official code (one
  Adam over both): the logits sit in the ``weighting`` parameter group (no weight decay), with
  their own ``lr`` when ``lr`` is set, else the model's. No bilevel inner loop, no second
  optimizer.
* The step's loss is ``Σ wᵢ Lᵢ + (F_W − F_W.detach())``: the first term gives the model F's
  gradient, the second (zero in value) gives the logits F's gradient, ``F_W`` being F evaluated
  on the detached, DDP-global loss values. Every rank thus computes the same weights and the
  same router gradient, also for a task that this rank did not label.

Corners: one present task gets weight ``ℓ̃′`` and no router gradient; a task absent from a step
leaves the router softmax and the discrepancy chain (σ is the softmax over the present tasks),
its first loss is kept and its logit gets a zero gradient (an optimizer with momentum may still
move it, as for ``uncertainty``'s log-variances); with ``initial``/``log`` a loss below its
``min_losses`` bound is refused (``ValueError``: set ``weighting.min_losses``) and a loss at its
bound has D = ε (with ``initial``, a first loss at its bound makes that task's ℓ̃ huge
afterwards: set the bound below the loss's first value); a NaN or infinite loss makes the step
weight the other tasks as if that task were absent (weight 0, no router term for it, its first
loss not recorded, one warning; :func:`~lightning_mtl.weighting.loss_checks.skip_non_finite`).
Cost per step: O(k), plus the k logits in the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.base import Combined, LossWeighting, StepContext
from lightning_mtl.weighting.loss_checks import (
    EPS,
    CheckedLossWeighting,
    distance_to_bound,
    lower_bounds,
)
from lightning_mtl.weighting.registry import WEIGHTINGS

NORMALIZATIONS = ("initial", "log", "none")


@WEIGHTINGS.register("ldc_mtl")
class LDCMTL(CheckedLossWeighting, LossWeighting):
    """LDC-MTL with discrepancy ``penalty`` λ ≥ 0, loss ``normalization``, router learning rate
    ``lr`` (None: the model's) and each loss's lower bound ``min_losses``."""

    # buffers (register_buffer in __init__), declared for the type checker
    min_losses: torch.Tensor
    initial: torch.Tensor

    reads_loss_values = True

    def __init__(
        self,
        tasks: Sequence[str],
        penalty: float = 0.05,
        normalization: str = "initial",
        lr: float | None = None,
        weight_bounds: Sequence[float] | None = None,
        min_losses: float | Sequence[float] | Mapping[str, float] = 0.0,
    ) -> None:
        super().__init__(tasks)
        if not isinstance(penalty, int | float) or not 0 <= penalty < math.inf:
            raise ConfigError(f"weighting.penalty={penalty!r}; expected a number >= 0")
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"weighting.normalization={normalization!r}; accepted: {', '.join(NORMALIZATIONS)}"
            )
        if lr is not None:
            if not isinstance(lr, int | float) or not 0 < lr < math.inf:
                raise ConfigError(f"weighting.lr={lr!r}; expected a number > 0 or null")
            self.optimizer_options = {"lr": float(lr)}
        self.weight_bounds = self._check_bounds(weight_bounds)
        self.penalty, self.normalization = float(penalty), normalization
        k = len(self.tasks)
        self.logits = nn.Parameter(torch.zeros(k))
        bounds = lower_bounds(self.tasks, min_losses, "ldc_mtl")
        self.register_buffer("min_losses", bounds, persistent=False)
        self.register_buffer("initial", torch.full((k,), math.nan, dtype=torch.float64))
        self._router_objective: torch.Tensor | None = None

    @staticmethod
    def _check_bounds(bounds: Sequence[float] | None) -> tuple[float, float] | None:
        if bounds is None:
            return None
        numbers = list(bounds)
        if (
            len(numbers) != 2
            or not all(isinstance(v, int | float) for v in numbers)
            or not 0 <= numbers[0] < numbers[1] <= 1
        ):
            raise ConfigError(
                f"weighting.weight_bounds={bounds!r}; expected null or [low, high] with "
                "0 <= low < high <= 1 (the official NYUv2 and Cityscapes runs use [0.2, 0.8])"
            )
        return float(numbers[0]), float(numbers[1])

    def router_weights(self, present: Sequence[int] | None = None) -> torch.Tensor:
        """σ: the softmax of the logits over ``present`` (default: all tasks), clamped to
        ``weight_bounds`` if set."""
        logits = self.logits if present is None else self.logits[list(present)]
        sigma = torch.softmax(logits, dim=0)
        return sigma if self.weight_bounds is None else sigma.clamp(*self.weight_bounds)

    def _normalized(
        self, values: torch.Tensor, present: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ℓ̃ and dℓ̃/dL (float64) of the ``present`` tasks; records their first distances."""
        values = values.double()
        if self.normalization == "none":
            return values, torch.ones_like(values)
        distance = distance_to_bound(self, values, present) + EPS
        index = torch.tensor(present, device=self.initial.device)
        first = self.initial[index]
        first = torch.where(torch.isnan(first), distance.to(first), first)
        self.initial[index] = first
        first = first.to(distance)
        if self.normalization == "initial":
            return distance / first, 1.0 / first
        return torch.log(distance / first), 1.0 / distance

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        scaled, slope = self._normalized(self.loss_values(losses, present, context), present)
        sigma = self.router_weights(present)
        weighted = sigma * scaled.to(sigma)
        gaps = weighted[:-1] - weighted[1:]
        total = sigma.sum()  # 1 unless clamped: g is then divided by it, as in the NYUv2 code
        self._router_objective = weighted.sum() / total + self.penalty * gaps.abs().sum()
        signs = torch.sign(gaps.detach()).double()
        zero = signs.new_zeros(1)
        pull = torch.cat([signs, zero]) - torch.cat([zero, signs])
        sigma = sigma.detach().double()
        return slope * sigma * (1.0 / sigma.sum() + self.penalty * pull)

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        """``Σ wᵢ Lᵢ`` plus the zero-valued router term ``F_W − F_W.detach()``."""
        combined = super().combine(losses, context)
        router, self._router_objective = self._router_objective, None
        extra = router - router.detach() if router is not None else self.zero_term()
        return Combined(combined.loss + extra.to(combined.loss), combined.weights)
