"""The contract every weighting method (balancer) honours.

A balancer turns the per-task losses of one step into **one scalar to back-propagate**, so
every method works with a single optimizer and with Lightning's automatic optimization (DDP
all-reduce, AMP scaling, clipping, accumulation and schedulers stay Lightning's).

``combine(losses, context) -> Combined(loss, weights)``

* ``losses``: ``{task: scalar}`` for the tasks labelled in this batch only. A task absent from
  the batch is absent from the dict: it gets no weight, and a balancer must leave its state
  for that task untouched.
* ``context``: what a method may need beyond the losses (the step, global loss values under
  DDP, and for gradient-based methods the meeting places of the architecture: the shared
  tensors and the shared parameters upstream of them).
* ``weights``: the effective weight of each present task (detached), logged as
  ``train/weight/<task>``.

Two families fit this contract:

* loss-based methods compute weights from loss values and their own state
  (subclass :class:`LossWeighting` and implement ``weights``);
* gradient-based methods compute weights from the task gradients with respect to the shared
  representation or the shared parameters (subclass
  :class:`~lightning_mtl.weighting.gradient.GradientWeighting`, see there).

State (learned log-variances, loss histories, ...) lives in parameters and buffers of the
module, so it is saved in checkpoints and restored with them. Learned parameters of a balancer
are optimised by the model's single optimizer, in a parameter group without weight decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from lightning_mtl.models.meeting import Meeting, MeetingPlace


@dataclass
class StepContext:
    """What a balancer may read besides the losses.

    ``global_losses`` (k numbers, ``self.tasks`` order) are the detached task losses averaged
    over the DDP ranks that labelled each task (NaN for a task no rank labelled). The Lightning
    module fills it for methods with ``reads_loss_values = True``, with one all-reduce of 2k
    numbers per step, so every rank computes the same weights from the global batch. Outside
    DDP it is ``None`` and methods read the local losses.

    For gradient-based methods (``needs_gradients = True``):

    * ``meetings``: the architecture's meeting places of this forward pass, in forward order
      (:class:`~lightning_mtl.models.meeting.Meeting`: the shared tensors as produced, the
      detached leaves the downstream modules read, the tasks and the shared parameters);
    * ``all_reduce``: sums a tensor over DDP ranks (``None`` outside DDP), ``world_size`` ranks,
      this one being ``rank``;
    * ``grad_scale``: the fp16 GradScaler's current scale (``None`` without a scaler);
    * ``downstream``: see below.
    """

    step: int = 0
    epoch: int = 0
    global_losses: torch.Tensor | None = None
    meetings: Sequence[Meeting] = field(default_factory=list)
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    world_size: int = 1
    rank: int = 0
    grad_scale: float | None = None
    #: every trainable parameter between the meetings' leaves and the losses (the heads, the
    #: losses' own): when given, and every task's gradient comes from its own aliases
    #: (:func:`~lightning_mtl.weighting.meetings.view_gradients`), the same backward pass gives
    #: their gradients too, so Lightning's backward does not run through the heads again
    downstream: Sequence[torch.nn.Parameter] = ()


@dataclass
class Combined:
    """The scalar to back-propagate and the detached weight of each present task.

    With several meeting places, ``weights`` holds each task's weight at the first place it
    meets and ``places`` every place's weights (``{place: {task: w}}``; empty otherwise)."""

    loss: torch.Tensor
    weights: dict[str, torch.Tensor]
    places: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class Weighting(nn.Module):
    """Base class of all balancers; ``tasks`` is the ordered list of all task names.

    ``reads_loss_values``: the method's weights depend on loss values, so under DDP it needs
    ``context.global_losses`` for the ranks to agree.
    """

    reads_loss_values: bool = False
    needs_gradients: bool = False
    #: extra options (e.g. ``lr``) of the optimizer's parameter group of this balancer's
    #: parameters; a method whose options depend on its arguments sets it in ``__init__``
    optimizer_options: Mapping[str, float] = MappingProxyType({})

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a weighting needs at least one task")
        self.tasks = list(tasks)
        self.index = {name: i for i, name in enumerate(self.tasks)}

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        raise NotImplementedError

    def prepare(
        self, places: Sequence[MeetingPlace] | None, world_size: int = 1, step: int | None = None
    ) -> None:
        """Called before each training step's forward pass with the architecture's meeting
        places (None after the step) and the step's number; a method that hooks the modules
        upstream of them (params-level gradient methods) does it here. Default: nothing."""

    @contextmanager
    def hooked(
        self, places: Sequence[MeetingPlace], world_size: int = 1, step: int | None = None
    ) -> Iterator[None]:
        """:meth:`prepare` for the body of a training step and ``prepare(None)`` after it, also
        when the step returns early (a skipped step) or raises: no hook, and no recorded
        activation with its graph, outlives the step."""
        self.prepare(places, world_size, step)
        try:
            yield
        finally:
            self.prepare(None)

    def zero_term(self) -> torch.Tensor:
        """Zero, with a (zero) gradient for the method's own parameters (learned weights), so
        that DDP sees them used on a step that does not train them."""
        params = list(self.parameters())
        total = torch.zeros((), device=params[0].device if params else None)
        for parameter in params:
            total = total + parameter.sum() * 0.0
        return total

    @staticmethod
    def loss_values(losses: torch.Tensor, present: list[int], context: StepContext) -> torch.Tensor:
        """The present tasks' loss values: global over DDP ranks where known, else local."""
        if context.global_losses is None:
            return losses.detach()
        return context.global_losses[present].to(losses)

    @staticmethod
    def present_tasks(local: list[int], context: StepContext) -> list[int]:
        """The tasks a step weights: those labelled on any DDP rank where the global losses are
        known (so every rank weights the same set), else those with a local loss."""
        if context.global_losses is None:
            return local
        # a NaN global loss means "labelled on no rank", or a NaN loss on some rank: a task with
        # a local loss is present either way
        labelled = {i for i, value in enumerate(context.global_losses.tolist()) if value == value}
        return sorted(labelled | set(local))

    def forward(
        self, losses: Mapping[str, torch.Tensor], context: StepContext | None = None
    ) -> Combined:
        context = context or StepContext()
        if not losses and context.global_losses is None:
            raise ValueError("combine() needs the loss of at least one task")
        unknown = set(losses) - set(self.index)
        if unknown:
            raise KeyError(f"losses for unknown tasks {sorted(unknown)}; known: {self.tasks}")
        return self.combine(losses, context)


class LossWeighting(Weighting):
    """A balancer whose weights depend on loss values and state only: ``Σ wᵢ Lᵢ``.

    Subclasses implement ``weights(values, present, context)``: ``present`` are the indices (in
    ``self.tasks``) of the tasks this step weights and ``values`` their detached loss values:
    under DDP, the global ones of every task labelled on any rank (so all ranks compute the same
    weights and update the same state, even for a task this rank did not see), otherwise the
    local ones. ``Σ wᵢ Lᵢ`` then runs over the local losses. A method that reads loss values sets
    ``reads_loss_values = True`` (the module then provides the global losses under DDP).
    """

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        names = [name for name in self.tasks if name in losses]
        local = [self.index[name] for name in names]
        present = self.present_tasks(local, context)
        if context.global_losses is not None:
            values = context.global_losses[present].float()
        else:
            values = torch.stack([losses[name].detach().float() for name in names])
        weights = self.weights(values, present, context).detach().to(values)
        position = {task: j for j, task in enumerate(present)}
        total = values.new_zeros(())
        for name, i in zip(names, local, strict=True):
            total = total + weights[position[i]] * losses[name].float()
        shown = {self.tasks[i]: weights[j] for j, i in enumerate(present)}
        return Combined(total, shown)


def global_loss_values(
    losses: Mapping[str, torch.Tensor],
    tasks: Sequence[str],
    all_reduce: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Each task's loss averaged over the DDP ranks that labelled it (NaN where none did), in
    ``tasks`` order: ``StepContext.global_losses``. One all-reduce of 2k numbers (the k loss
    sums and the k counts of ranks)."""
    stats = torch.zeros(2, len(tasks), device=device)
    for i, task in enumerate(tasks):
        if task in losses:
            stats[0, i] = losses[task].detach().float()
            stats[1, i] = 1.0
    stats = all_reduce(stats)
    return torch.where(stats[1] > 0, stats[0] / stats[1].clamp_min(1), torch.nan)
