"""IMTL-L, the loss-balance half of Impartial Multi-Task Learning (Liu, Li, Kuang, Xue, Chen,
Yang, Liao & Zhang, ICLR 2021, "Towards Impartial Multi-task Learning").

Each task has a learned scale ``sᵢ`` and the objective is

    L = Σᵢ (exp(sᵢ)·(Lᵢ − mᵢ) − sᵢ)

(``mᵢ`` the loss's known lower bound ``min_losses``, 0 by default: the paper's objective).
Minimising over sᵢ gives ``exp(sᵢ) = 1/(Lᵢ − mᵢ)``: every scaled distance is driven to 1, so no
task dominates by the scale of its loss. Unlike uncertainty weighting there is no ½ and the
regulariser is linear, which makes the balance exact rather than ½-scaled. The shift is a
constant: the network's gradient is the same with or without it (``exp(sᵢ)·∇Lᵢ``); only sᵢ's
optimum moves. The ``sᵢ`` are parameters trained by the model's single optimizer (no weight
decay). Cost per step: k exponentials.

Corners:

* Tasks absent from a step: no term, so their sᵢ get no gradient. One task present: its term.
* ``Lᵢ < mᵢ`` is refused (``ValueError``: set ``weighting.min_losses``): the objective is unbounded
  below there (sᵢ → +∞). ``Lᵢ = mᵢ`` exactly is the paper's algorithm at its edge: sᵢ's optimum
  is +∞, so sᵢ rises by its learning rate per step, finite, and its weight grows.
* A non-finite loss: that task's term becomes ``0·Lᵢ`` (weight 0, no gradient to sᵢ) and the
  others are unchanged (:func:`~lightning_mtl.weighting.loss_checks.skip_non_finite`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_mtl.weighting.base import Combined, StepContext, Weighting
from lightning_mtl.weighting.loss_checks import distance_to_bound, lower_bounds, skip_non_finite
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("imtl_l")
class ImpartialLossScaling(Weighting):
    """Learned loss scales ``exp(sᵢ)`` with the objective ``Σ exp(sᵢ)(Lᵢ − mᵢ) − sᵢ``."""

    # buffers (register_buffer in __init__), declared for the type checker
    min_losses: torch.Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        init_scale: float = 0.0,
        min_losses: float | Sequence[float] | Mapping[str, float] = 0.0,
    ) -> None:
        super().__init__(tasks)
        self.log_scales = nn.Parameter(torch.full((len(self.tasks),), float(init_scale)))
        bounds = lower_bounds(self.tasks, min_losses, "imtl_l")
        self.register_buffer("min_losses", bounds, persistent=False)

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        return skip_non_finite(self, losses, context, self._combine_finite)

    def _combine_finite(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        names = [name for name in self.tasks if name in losses]
        index = [self.index[name] for name in names]
        s = self.log_scales[index]
        vector = torch.stack([losses[name].float() for name in names])
        distance_to_bound(self, vector, index)
        shifted = vector - self.min_losses[index].to(vector)
        weights = torch.exp(s)
        total = (weights * shifted - s).sum()
        return Combined(total, dict(zip(names, weights.detach(), strict=True)))
