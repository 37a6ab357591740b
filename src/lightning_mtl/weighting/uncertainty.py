"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, "Multi-Task Learning Using
Uncertainty to Weigh Losses for Scene Geometry and Semantics").

Each task has a learned log-variance ``sᵢ = log σᵢ²`` and the objective is

    L = Σᵢ ½·exp(−sᵢ)·(Lᵢ − mᵢ) + ½·sᵢ

(the Gaussian-likelihood form, used for every task as in most re-implementations; ``mᵢ`` is the
loss's known lower bound ``min_losses``, 0 by default: the paper's objective). A task with a
large, noisy loss learns a large σᵢ and is down-weighted; the ``½ sᵢ`` term keeps σᵢ from growing
without bound. At the optimum ``exp(sᵢ) = Lᵢ − mᵢ``, so the effective weight ``½·exp(−sᵢ)`` is
about ``1 / (2 (Lᵢ − mᵢ))``. The shift is a constant: the network's gradient is the same with or
without it (``½·exp(−sᵢ)·∇Lᵢ``); only sᵢ's optimum moves. The ``sᵢ`` are parameters trained by
the model's single optimizer (no weight decay). Cost per step: k exponentials, nothing else.

Corners:

* Tasks absent from a step: no term, so their sᵢ get no gradient. One task present: its term.
* ``Lᵢ < mᵢ`` is refused (``ValueError``: set ``weighting.min_losses``): the objective is unbounded
  below there (sᵢ → −∞). ``Lᵢ = mᵢ`` exactly is the paper's algorithm at its edge: sᵢ's optimum
  is −∞, so sᵢ falls by its learning rate × ½ per step, finite, and its weight grows.
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


@WEIGHTINGS.register("uncertainty")
class Uncertainty(Weighting):
    """Learned homoscedastic-uncertainty weights; ``init_log_var`` is the initial ``sᵢ``,
    ``min_losses`` the losses' lower bounds."""

    # buffers (register_buffer in __init__), declared for the type checker
    min_losses: torch.Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        init_log_var: float = 0.0,
        min_losses: float | Sequence[float] | Mapping[str, float] = 0.0,
    ) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init_log_var)))
        bounds = lower_bounds(self.tasks, min_losses, "uncertainty")
        self.register_buffer("min_losses", bounds, persistent=False)

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        return skip_non_finite(self, losses, context, self._combine_finite)

    def _combine_finite(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        names = [name for name in self.tasks if name in losses]
        index = [self.index[name] for name in names]
        s = self.log_vars[index]
        vector = torch.stack([losses[name].float() for name in names])
        distance_to_bound(self, vector, index)
        shifted = vector - self.min_losses[index].to(vector)
        weights = 0.5 * torch.exp(-s)
        total = (weights * shifted + 0.5 * s).sum()
        return Combined(total, dict(zip(names, weights.detach(), strict=True)))
