"""IMTL-L, the loss-balance half of Impartial Multi-Task Learning (Liu, Li, Kuang, Xue, Chen,
Yang, Liao & Zhang, ICLR 2021, "Towards Impartial Multi-task Learning").

Each task has a learned scale ``sᵢ`` and the objective is

    L = Σᵢ (exp(sᵢ)·Lᵢ − sᵢ)

Minimising over sᵢ gives ``exp(sᵢ) = 1/Lᵢ``: every scaled loss ``exp(sᵢ)·Lᵢ`` is driven to 1,
so no task dominates by the scale of its loss. Unlike uncertainty weighting there is no
½ and the regulariser is linear, which makes the balance exact rather than ½-scaled. The
``sᵢ`` are parameters trained by the model's single optimizer (no weight decay).
Cost per step: k exponentials.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_mtl.weighting.base import Combined, StepContext, Weighting
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("imtl_l")
class ImpartialLossScaling(Weighting):
    """Learned loss scales ``exp(sᵢ)`` with the objective ``Σ exp(sᵢ)Lᵢ − sᵢ``."""

    def __init__(self, tasks: Sequence[str], init_scale: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_scales = nn.Parameter(torch.full((len(self.tasks),), float(init_scale)))

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        names = [name for name in self.tasks if name in losses]
        s = self.log_scales[[self.index[name] for name in names]]
        vector = torch.stack([losses[name].float() for name in names])
        weights = torch.exp(s)
        total = (weights * vector - s).sum()
        return Combined(total, dict(zip(names, weights.detach(), strict=True)))
