"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

Learned weights wᵢ (summing to k) balance the norms of the weighted task gradients of the shared
representation, ``nᵢ = wᵢ ‖∂Lᵢ/∂z‖``, towards a common scale set by each task's training rate:

    L_grad = Σᵢ | nᵢ − mean(n) · rᵢ^α |,   rᵢ = L̃ᵢ / mean(L̃),   L̃ᵢ = Lᵢ(t) / Lᵢ(0)

with the target treated as a constant. A task that trains slowly (large rᵢ) gets a larger
gradient; ``alpha`` sets the strength of the pull. Cost: O(k) on top of G's diagonal.

Single optimizer: w is a parameter of this module, in the optimizer's ``weighting`` group (with
its own ``lr``, 0.025 as in the paper). The step adds ``L_grad − L_grad.detach()`` to the loss
(zero in value; its gradient reaches only w, since the norms are constants of the step), and w is
renormalised to sum to k at the start of the next step, as the paper does after each update.
The paper measures the norms at the last shared layer's weights; ``level=representation`` (the
default) measures them at the shared representation (k backward passes through the heads only),
``level=params`` at all shared parameters. The backbone receives ``Σ wᵢ ∂Lᵢ/∂θ``; each head its
own task's gradient. Lᵢ(0) are the first losses seen (global under DDP), kept in a buffer.

Absent tasks keep their weight exactly: the renormalisation scales the present tasks' weights to
``k − Σ absent weights``, and a weight that the optimizer moved while its task was absent (by
momentum: its gradient was zero) is put back to its value before that step. Corners: a zero
gradient gives ``nᵢ = 0`` and no gradient to wᵢ; one present task has ``L_grad = 0``; loss ratios
that are all zero or not finite count as equal rates (no NaN target).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("gradnorm")
class GradNorm(GradientWeighting):
    """GradNorm with asymmetry ``alpha`` and weight learning rate ``lr``."""

    # buffers (register_buffer in __init__), declared for the type checker
    initial_losses: torch.Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        alpha: float = 1.5,
        lr: float = 0.025,
    ) -> None:
        super().__init__(tasks, level, seed)
        if not lr > 0:
            raise ConfigError(f"weighting.lr={lr}: expected a number > 0")
        k = len(self.tasks)
        self.alpha = float(alpha)
        self.optimizer_options = {"lr": lr}
        self.task_weight = nn.Parameter(torch.ones(k))
        self.register_buffer("initial_losses", torch.full((k,), float("nan"), dtype=torch.float64))
        #: the weights at the end of the last weighting step and the tasks present at it (not
        #: state: only to undo what the optimizer did to the absent ones' weights since)
        self._held: torch.Tensor | None = None
        self._last_present: list[int] = list(range(k))

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        with torch.no_grad():
            weight = self.task_weight
            if self._held is not None:  # momentum moved the weights of tasks absent last step
                absent = [i for i in range(len(self.tasks)) if i not in self._last_present]
                weight[absent] = self._held[absent].to(weight)
            index = torch.tensor(present, device=weight.device)
            others = torch.ones(len(self.tasks), dtype=torch.bool, device=weight.device)
            others[index] = False
            # the paper's renormalisation after each update, over the present tasks: Σ w = k
            weight[index] = weight[index].clamp(min=1e-4)
            budget = len(self.tasks) - float(weight[others].sum())
            if budget > 0:
                weight[index] = weight[index] * (budget / weight[index].sum())
            self._held, self._last_present = weight.detach().clone(), list(present)
            where = index.to(self.initial_losses.device)
            unset = torch.isnan(self.initial_losses[where])
            self.initial_losses[where] = torch.where(
                unset, losses.to(self.initial_losses), self.initial_losses[where]
            )
        return self.task_weight[present].detach().double()

    def extra_loss(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor | None:
        if not bool(torch.isfinite(gram).all()):
            return None
        norms = gram.diagonal().clamp_min(0).sqrt().float()
        weighted = self.task_weight[present] * norms.to(self.task_weight.device)
        ratio = losses / self.initial_losses[present].to(losses).clamp_min(1e-12)
        mean = ratio.mean()
        if not (torch.isfinite(ratio).all() and mean > 0):
            ratio, mean = torch.ones_like(ratio), ratio.new_ones(())
        rate = (ratio / mean).float()
        target = (weighted.mean() * rate.to(weighted) ** self.alpha).detach()
        return (weighted - target).abs().sum()
