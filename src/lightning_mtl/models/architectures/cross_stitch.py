"""Cross-stitch networks (Misra, Shrivastava, Gupta & Hebert, CVPR 2016): soft parameter sharing.

One backbone column per task (or per task group, ``groups``), and after every stage but the
last a learned cross-stitch unit mixes the columns' outputs:

    x̃_c = Σ_d α_s[c, d] · x_d        (one scalar per pair of columns and stage)

α starts at ``self_weight`` on the diagonal and ``(1 - self_weight)/(n - 1)`` elsewhere (the
paper's "mostly self" initialisation); the columns start from the same (e.g. pretrained)
weights. A task's head reads its column's maps, taken after the stitch.

No representation is shared by the tasks' heads (each reads its own column), so there is no
representation-level meeting place: the task boundary is a meeting place at ``level=params``
only, whose shared parameters are every column and stitch unit (through α every column reaches
every task). Cost: n backbone forwards (n columns), n× the backbone's parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.architectures.base import (
    ARCHITECTURES,
    Architecture,
    ArchitectureOutput,
    Meeting,
    MeetingPlace,
    task_groups,
)
from lightning_mtl.models.backbone import Backbone, Features


class CrossStitchUnit(nn.Module):
    """Mixes n columns' tensors with a learned n×n matrix α."""

    def __init__(self, columns: int, self_weight: float) -> None:
        super().__init__()
        other = (1.0 - self_weight) / (columns - 1) if columns > 1 else 0.0
        alpha = torch.full((columns, columns), other)
        alpha.fill_diagonal_(self_weight)
        self.alpha = nn.Parameter(alpha)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        stacked = torch.stack(list(xs))  # n × ...
        mixed = torch.tensordot(self.alpha.to(stacked.dtype), stacked, dims=([1], [0]))
        return list(mixed.unbind(0))


@ARCHITECTURES.register("cross_stitch")
class CrossStitch(Architecture):
    """One column per task group, cross-stitch units between stages (see the module docstring).

    ``groups: null`` gives every task its own column.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Mapping[str, str],
        groups: Sequence[Sequence[str]] | None = None,
        self_weight: float = 0.9,
    ) -> None:
        super().__init__(backbone, tasks)
        key = "model.architecture=cross_stitch"
        backbone.require_stages(key)
        if not 0.0 <= self_weight <= 1.0:
            raise ConfigError(f"{key}: self_weight={self_weight}: expected 0 <= value <= 1")
        if groups is None:
            self.groups = [[t] for t in self.task_names]
        else:
            self.groups = task_groups(groups, self.task_reads, "model.architecture.groups")
        # column 0 is the backbone itself; the others start as copies of it
        self.columns = nn.ModuleList(copy.deepcopy(backbone) for _ in self.groups[1:])
        self.stitches = nn.ModuleList(
            CrossStitchUnit(len(self.groups), self_weight) for _ in range(backbone.num_stages - 1)
        )
        self.column_of = {t: i for i, group in enumerate(self.groups) for t in group}
        self.places = [MeetingPlace("columns", tuple(self.task_names), (self,), levels=("params",))]

    def _all_columns(self) -> list[Backbone]:
        return [self.backbone, *self.columns]

    def stage_parameters(self) -> list[list[nn.Parameter]]:
        columns = self._all_columns()
        return [
            [p for column in columns for p in column.stage_parameters(s)]
            for s in range(self.backbone.num_stages)
        ]

    def backbone_modules(self) -> list[nn.Module]:
        return [*self._all_columns()]

    def forward(self, images: torch.Tensor, cut: bool = False) -> ArchitectureOutput:
        columns = self._all_columns()
        xs = [images for _ in columns]
        maps: list[list[torch.Tensor]] = [[] for _ in columns]
        for stage in range(self.backbone.num_stages):
            xs = [column.run_stage(stage, x) for column, x in zip(columns, xs, strict=True)]
            if stage < len(self.stitches):
                xs = self.stitches[stage](xs)
            if self.backbone.stage_emits(stage) is not None:
                for c, x in enumerate(xs):
                    maps[c].append(self.backbone.emit(x, images.shape[-2:]))
        meetings: list[Meeting] = []
        flat = [m for column_maps in maps for m in column_maps]
        leaves = iter(self.meet(meetings, self.places[0], flat, cut))
        read = [[next(leaves) for _ in column_maps] for column_maps in maps]
        features = {t: Features.of(read[self.column_of[t]]) for t in self.task_names}
        return ArchitectureOutput(features, meetings)
