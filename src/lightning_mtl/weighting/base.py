"""The contract every weighting method (balancer) honours.

A balancer turns the per-task losses of one step into **one scalar to back-propagate**, so
every method works with a single optimizer and with Lightning's automatic optimization (DDP
all-reduce, AMP scaling, clipping, accumulation and schedulers stay Lightning's).

``combine(losses, context) -> Combined(loss, weights)``

* ``losses``: ``{task: scalar}`` for the tasks labelled in this batch only. A task absent from
  the batch is absent from the dict: it gets no weight, and a balancer must leave its state
  for that task untouched.
* ``context``: what a method may need beyond the losses (the step, the shared
  representation or shared parameters for gradient-based methods).
* ``weights``: the effective weight of each present task (detached), logged as
  ``train/weight/<task>``.

Two families fit this contract:

* loss-based methods compute weights from loss values and their own state
  (subclass :class:`LossWeighting` and implement ``weights``);
* gradient-based methods compute weights from the task gradients of ``context.shared``
  (e.g. from their Gram matrix) and return ``Σ wᵢ Lᵢ``, whose backward is the combined gradient.

State (learned log-variances, loss histories, ...) lives in parameters and buffers of the
module, so it is saved in checkpoints and restored with them. Learned parameters of a balancer
are optimised by the model's single optimizer, in a parameter group without weight decay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class StepContext:
    """What a balancer may read besides the losses.

    ``shared`` holds the tensors whose task gradients gradient-based methods balance: the
    shared representation (the backbone's features) or the shared parameters.

    ``global_losses`` (k numbers, ``self.tasks`` order) are the detached task losses averaged
    over the DDP ranks that labelled each task (NaN for a task no rank labelled). The Lightning
    module fills it for methods with ``reads_loss_values = True``, with one all-reduce of 2k
    numbers per step, so every rank computes the same weights from the global batch. Outside
    DDP it is ``None`` and methods read the local losses.
    """

    step: int = 0
    epoch: int = 0
    shared: Sequence[torch.Tensor] = field(default_factory=list)
    global_losses: torch.Tensor | None = None


@dataclass
class Combined:
    """The scalar to back-propagate and the detached weight of each present task."""

    loss: torch.Tensor
    weights: dict[str, torch.Tensor]


class Weighting(nn.Module):
    """Base class of all balancers; ``tasks`` is the ordered list of all task names.

    ``reads_loss_values``: the method's weights depend on loss values, so under DDP it needs
    ``context.global_losses`` for the ranks to agree.
    """

    reads_loss_values: bool = False

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a weighting needs at least one task")
        self.tasks = list(tasks)
        self.index = {name: i for i, name in enumerate(self.tasks)}

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        raise NotImplementedError

    @staticmethod
    def loss_values(losses: torch.Tensor, present: list[int], context: StepContext) -> torch.Tensor:
        """The present tasks' loss values: global over DDP ranks where known, else local."""
        if context.global_losses is None:
            return losses.detach()
        return context.global_losses[present].to(losses)

    def forward(
        self, losses: Mapping[str, torch.Tensor], context: StepContext | None = None
    ) -> Combined:
        if not losses:
            raise ValueError("combine() needs the loss of at least one task")
        unknown = set(losses) - set(self.index)
        if unknown:
            raise KeyError(f"losses for unknown tasks {sorted(unknown)}; known: {self.tasks}")
        return self.combine(losses, context or StepContext())


class LossWeighting(Weighting):
    """A balancer whose weights depend on loss values and state only: ``Σ wᵢ Lᵢ``.

    Subclasses implement ``weights(losses, present, context)``: ``losses`` is the vector of
    the present tasks' losses (in ``self.tasks`` order, still attached to the graph),
    ``present`` their indices in ``self.tasks``. A method that reads loss values sets
    ``reads_loss_values = True`` and reads them through :meth:`Weighting.loss_values`, so that all DDP
    ranks agree. The returned weights are treated as constants (detached).
    """

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        names = [name for name in self.tasks if name in losses]
        vector = torch.stack([losses[name].float() for name in names])
        present = [self.index[name] for name in names]
        weights = self.weights(vector, present, context).detach().to(vector)
        total = (weights * vector).sum()
        return Combined(total, dict(zip(names, weights.detach(), strict=True)))
