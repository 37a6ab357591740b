"""FAMO, Fast Adaptive Multitask Optimization (Liu, Liang, Stone & Liu, NeurIPS 2023).

FAMO keeps task logits ξ and weights ``z = softmax(ξ)``. The update direction of a step is the
gradient of ``Σ zᵢ log Lᵢ`` rescaled by ``c = (Σⱼ zⱼ/Lⱼ)⁻¹``:

    d = Σᵢ wᵢ ∇Lᵢ,      wᵢ = c · zᵢ / Lᵢ

which decreases every log-loss at a rate set by z. After the step, the logits move towards the
tasks whose loss fell least:

    δᵢ = log Lᵢ(before) − log Lᵢ(after),     ξ ← Adam(ξ, grad = Jsoftmax(ξ)ᵀ δ, lr, weight decay γ)

(``Lᵢ`` stands for ``Lᵢ − min_lossᵢ``, the distance to a known lower bound, 0 by default.)

Two choices of ours, both for cost:

* The logit update runs inside the balancer by hand (Adam on k numbers, its moments in buffers),
  not as a second torch optimizer, so Lightning's single optimizer, checkpointing and resume stay
  as they are; the logits and Adam moments are saved in checkpoints.
* "After the step" is read one step late, from the losses of the next batch, instead of a
  second forward pass of the same batch: O(1) cost per step, as the paper intends, at the price
  of batch noise in δ (averaged out by Adam's moments).

Under DDP the losses are averaged over ranks (``context.global_losses``), so logits and weights are identical on
every rank, and ``Σ wᵢ Lᵢ`` gives each rank the same weights: the all-reduced gradient is FAMO's
direction for the global batch. With gradient accumulation the logits move once per optimizer
step. A task absent from either of the two steps contributes δᵢ = 0.
Cost per step: O(k), one all-reduce of k numbers under DDP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_mtl.weighting.base import LossWeighting, StepContext
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("famo")
class FAMO(LossWeighting):
    """FAMO with logit learning rate ``lr`` and logit weight decay ``weight_decay`` (γ)."""

    reads_loss_values = True

    def __init__(
        self,
        tasks: Sequence[str],
        lr: float = 0.025,
        weight_decay: float = 0.01,
        min_losses: float | Sequence[float] = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks)
        k = len(self.tasks)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        minimum = torch.as_tensor(min_losses, dtype=torch.float64).expand(k).clone()
        self.register_buffer("min_losses", minimum)
        self.register_buffer("logits", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_m", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_v", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_t", torch.tensor(0))
        self.register_buffer("prev_losses", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("prev_present", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("prev_step", torch.tensor(-1))

    def task_weights(self) -> torch.Tensor:
        """``z = softmax(ξ)`` over all tasks."""
        return torch.softmax(self.logits, dim=0)

    def _update_logits(self, now: torch.Tensor, present: torch.Tensor) -> None:
        both = self.prev_present & present
        gap_before = (self.prev_losses - self.min_losses).clamp_min(self.eps).log()
        gap_now = (now - self.min_losses).clamp_min(self.eps).log()
        delta = torch.where(both, gap_before - gap_now, torch.zeros_like(now))
        z = self.task_weights()
        grad = z * (delta - (z * delta).sum()) + self.weight_decay * self.logits  # Jᵀδ + γξ
        beta1, beta2 = self.betas
        self.adam_t += 1
        self.adam_m.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.adam_v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = self.adam_m / (1 - beta1 ** int(self.adam_t))
        v_hat = self.adam_v / (1 - beta2 ** int(self.adam_t))
        self.logits -= self.lr * m_hat / (v_hat.sqrt() + 1e-8)

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        index = torch.tensor(present, dtype=torch.long, device=self.logits.device)
        now = torch.zeros_like(self.prev_losses)
        now[index] = losses.to(now)
        labelled = torch.zeros_like(self.prev_present)
        labelled[index] = True
        if context.step != int(self.prev_step):
            if int(self.prev_step) >= 0:
                self._update_logits(now, labelled)
            self.prev_step.fill_(context.step)
        self.prev_losses.copy_(now)
        self.prev_present.copy_(labelled)

        z = self.task_weights()[index]
        z = z / z.sum()
        gap = (now[index] - self.min_losses[index]).clamp_min(self.eps)
        c = 1.0 / (z / gap).sum()
        return c * z / gap
