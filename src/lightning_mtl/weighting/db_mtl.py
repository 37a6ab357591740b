"""DB-MTL, Dual-Balancing Multi-Task Learning (Lin, Ye, Xu, Shi & Zhang, 2023).

Two balances at once:

* loss scale: train on ``log(Lᵢ + ε)`` instead of Lᵢ, so every task's loss is scale-free
  (``∇ log Lᵢ = ∇Lᵢ / Lᵢ``);
* gradient magnitude: rescale each task's gradient of the log-loss to the largest one,
  ``d = Σᵢ (maxⱼ n̄ⱼ / n̄ᵢ) ∇ log Lᵢ``, where n̄ᵢ is a running average of ‖∇ log Lᵢ‖ with rate
  ``β_t = beta / t^beta_sigma`` (``n̄ ← n + β_t (n̄ − n)``).

So the weight on Lᵢ is ``wᵢ = (maxⱼ n̄ⱼ / n̄ᵢ) / (Lᵢ + ε)``, and the norms come from the diagonal
of the Gram matrix. One difference from the paper, for cost: the paper keeps the running average
of the gradient *vectors* (a k×D buffer at the parameter level, undefined across batches at the
representation level); here the running average is of their *norms* (k numbers), and the
direction combines the current gradients. With ``beta = 0`` the two coincide.
Loss values are global under DDP; the averages are buffers (checkpointed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("db_mtl")
class DBMTL(GradientWeighting):
    """DB-MTL with averaging ``beta``, its decay ``beta_sigma`` and log offset ``eps``."""

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        beta: float = 0.9,
        beta_sigma: float = 0.5,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks, level, seed)
        k = len(self.tasks)
        self.beta, self.beta_sigma, self.eps = beta, beta_sigma, eps
        self.register_buffer("mean_norms", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("updates", torch.zeros(k, dtype=torch.long))

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        index = torch.tensor(present, device=self.mean_norms.device)
        shifted = losses.to(self.mean_norms) + self.eps
        norms = gram.diagonal().clamp_min(0).sqrt().to(self.mean_norms) / shifted
        self.updates[index] += 1
        rate = self.beta / self.updates[index].double() ** self.beta_sigma
        previous = self.mean_norms[index]
        first = self.updates[index] == 1
        self.mean_norms[index] = torch.where(first, norms, norms + rate * (previous - norms))
        mean = self.mean_norms[index]
        scale = torch.where(mean > 0, mean.max() / mean, torch.ones_like(mean))
        return (scale / shifted).to(gram)
