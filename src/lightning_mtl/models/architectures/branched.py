"""Branched sharing: shared early stages, then a tree of task groups, each with its own copy of
the later stages (as in Vandenhende et al., "Branched multi-task networks", BMVC 2020, with the
tree given in the config rather than searched).

The tree is declared in YAML. ``at`` is the stage where the shared trunk ends; ``branches`` lists
the groups that continue from there, each a list of tasks or a nested ``{at, branches}`` node
that shares a few more stages before splitting again::

    at: 3
    branches: [[segmentation, depth], [count, dominant_color, colors]]
    # or: branches: [{at: 4, branches: [[segmentation], [depth]]}, [count, dominant_color, colors]]

``branches: null`` groups the tasks by what their heads read (dense tasks in one branch,
image-level tasks in another; one branch per task if all read the same); ``at: null`` ends the
trunk at ``num_stages // 2 + 1`` (ResNet: after layer2; a 12-block ViT: after block 6).

Meeting places: the trunk's output (all tasks), and the end of every branch that two or more
tasks share (those tasks; the branch's stages are their shared parameters). Both balancer
levels. Cost: the trunk once, each branch's stages once; parameters grow with the number of
branches times the size of the later stages (copies start from the same, e.g. pretrained,
weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

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
from lightning_mtl.models.backbone import Backbone, Features, copy_stages


class Branch(nn.Module):
    """Stages ``[start, end)`` of one branch, then either its tasks or its sub-branches."""

    def __init__(
        self,
        stages: nn.ModuleList,
        start: int,
        tasks: list[str],
        subbranches: list[Branch],
        place: MeetingPlace | None,
    ) -> None:
        super().__init__()
        self.stages = stages
        self.start, self.end = start, start + len(stages)
        self.tasks = tasks
        self.subbranches = nn.ModuleList(subbranches)
        self.place = place


@ARCHITECTURES.register("branched")
class Branched(Architecture):
    """A trunk of the first ``at`` stages and a tree of branches (see the module docstring)."""

    def __init__(
        self,
        backbone: Backbone,
        tasks: Mapping[str, str],
        at: int | None = None,
        branches: Sequence[Any] | None = None,
    ) -> None:
        super().__init__(backbone, tasks)
        stages = backbone.require_stages("model.architecture=branched")
        total = len(stages.modules)
        self.at = int(at) if at is not None else total // 2 + 1
        self.num_stages = total
        tree = self._check_tree(branches, self.at, total)
        tail = backbone.split(self.at, "model.architecture=branched")
        self.places = [MeetingPlace("trunk", tuple(self.task_names), (backbone,))]
        self.branches = nn.ModuleList(self._build(tree, tail, self.at, "branch"))

    # ---------------------------------------------------------------------------- construction
    def _check_tree(self, branches: Sequence[Any] | None, at: int, total: int) -> list[Any]:
        """The tree with every task in exactly one leaf group and ``at`` growing downwards."""
        if branches is None:
            return task_groups(None, self.task_reads, "model.architecture.branches")
        leaves: list[list[str]] = []

        def walk(nodes: Sequence[Any], start: int) -> None:
            if not isinstance(nodes, Sequence) or isinstance(nodes, str) or not nodes:
                raise ConfigError(
                    f"model.architecture.branches: expected a non-empty list of task groups, "
                    f"got {nodes!r}"
                )
            for node in nodes:
                if isinstance(node, Mapping):
                    if set(node) != {"at", "branches"}:
                        raise ConfigError(
                            f"model.architecture.branches: a nested node has the keys at and "
                            f"branches, got {dict(node)}"
                        )
                    inner = int(node["at"])
                    if not start < inner < total:
                        raise ConfigError(
                            f"model.architecture.branches: a nested at={inner} must lie between "
                            f"its parent's at={start} and the last stage {total - 1}"
                        )
                    walk(node["branches"], inner)
                else:
                    leaves.append(list(node))

        walk(branches, at)
        task_groups(leaves, self.task_reads, "model.architecture.branches")
        return list(branches)

    def _build(self, nodes: list[Any], tail: nn.ModuleList, start: int, name: str) -> list[Branch]:
        """One branch per node; the first node takes ``tail``, the others a copy of it. Places
        are declared in forward order (a branch's before its sub-branches')."""
        built = []
        for i, node in enumerate(nodes):
            stages = tail if i == 0 else copy_stages(tail)
            label = f"{name}{i}"
            if isinstance(node, Mapping):
                inner = int(node["at"])
                own, rest = stages[: inner - start], stages[inner - start :]
                place = self._place(label, _leaf_tasks(node), own)
                sub = self._build(list(node["branches"]), rest, inner, f"{label}_")
                built.append(Branch(own, start, _leaf_tasks(node), sub, place))
            else:
                tasks = [str(t) for t in node]
                built.append(Branch(stages, start, tasks, [], self._place(label, tasks, stages)))
        return built

    def _place(self, name: str, tasks: list[str], stages: nn.ModuleList) -> MeetingPlace | None:
        """A meeting place at the end of a branch that two or more tasks share."""
        if len(tasks) < 2:
            return None
        place = MeetingPlace(name, tuple(tasks), (stages,))
        self.places.append(place)
        return place

    def stage_parameters(self) -> list[list[nn.Parameter]]:
        groups = [self.backbone.stage_parameters(s) for s in range(self.at)]
        groups += [[] for _ in range(self.at, self.num_stages)]
        for branch in self._all_branches():
            for offset, stage in enumerate(branch.stages):
                groups[branch.start + offset] += list(stage.parameters())
        return groups

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone, *(branch.stages for branch in self._all_branches())]

    def _all_branches(self) -> list[Branch]:
        found: list[Branch] = []
        todo = _as_branches(self.branches)
        while todo:
            branch = todo.pop(0)
            found.append(branch)
            todo.extend(_as_branches(branch.subbranches))
        return found

    # ----------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor, cut: bool = False) -> ArchitectureOutput:
        meetings: list[Meeting] = []
        x, maps = self.backbone.run(images, 0, self.at)
        shared = self.meet(meetings, self.places[0], [*maps, x], cut)
        features: dict[str, Features] = {}
        for branch in _as_branches(self.branches):
            self._forward_branch(branch, images, shared[-1], shared[:-1], meetings, cut, features)
        return ArchitectureOutput({t: features[t] for t in self.task_names}, meetings)

    def _forward_branch(
        self,
        branch: Branch,
        images: torch.Tensor,
        x: torch.Tensor,
        maps: list[torch.Tensor],
        meetings: list[Meeting],
        cut: bool,
        features: dict[str, Features],
    ) -> None:
        x, new = self.backbone.run(images, branch.start, branch.end, x=x, copies=branch.stages)
        if branch.place is not None:
            outputs = [*new, x] if len(branch.subbranches) else new
            met = self.meet(meetings, branch.place, outputs, cut)
            new, x = met[: len(new)], (met[-1] if len(branch.subbranches) else x)
        if not len(branch.subbranches):
            for task in branch.tasks:
                features[task] = Features.of([*maps, *new])
            return
        for sub in _as_branches(branch.subbranches):
            self._forward_branch(sub, images, x, [*maps, *new], meetings, cut, features)


def _as_branches(modules: nn.ModuleList) -> list[Branch]:
    """The ``Branch`` modules of ``modules`` (torch types a ModuleList's items as Module)."""
    return cast("list[Branch]", list(modules))


def _leaf_tasks(node: Any) -> list[str]:
    """The tasks of every leaf group under a tree node, in order."""
    if isinstance(node, Mapping):
        return [t for child in node["branches"] for t in _leaf_tasks(child)]
    return [str(t) for t in node]
