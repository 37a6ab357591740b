"""MTAN, the Multi-Task Attention Network (Liu, Johns & Davison, CVPR 2019).

The backbone is shared; each task owns a soft-attention module per feature level that selects
from the shared map what the task needs. For task t at level l (with ``m_l`` the backbone's map):

    a_l = σ(BN(conv₁ₓ₁(ReLU(BN(conv₁ₓ₁([m_l, f_l(x_{l-1})]))))))      (x_0's input is m_0 alone)
    x_l = a_l ⊙ m_l,            f_l = 3×3 conv-BN-ReLU to m_l's channels, resized to m_l's grid

and the task's head reads ``x_1..x_L`` (its pooled vector: the mean of ``x_L``). The paper reads
the attention's input from inside each block and applies the mask to the block's last layer;
timm exposes stage outputs only, so both are the stage's output map here. The mask's hidden width
is the map's channels divided by ``reduction`` (the paper: 1).

Meeting place: the backbone's maps (all tasks); the attention modules are task-side. Both
balancer levels. Any timm backbone (it needs no stages). Cost: one backbone forward plus, per
task and level, three small convolutions on that level's map.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.architectures.base import (
    ARCHITECTURES,
    Architecture,
    ArchitectureOutput,
    Meeting,
    MeetingPlace,
)
from lightning_mtl.models.backbone import Backbone, Features


def _conv_bn(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class TaskAttention(nn.Module):
    """One task's attention modules over the backbone's feature levels."""

    def __init__(self, channels: list[int], reduction: int) -> None:
        super().__init__()
        self.masks = nn.ModuleList()
        self.carry = nn.ModuleList()  # f_l: the previous level's attended map, to this level's
        for level, c in enumerate(channels):
            c_in = c if level == 0 else 2 * c
            hidden = max(1, c // reduction)
            self.masks.append(
                nn.Sequential(
                    *_conv_bn(c_in, hidden, 1), nn.ReLU(inplace=True), *_conv_bn(hidden, c, 1)
                )
            )
            if level:
                self.carry.append(nn.Sequential(*_conv_bn(channels[level - 1], c, 3), nn.ReLU()))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        attended: list[torch.Tensor] = []
        for level, shared in enumerate(maps):
            if level == 0:
                source = shared
            else:
                previous = self.carry[level - 1](attended[-1])
                previous = _resize(previous, shared.shape[-2:])
                source = torch.cat([shared, previous], dim=1)
            attended.append(torch.sigmoid(self.masks[level](source)) * shared)
        return attended


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """To the grid ``size``: average pooling when shrinking (as the paper's pooling), bilinear
    when growing (a ViT's maps all share one grid: no-op)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, (size[0], size[1]))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@ARCHITECTURES.register("mtan")
class MTAN(Architecture):
    """Shared backbone, one set of attention modules per task (see the module docstring)."""

    def __init__(self, backbone: Backbone, tasks: Mapping[str, str], reduction: int = 4) -> None:
        super().__init__(backbone, tasks)
        if reduction < 1:
            raise ConfigError(f"model.architecture.reduction={reduction}: expected an int >= 1")
        self.attention = nn.ModuleDict(
            {t: TaskAttention(list(backbone.channels), reduction) for t in self.task_names}
        )
        self.places = [MeetingPlace("backbone", tuple(self.task_names), (backbone,))]

    def forward(self, images: torch.Tensor, cut: bool = False) -> ArchitectureOutput:
        features = self.backbone(images)
        meetings: list[Meeting] = []
        maps = self.meet(meetings, self.places[0], features.maps, cut)
        return ArchitectureOutput(
            {t: Features.of(self.attention[t](maps)) for t in self.task_names}, meetings
        )
