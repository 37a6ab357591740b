"""Hard parameter sharing (Caruana, 1997): one backbone, every task head on its features."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lightning_mtl.models.architectures.base import (
    ARCHITECTURES,
    Architecture,
    ArchitectureOutput,
    Meeting,
    MeetingPlace,
)
from lightning_mtl.models.backbone import Backbone, Features


@ARCHITECTURES.register("hard")
class HardSharing(Architecture):
    """The default: the backbone's pooled vector and maps are shared by every head.

    One meeting place, ``backbone``: all tasks, all backbone parameters, both balancer levels.
    Works with every timm model (it needs no stages). Cost: one backbone forward.
    """

    def __init__(self, backbone: Backbone, tasks: Mapping[str, str]) -> None:
        super().__init__(backbone, tasks)
        self.places = [MeetingPlace("backbone", tuple(self.task_names), (backbone,))]

    def forward(self, images: torch.Tensor, cut: bool = False) -> ArchitectureOutput:
        features = self.backbone(images)
        meetings: list[Meeting] = []
        shared = self.meet(meetings, self.places[0], [features.pooled, *features.maps], cut)
        read = Features(shared[0], shared[1:])
        return ArchitectureOutput({task: read for task in self.task_names}, meetings)
