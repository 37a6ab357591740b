"""Meeting places: where the gradients of several tasks meet (see
:mod:`lightning_mtl.models.architectures.base`). Kept free of timm and Lightning so that the
balancers and plain PyTorch loops can use them alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    downstream read (detached copies with ``cut``; the tensors themselves otherwise)."""

    place: MeetingPlace
    tensors: list[torch.Tensor]
    leaves: list[torch.Tensor]

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
