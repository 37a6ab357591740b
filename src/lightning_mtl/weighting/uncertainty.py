"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, "Multi-Task Learning Using
Uncertainty to Weigh Losses for Scene Geometry and Semantics").

Each task has a learned log-variance ``sᵢ = log σᵢ²`` and the objective is

    L = Σᵢ ½·exp(−sᵢ)·Lᵢ + ½·sᵢ

(the Gaussian-likelihood form, used for every task as in most re-implementations). A task with
a large, noisy loss learns a large σᵢ and is down-weighted; the ``½ sᵢ`` term keeps σᵢ from
growing without bound. At the optimum ``exp(sᵢ) = Lᵢ``, so the effective weight ``½·exp(−sᵢ)``
is about ``1 / (2 Lᵢ)``. The ``sᵢ`` are parameters trained by the model's single optimizer
(no weight decay). Cost per step: k exponentials, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_mtl.weighting.base import Combined, StepContext, Weighting
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("uncertainty")
class Uncertainty(Weighting):
    """Learned homoscedastic-uncertainty weights; ``init_log_var`` is the initial ``sᵢ``."""

    def __init__(self, tasks: Sequence[str], init_log_var: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init_log_var)))

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        names = [name for name in self.tasks if name in losses]
        s = self.log_vars[[self.index[name] for name in names]]
        vector = torch.stack([losses[name].float() for name in names])
        weights = 0.5 * torch.exp(-s)
        total = (weights * vector + 0.5 * s).sum()
        return Combined(total, dict(zip(names, weights.detach(), strict=True)))
