"""DB-MTL, Dual-Balancing Multi-Task Learning (Lin, Ye, Xu, Shi & Zhang, 2023).

Two balances at once:

* loss scale: train on ``log(dᵢ + ε)`` instead of Lᵢ, ``dᵢ = Lᵢ − mᵢ`` the distance to the loss's
  known lower bound (``min_losses``, 0 by default: the paper's ``log(Lᵢ + ε)``), so every task's
  loss is scale-free (``∇ log(dᵢ + ε) = ∇Lᵢ / (dᵢ + ε)``);
* gradient magnitude: rescale each task's gradient of the log-loss to the largest one,
  ``d = Σᵢ (maxⱼ n̄ⱼ / n̄ᵢ) ∇ log(dᵢ + ε)``, where n̄ᵢ is a running average of ‖∇ log(dᵢ + ε)‖
  with rate ``β_t = beta / t^beta_sigma`` (``n̄ ← n + β_t (n̄ − n)``).

So the weight on Lᵢ is ``wᵢ = (maxⱼ n̄ⱼ / n̄ᵢ) / (dᵢ + ε)``, and the norms come from the diagonal
of the Gram matrix. One difference from the paper, for cost: the paper keeps the running average
of the gradient *vectors* (a k×D buffer at the parameter level, undefined across batches at the
representation level); here the running average is of their *norms* (k numbers), and the
direction combines the current gradients. With ``beta = 0`` the two coincide.
Loss values are global under DDP; the averages are buffers (checkpointed).

Corners of its loss handling: an absent task keeps its running norm and count; one task present
gets ``1/(dᵢ + ε)``. ``Lᵢ < mᵢ`` is refused (``ValueError``: set ``weighting.min_losses``);
``dᵢ = 0`` gives ``log ε`` (ε = 1e-8, as the official code). Given a non-finite loss value, the
rule runs on the other tasks' Gram matrix as if that task were absent, gives it weight 0 and
leaves its running norm alone (one warning per task). The gradient step
(:mod:`~lightning_mtl.weighting.gradient`) does not call the rule at all on a step with a
non-finite gradient or loss (its own fallback weights; the state stays untouched either way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.loss_checks import (
    EPS,
    distance_to_bound,
    lower_bounds,
    warn_non_finite,
)
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("db_mtl")
class DBMTL(GradientWeighting):
    """DB-MTL with averaging ``beta``, its decay ``beta_sigma``, log offset ``eps`` and the
    losses' lower bounds ``min_losses``."""

    # buffers (register_buffer in __init__), declared for the type checker
    min_losses: torch.Tensor
    mean_norms: torch.Tensor
    updates: torch.Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        beta: float = 0.9,
        beta_sigma: float = 0.5,
        eps: float = EPS,
        min_losses: float | Sequence[float] | Mapping[str, float] = 0.0,
    ) -> None:
        super().__init__(tasks, level, seed)
        k = len(self.tasks)
        self.beta, self.beta_sigma, self.eps = beta, beta_sigma, eps
        bounds = lower_bounds(self.tasks, min_losses, "db_mtl")
        self.register_buffer("min_losses", bounds, persistent=False)
        self.register_buffer("mean_norms", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("updates", torch.zeros(k, dtype=torch.long))

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        finite = torch.isfinite(losses).tolist()
        if all(finite):
            return self._finite_weights(gram, present, losses)
        keep = [j for j, ok in enumerate(finite) if ok]
        bad = [j for j, ok in enumerate(finite) if not ok]
        warn_non_finite(self, [self.tasks[present[j]] for j in bad], losses[bad].tolist())
        weights = gram.new_zeros(len(present))
        if keep:
            sub = gram[keep][:, keep]
            weights[keep] = self._finite_weights(sub, [present[j] for j in keep], losses[keep])
        return weights

    def _finite_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor
    ) -> torch.Tensor:
        index = torch.tensor(present, device=self.mean_norms.device)
        distance = distance_to_bound(self, losses, present).to(self.mean_norms)
        shifted = distance + self.eps
        norms = gram.diagonal().clamp_min(0).sqrt().to(self.mean_norms) / shifted
        self.updates[index] += 1
        rate = self.beta / self.updates[index].double() ** self.beta_sigma
        previous = self.mean_norms[index]
        first = self.updates[index] == 1
        self.mean_norms[index] = torch.where(first, norms, norms + rate * (previous - norms))
        mean = self.mean_norms[index]
        scale = torch.where(mean > 0, mean.max() / mean, torch.ones_like(mean))
        return (scale / shifted).to(gram)
