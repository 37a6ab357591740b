"""Per-task low-rank adapters (LoRA, Hu et al., ICLR 2022) on a shared network's layers.

A wrapped layer computes ``base(x) + (α/r) · B_t A_t x`` with ``A_t`` (r×in, for a convolution an
r-channel convolution of the base's kernel, stride and padding) and ``B_t`` (out×r, 1×1) owned by
task t, and ``B_t = 0`` at the start so the wrapped network starts as the base. Which task's
adapter acts is set for a whole forward pass by :class:`TaskSwitch` (the architecture runs the
adapted part once per task).

Written here rather than with the ``peft`` library, for two reasons found in peft 0.21's source:
its adapters are switched with ``set_adapter``, which also sets ``requires_grad=False`` on every
inactive adapter, so only one adapter can train at a time, while here k adapters train in the
same step (one pass per task, one backward, one optimizer, and DDP's fixed set of trainable
parameters); and its per-sample adapter routing (``adapter_names=...``) is refused in training
mode. peft would also bring ``transformers`` and ``accelerate`` as dependencies for ~80 lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeGuard

import torch
from torch import nn

LAYERS = ("linear", "conv")


class TaskSwitch:
    """The task whose adapters act (None: none do, the base network alone)."""

    def __init__(self) -> None:
        self.active: str | None = None


class LoRALayer(nn.Module):
    """A base ``nn.Linear`` or ``nn.Conv2d`` plus one low-rank adapter per task."""

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        ranks: Mapping[str, int],
        switch: TaskSwitch,
        alpha: float | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base = base
        self.switch = switch
        self.scaling = {t: (alpha if alpha is not None else r) / r for t, r in ranks.items()}
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        down = {t: self._down(base, r) for t, r in ranks.items()}
        up = {t: self._up(base, r) for t, r in ranks.items()}
        for task in ranks:
            nn.init.kaiming_uniform_(down[task].weight, a=math.sqrt(5))
            nn.init.zeros_(up[task].weight)
        self.down = nn.ModuleDict(down)
        self.up = nn.ModuleDict(up)

    @staticmethod
    def _down(base: nn.Linear | nn.Conv2d, rank: int) -> nn.Linear | nn.Conv2d:
        if isinstance(base, nn.Linear):
            return nn.Linear(base.in_features, rank, bias=False)
        padding = base.padding
        return nn.Conv2d(
            base.in_channels,
            rank,
            _pair(base.kernel_size),
            stride=_pair(base.stride),
            padding=padding if isinstance(padding, str) else _pair(padding),
            dilation=_pair(base.dilation),
            bias=False,
        )

    @staticmethod
    def _up(base: nn.Linear | nn.Conv2d, rank: int) -> nn.Linear | nn.Conv2d:
        if isinstance(base, nn.Linear):
            return nn.Linear(rank, base.out_features, bias=False)
        return nn.Conv2d(rank, base.out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        task = self.switch.active
        if task is None or task not in self.down:
            return y
        return y + self.up[task](self.down[task](self.dropout(x))) * self.scaling[task]


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's (height, width) option: torch types them ``tuple[int, ...]``."""
    height, width = value
    return height, width


def adaptable(module: nn.Module, layers: tuple[str, ...]) -> TypeGuard[nn.Linear | nn.Conv2d]:
    """Whether ``module`` gets adapters: a Linear, or an ungrouped Conv2d (not depthwise)."""
    if isinstance(module, nn.Linear):
        return "linear" in layers
    if isinstance(module, nn.Conv2d):
        return "conv" in layers and module.groups == 1 and isinstance(module.padding, tuple)
    return False


def cost_per_rank(root: nn.Module, layers: tuple[str, ...]) -> int:
    """Adapter parameters per unit of rank, over the layers of ``root`` that get one."""
    total = 0
    for module in root.modules():
        if not adaptable(module, layers):
            continue
        if isinstance(module, nn.Linear):
            total += module.in_features + module.out_features
        else:
            k = module.kernel_size[0] * module.kernel_size[1]
            total += module.in_channels * k + module.out_channels
    return total


def inject(
    root: nn.Module,
    ranks: Mapping[str, int],
    switch: TaskSwitch,
    layers: tuple[str, ...],
    alpha: float | None,
    dropout: float,
) -> int:
    """Replace every adaptable layer under ``root`` by a :class:`LoRALayer`; return how many."""
    count = 0
    for parent in list(root.modules()):
        if isinstance(parent, LoRALayer):
            continue
        for name, child in list(parent.named_children()):
            if adaptable(child, layers):
                setattr(parent, name, LoRALayer(child, ranks, switch, alpha, dropout))
                count += 1
    return count
