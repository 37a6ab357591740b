"""Meeting places: where the gradients of several tasks meet (see
:mod:`lightning_mtl.models.architectures.base`). Kept free of timm and Lightning so that the
balancers and plain PyTorch loops can use them alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

LEVELS = ("representation", "params")


@dataclass(frozen=True, eq=False)
class MeetingPlace:
    """Where the gradients of ``tasks`` meet, and the shared parameters just upstream of it.

    ``modules`` hold those parameters (the params-level Gram engine hooks them; they must not
    contain one another); ``extra_parameters`` are parameters outside any of them (a ViT's class
    token). ``levels``: the balancer levels this place defines.
    """

    name: str
    tasks: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    levels: tuple[str, ...] = LEVELS
    extra_parameters: tuple[nn.Parameter, ...] = ()
    #: every trainable parameter between the upstream cut and the tensors is one of this place's
    #: (so at the params level its Jacobian holds the whole ``Jᵀw`` and it may be put into the
    #: parameters directly); False where other parameters (task-specific ones) sit in between
    closed: bool = True

    def parameters(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        params = []
        for p in [*(p for m in self.modules for p in m.parameters()), *self.extra_parameters]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


@dataclass(eq=False)
class Meeting:
    """One forward pass at a meeting place: the tensors as produced, and what the modules
    downstream read (detached copies with ``cut``; the tensors themselves otherwise).

    ``views``: for a task whose head reads leaves of this meeting directly, the task's own alias
    of each leaf it reads (None for a leaf it does not read); see :func:`task_views`. One
    backward pass of the summed losses then gives every such task its own gradient.
    """

    place: MeetingPlace
    tensors: list[torch.Tensor]
    leaves: list[torch.Tensor]
    views: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)

    @classmethod
    def of(cls, place: MeetingPlace, tensors: Sequence[torch.Tensor], cut: bool) -> Meeting:
        """A meeting of ``tensors``; a tensor listed twice is kept (and cut) once."""
        unique: list[torch.Tensor] = []
        for tensor in tensors:
            if not any(tensor is u for u in unique):
                unique.append(tensor)
        if not cut:
            return cls(place, unique, unique)
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in unique]
        return cls(place, unique, leaves)

    def leaf(self, tensor: torch.Tensor) -> torch.Tensor:
        """What downstream modules read instead of ``tensor``."""
        for original, leaf in zip(self.tensors, self.leaves, strict=True):
            if original is tensor:
                return leaf
        raise KeyError("not a tensor of this meeting")


def cut_meeting(
    tensors: Sequence[torch.Tensor],
    modules: Sequence[nn.Module],
    tasks: Sequence[str],
    name: str = "shared",
) -> Meeting:
    """One meeting place in a plain PyTorch loop: ``tensors`` produced by ``modules`` and read by
    every task in ``tasks``; the heads read ``meeting.leaves``."""
    return Meeting.of(MeetingPlace(name, tuple(tasks), tuple(modules)), tensors, cut=True)


def task_views(
    meetings: Sequence[Meeting], task: str, tensors: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """What ``task``'s head reads instead of ``tensors`` (everything it reads): when all of them
    are leaves of one cut meeting of the task, the task's own aliases of them (identity views,
    registered in ``meeting.views``); ``tensors`` unchanged otherwise.

    Why: the heads of all tasks read the same leaves, so one backward pass of ``Σ Lᵢ`` gives
    only the sum of their gradients there; with one alias per task, the same single pass gives
    each task's own gradient at its aliases (``torch.autograd.grad`` with the aliases as inputs)
    instead of one pass per task. Only when the head reads nothing else can the aliases carry
    all of the task's gradient, hence "all of them".
    """
    for meeting in meetings:
        if meeting.leaves is meeting.tensors or task not in meeting.place.tasks:
            continue
        found = [
            next((i for i, leaf in enumerate(meeting.leaves) if leaf is t), None) for t in tensors
        ]
        index = [i for i in found if i is not None]
        if len(index) < len(found) or not all(meeting.leaves[i].requires_grad for i in index):
            continue
        # one alias per leaf read (a leaf read twice gets one alias), in the order first read
        aliases = {i: meeting.leaves[i].view_as(meeting.leaves[i]) for i in dict.fromkeys(index)}
        meeting.views[task] = [aliases.get(i) for i in range(len(meeting.leaves))]
        return [aliases[i] for i in index]
    return list(tensors)
