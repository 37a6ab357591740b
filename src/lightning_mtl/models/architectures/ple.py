"""PLE / CGC: shared and task-specific experts mixed by per-task gates (Tang et al., "Progressive
Layered Extraction", RecSys 2020), on top of a shared trunk.

At each extraction level l, every task t has a gate over the shared experts and its own experts:

    x_t^{l+1} = Σ_e g_{t,e}(x_t^l) · E_e(x_t^l or x_s^l),    g_t = softmax(W_t · pool(x_t^l))

where shared experts read the shared input x_s^l and task t's experts read x_t^l; a shared gate
over all experts makes x_s^{l+1} for the next level (none after the last). ``levels: 1`` is CGC
(Customized Gate Control); with no task experts it is MMoE (``model.architecture=mmoe``). Gates
weigh whole samples (one weight per expert and sample).

Experts (``expert``):

* ``stages``: copies of the backbone's later stages (from ``at``; null: one stage per level at
  the top), split into ``levels`` consecutive segments; the first shared expert keeps the
  backbone's own (e.g. pretrained) stages, the others start from copies. A task's maps are the
  trunk's, then each level's gated maps. Needs a backbone that runs stage by stage.
* ``conv``: a light block (3×3 conv-BN-ReLU twice, ``hidden`` channels, default a quarter of the
  map's) on the backbone's last
  map; the whole backbone is the trunk, and a task's last map is replaced by its gated mixture.
  Any backbone.

Meeting places: the trunk (all tasks: experts and gates read it), each level before the last
(all experts: through the shared gate every expert reaches every task), and the last level's
shared experts. Task experts of the last level and the task gates are task-side. Both balancer
levels. Cost: the trunk, then (shared + k·task) experts per level, each the size of its stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import nn

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.architectures.base import (
    ARCHITECTURES,
    Architecture,
    ArchitectureOutput,
    Meeting,
    MeetingPlace,
    mix,
)
from lightning_mtl.models.backbone import Backbone, Features, copy_stages

EXPERTS = ("stages", "conv")
Output = tuple[torch.Tensor, list[torch.Tensor]]  # an expert's output and the maps it emits


class ConvExpert(nn.Module):
    """3×3 conv-BN-ReLU, twice, keeping the map's channels and grid."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


@ARCHITECTURES.register("ple")
class PLE(Architecture):
    """Progressive layered extraction (see the module docstring)."""

    def __init__(
        self,
        backbone: Backbone,
        tasks: Mapping[str, str],
        expert: str = "conv",
        at: int | None = None,
        levels: int = 1,
        shared_experts: int = 2,
        task_experts: int = 1,
        hidden: int | None = None,
    ) -> None:
        super().__init__(backbone, tasks)
        key = f"model.architecture ({self.name})"
        if expert not in EXPERTS:
            raise ConfigError(f"{key}: expert={expert!r}; accepted: {', '.join(EXPERTS)}")
        if levels < 1 or shared_experts < 1 or task_experts < 0:
            raise ConfigError(
                f"{key}: expected levels >= 1, shared_experts >= 1 and task_experts >= 0; got "
                f"levels={levels}, shared_experts={shared_experts}, task_experts={task_experts}"
            )
        self.expert, self.levels_count = expert, levels
        if expert == "stages":
            total = len(backbone.require_stages(key).modules)
            self.at = int(at) if at is not None else total - levels
            if self.at < 1 or total - self.at < levels:
                raise ConfigError(
                    f"{key}: levels={levels} need {levels} stage(s) of experts after a trunk of "
                    f"at least the stem (at >= 1), but at={self.at} and {backbone.name!r} has "
                    f"stages 0..{total - 1}"
                )
            tail = backbone.split(self.at, key)
            bounds = [round(i * len(tail) / levels) for i in range(levels + 1)]
            segments = [tail[bounds[i] : bounds[i + 1]] for i in range(levels)]
            self.starts = [self.at + bounds[i] for i in range(levels)]
            widths = [backbone.stage_channels(self.at - 1)]
            widths += [backbone.stage_channels(self.at + bounds[i + 1] - 1) for i in range(levels)]

            def make(level: int, first: bool) -> nn.Module:
                return segments[level] if first else copy_stages(segments[level])
        else:
            if at is not None:
                raise ConfigError(f"{key}: at applies to expert=stages only")
            channels = backbone.channels[-1]
            widths = [channels] * (levels + 1)
            width = int(hidden) if hidden else max(1, channels // 4)

            def make(level: int, first: bool) -> nn.Module:
                return ConvExpert(channels, width)

        names = self.task_names
        self.shared = nn.ModuleList(
            nn.ModuleList(make(level, i == 0) for i in range(shared_experts))
            for level in range(levels)
        )
        self.own = nn.ModuleList(
            nn.ModuleDict(
                {t: nn.ModuleList(make(level, False) for _ in range(task_experts)) for t in names}
            )
            for level in range(levels)
        )
        count = shared_experts + task_experts
        self.gates = nn.ModuleList(
            nn.ModuleDict({t: nn.Linear(widths[level], count) for t in names})
            for level in range(levels)
        )
        everyone = shared_experts + len(names) * task_experts
        self.shared_gates = nn.ModuleList(
            nn.Linear(widths[level], everyone) for level in range(levels - 1)
        )
        self.places = [MeetingPlace("trunk", tuple(names), (backbone,))]
        for level in range(levels):
            last = level == levels - 1
            experts = (
                self.shared[level] if last else nn.ModuleList([self.shared[level], self.own[level]])
            )
            modules = (experts,) if level == 0 else (experts, self.shared_gates[level - 1])
            label = "experts" if levels == 1 else f"level{level}"
            # task gates and own experts may sit before the tensors: not closed
            self.places.append(MeetingPlace(label, tuple(names), modules, closed=False))

    # ----------------------------------------------------------------------------- parameters
    def stage_parameters(self) -> list[list[nn.Parameter]]:
        groups = super().stage_parameters()
        if self.expert != "stages":
            return groups
        for level in range(self.levels_count):
            experts = self._experts(level)
            for task in self.task_names:
                experts += self._experts(level, task)
            for expert in experts:  # a ModuleList of stages each (expert=stages)
                for offset, stage in enumerate(cast(nn.ModuleList, expert)):
                    groups[self.starts[level] + offset] += list(stage.parameters())
        return groups

    def backbone_modules(self) -> list[nn.Module]:
        if self.expert != "stages":
            return [self.backbone]
        return [self.backbone, self.shared, self.own]

    # torch's containers are untyped: these give the experts and gates built in __init__
    def _experts(self, level: int, task: str | None = None) -> list[nn.Module]:
        """The shared experts of ``level`` (task None) or ``task``'s own: with expert=stages a
        ``ModuleList`` of stages each, else a ``ConvExpert``."""
        if task is None:
            return list(cast(nn.ModuleList, self.shared[level]))
        return list(cast(nn.ModuleList, cast(nn.ModuleDict, self.own[level])[task]))

    def _gate(self, level: int, task: str) -> nn.Module:
        return cast(nn.ModuleDict, self.gates[level])[task]

    # ------------------------------------------------------------------------------- forward
    def _run(self, expert: nn.Module, x: torch.Tensor, level: int, images: torch.Tensor) -> Output:
        if self.expert == "conv":
            y = expert(x)
            return y, [y]
        start = self.starts[level]
        stages = cast(nn.ModuleList, expert)  # expert=stages: one ModuleList of its stages
        return self.backbone.run(images, start, start + len(stages), x=x, copies=stages)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.summarize(x) if self.expert == "stages" else x.mean(dim=(2, 3))

    def _meet(
        self, meetings: list[Meeting], place: MeetingPlace, outputs: list[Output], cut: bool
    ) -> list[Output]:
        """A meeting of the experts' outputs; the same structure back, as the modules read it."""
        flat = [t for x, maps in outputs for t in (x, *maps)]
        leaves = iter(self.meet(meetings, place, flat, cut))
        return [(next(leaves), [next(leaves) for _ in maps]) for _, maps in outputs]

    def forward(self, images: torch.Tensor, cut: bool = False) -> ArchitectureOutput:
        meetings: list[Meeting] = []
        if self.expert == "stages":
            x, maps = self.backbone.run(images, 0, self.at)
            shared = self.meet(meetings, self.places[0], [*maps, x], cut)
            maps, x = shared[:-1], shared[-1]
            task_maps = {t: list(maps) for t in self.task_names}
        else:
            maps = self.meet(meetings, self.places[0], self.backbone(images).maps, cut)
            x = maps[-1]
            task_maps = {t: list(maps[:-1]) for t in self.task_names}
        task_in = dict.fromkeys(self.task_names, x)
        shared_in = x
        for level in range(self.levels_count):
            last = level == self.levels_count - 1
            common = [self._run(e, shared_in, level, images) for e in self._experts(level)]
            own = {
                t: [self._run(e, task_in[t], level, images) for e in self._experts(level, t)]
                for t in self.task_names
            }
            if last:
                common = self._meet(meetings, self.places[level + 1], common, cut)
            else:
                everything = self._meet(
                    meetings,
                    self.places[level + 1],
                    [*common, *(o for t in self.task_names for o in own[t])],
                    cut,
                )
                common, rest = everything[: len(common)], iter(everything[len(common) :])
                own = {t: [next(rest) for _ in own[t]] for t in self.task_names}
                gate = torch.softmax(self.shared_gates[level](self._pool(shared_in)), dim=-1)
                shared_in = mix(gate, [x for x, _ in everything])
            for t in self.task_names:
                candidates = [*common, *own[t]]
                gate = torch.softmax(self._gate(level, t)(self._pool(task_in[t])), dim=-1)
                task_in[t] = mix(gate, [x for x, _ in candidates])
                if self.expert == "stages":
                    emitted = len(candidates[0][1])
                    task_maps[t] += [
                        mix(gate, [maps[j] for _, maps in candidates]) for j in range(emitted)
                    ]
        if self.expert == "conv":
            for t in self.task_names:
                task_maps[t].append(task_in[t])
        return ArchitectureOutput({t: Features.of(task_maps[t]) for t in self.task_names}, meetings)


@ARCHITECTURES.register("mmoe")
class MMoE(PLE):
    """MMoE, the Multi-gate Mixture-of-Experts (Ma et al., KDD 2018): ``experts`` shared experts
    and one softmax gate per task over them, i.e. one PLE level without task experts. Meeting
    places: the trunk and the experts' outputs (all tasks)."""

    def __init__(
        self,
        backbone: Backbone,
        tasks: Mapping[str, str],
        expert: str = "stages",
        at: int | None = None,
        experts: int = 2,
        hidden: int | None = None,
    ) -> None:
        super().__init__(
            backbone,
            tasks,
            expert=expert,
            at=at,
            levels=1,
            shared_experts=experts,
            task_experts=0,
            hidden=hidden,
        )
