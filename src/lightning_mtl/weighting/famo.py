"""FAMO, Fast Adaptive Multitask Optimization (Liu, Liang, Stone & Liu, NeurIPS 2023).

FAMO keeps task logits ξ and weights ``z = softmax(ξ)``. With ``dᵢ = Lᵢ − mᵢ + ε`` (``mᵢ`` the
loss's known lower bound ``min_losses``, 0 by default; ε = 1e-8 as in the official code), the
update direction of a step is the gradient of ``Σ zᵢ log dᵢ`` rescaled by ``c = (Σⱼ zⱼ/dⱼ)⁻¹``:

    d = Σᵢ wᵢ ∇Lᵢ,      wᵢ = c · zᵢ / dᵢ

which decreases every log-loss at a rate set by z. After the step, the logits move towards the
tasks whose loss fell least:

    δᵢ = log dᵢ(before) − log dᵢ(after),     ξ ← Adam(ξ, grad = Jsoftmax(ξ)ᵀ δ + γ ξ, lr)

(Adam's L2 weight decay γ, as the official code's ``Adam(weight_decay=γ)``).

Two choices of ours, both for cost:

* The logit update runs inside the balancer by hand (Adam on k numbers, its moments in buffers),
  not as a second torch optimizer, so Lightning's single optimizer, checkpointing and resume stay
  as they are; the logits and Adam moments are saved in checkpoints.
* "After the step" is read one step late, from the losses of the next batch, instead of a
  second forward pass of the same batch: O(1) cost per step, as the paper intends, at the price
  of batch noise in δ (averaged out by Adam's moments).

Under DDP the losses are averaged over ranks (``context.global_losses``), so logits and weights
are identical on every rank, and ``Σ wᵢ Lᵢ`` gives each rank the same weights: the all-reduced
gradient is FAMO's direction for the global batch. With gradient accumulation the logits move
once per optimizer step. Cost per step: O(k), one all-reduce of k numbers under DDP.

Corners:

* Tasks present in a step (S): z is the softmax of their logits only, so a run where a task is
  absent gives the others exactly the weights of FAMO without that task. The logit update runs
  on the tasks present in both steps it compares: softmax, its Jacobian and the weight decay
  restricted to them, and Adam's step count kept per task (``adam_t``, k numbers). An absent task
  keeps its logit, moments, step count and last loss bit-identical. One task present: weight 1
  (``c·1/d``), its logit moved by the weight decay alone.
* ``Lᵢ < mᵢ`` is refused (``ValueError``: set ``weighting.min_losses``); ``Lᵢ = mᵢ`` gives
  ``log ε``, as the official code does.
* A non-finite loss: the step is weighted as if that task were absent, it gets weight 0, and
  neither its logit, moments nor last loss see the value
  (:func:`~lightning_mtl.weighting.loss_checks.skip_non_finite`).

Old checkpoints (one Adam step count for all tasks, and the bounds saved) load: the count is
copied to every task, and the bounds are taken from the config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_mtl.weighting.base import LossWeighting, StepContext
from lightning_mtl.weighting.loss_checks import (
    EPS,
    CheckedLossWeighting,
    distance_to_bound,
    lower_bounds,
)
from lightning_mtl.weighting.registry import WEIGHTINGS

#: Adam's denominator offset (torch's default)
ADAM_EPS = 1e-8


@WEIGHTINGS.register("famo")
class FAMO(CheckedLossWeighting, LossWeighting):
    """FAMO with logit learning rate ``lr``, logit weight decay ``weight_decay`` (γ), the losses'
    lower bounds ``min_losses`` and the log offset ``eps``."""

    # buffers (register_buffer in __init__), declared for the type checker
    min_losses: torch.Tensor
    logits: torch.Tensor
    adam_m: torch.Tensor
    adam_v: torch.Tensor
    adam_t: torch.Tensor
    prev_losses: torch.Tensor
    prev_present: torch.Tensor
    prev_step: torch.Tensor

    reads_loss_values = True

    def __init__(
        self,
        tasks: Sequence[str],
        lr: float = 0.025,
        weight_decay: float = 0.01,
        min_losses: float | Sequence[float] | Mapping[str, float] = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = EPS,
    ) -> None:
        super().__init__(tasks)
        k = len(self.tasks)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        # not persistent: the config decides the bounds, also when a run resumes
        bounds = lower_bounds(self.tasks, min_losses, "famo")
        self.register_buffer("min_losses", bounds, persistent=False)
        self.register_buffer("logits", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_m", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_v", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_t", torch.zeros(k, dtype=torch.long))
        self.register_buffer("prev_losses", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("prev_present", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("prev_step", torch.tensor(-1))

    def task_weights(self) -> torch.Tensor:
        """``z = softmax(ξ)`` over all tasks."""
        return torch.softmax(self.logits, dim=0)

    def _update_logits(self, index: torch.Tensor, distance: torch.Tensor) -> None:
        """One Adam step on the logits of the tasks present now (``index``, their distances
        ``distance``) and at the previous step; every other task's entries stay as they are."""
        both = self.prev_present[index]
        if not bool(both.any()):
            return
        tasks = index[both]
        before = self.prev_losses[tasks] - self.min_losses[tasks]
        delta = (before + self.eps).log() - (distance[both] + self.eps).log()
        logits = self.logits[tasks]
        z = torch.softmax(logits, dim=0)
        grad = z * (delta - (z * delta).sum()) + self.weight_decay * logits  # Jᵀδ + γξ
        beta1, beta2 = self.betas
        t = (self.adam_t[tasks] + 1).double()
        m = beta1 * self.adam_m[tasks] + (1 - beta1) * grad
        v = beta2 * self.adam_v[tasks] + (1 - beta2) * grad * grad
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        self.logits[tasks] = logits - self.lr * m_hat / (v_hat.sqrt() + ADAM_EPS)
        self.adam_m[tasks] = m
        self.adam_v[tasks] = v
        self.adam_t[tasks] += 1

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        distance = distance_to_bound(self, losses, present).to(self.logits)
        index = torch.tensor(present, dtype=torch.long, device=self.logits.device)
        if context.step != int(self.prev_step):
            if int(self.prev_step) >= 0:
                self._update_logits(index, distance)
            self.prev_step.fill_(context.step)
        self.prev_losses[index] = losses.detach().to(self.prev_losses)
        self.prev_present.zero_()
        self.prev_present[index] = True

        z = torch.softmax(self.logits[index], dim=0)
        shifted = distance + self.eps
        c = 1.0 / (z / shifted).sum()
        return c * z / shifted

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints before per-task step counts: one count shared by every task, and the
        # bounds saved (now the config's).
        count = state_dict.get(prefix + "adam_t")
        if isinstance(count, torch.Tensor) and count.dim() == 0:
            state_dict[prefix + "adam_t"] = count.expand(len(self.tasks)).clone()
        state_dict.pop(prefix + "min_losses", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
