"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

Learned weights wᵢ (summing to k) balance the norms of the weighted task gradients of the shared
representation, ``nᵢ = wᵢ ‖∂Lᵢ/∂z‖``, towards a common scale set by each task's training rate:

    L_grad = Σᵢ | nᵢ − mean(n) · rᵢ^α |,   rᵢ = L̃ᵢ / mean(L̃),   L̃ᵢ = Lᵢ(t) / Lᵢ(0)

with the target treated as a constant. A task that trains slowly (large rᵢ) gets a larger
gradient; ``alpha`` sets the strength of the pull.

Single optimizer: w is a parameter of this module, in the optimizer's ``weighting`` group (with
its own ``lr``, 0.025 as in the paper). The step adds ``L_grad − L_grad.detach()`` to the loss
(zero in value; its gradient reaches only w, since the norms are constants of the step), and w is
renormalised to sum to k at the start of the next step, as the paper does after each update.
The paper measures the norms at the last shared layer's weights; ``level=representation`` (the
default) measures them at the shared representation (k backward passes through the heads only),
``level=params`` at all shared parameters. The backbone receives ``Σ wᵢ ∂Lᵢ/∂θ``; each head its
own task's gradient. Lᵢ(0) are the first losses seen (global under DDP), kept in a buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("gradnorm")
class GradNorm(GradientWeighting):
    """GradNorm with asymmetry ``alpha`` and weight learning rate ``lr``."""

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        alpha: float = 1.5,
        lr: float = 0.025,
    ) -> None:
        super().__init__(tasks, level, seed)
        k = len(self.tasks)
        self.alpha = alpha
        self.optimizer_options = {"lr": lr}
        self.task_weight = nn.Parameter(torch.ones(k))
        self.register_buffer("initial_losses", torch.full((k,), float("nan"), dtype=torch.float64))

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        with torch.no_grad():  # the paper's renormalisation after each update: Σ w = k
            self.task_weight.clamp_(min=1e-4)
            self.task_weight.mul_(len(self.tasks) / self.task_weight.sum())
            index = torch.tensor(present, device=self.initial_losses.device)
            unset = torch.isnan(self.initial_losses[index])
            self.initial_losses[index] = torch.where(
                unset, losses.to(self.initial_losses), self.initial_losses[index]
            )
        return self.task_weight[present].detach().double()

    def extra_loss(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor | None:
        if not bool(torch.isfinite(gram).all()):
            return None
        norms = gram.diagonal().clamp_min(0).sqrt().float()
        weighted = self.task_weight[present] * norms.to(self.task_weight.device)
        ratio = (losses / self.initial_losses[present].clamp_min(1e-12)).float()
        rate = ratio / ratio.mean()
        target = (weighted.mean() * rate.to(weighted) ** self.alpha).detach()
        return (weighted - target).abs().sum()
