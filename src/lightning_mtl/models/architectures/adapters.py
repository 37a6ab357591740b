"""Per-task adapters: a shared (typically pretrained and frozen) backbone whose later stages run
once per task with that task's low-rank adapters (LoRA, :mod:`lightning_mtl.models.lora`).

The first ``at`` stages are the shared trunk; in stages ``at`` and up, every Linear and ungrouped
Conv2d (``layers``) gets one adapter per task, and task t's maps are the trunk's followed by the
later stages run with t's adapters. With ``freeze_base`` (the default) only the adapters (and the
heads) train: parameter-efficient transfer, each task adding its adapters' parameters only.

**Adaptive allocation of parameters.** Each task's capacity is set by its rank: ``rank`` (one
number, or ``{task: rank}``), or ``budget``, adapter parameters per task (one number or
``{task: n}``), from which the rank is derived: ``rank = max(1, budget // c)`` with c the adapter
parameters per unit of rank in the adapted layers (logged; at least rank 1, so a budget below c
is exceeded). ``budget`` replaces ``rank``. A hard task can get ten times an easy one's.

Meeting places: the trunk (all tasks; both levels), when it trains. With ``freeze_base: false``
the adapted stages' base weights are shared by all tasks through different activations: they
meet at the task boundary, defined at ``level=params`` only (each task's maps come from its own
pass), so the architecture then accepts ``level=params`` only. Cost: the trunk once, the later
stages once per task.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
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
from lightning_mtl.models.lora import LAYERS, LoRALayer, TaskSwitch, cost_per_rank, inject

log = logging.getLogger(__name__)


@ARCHITECTURES.register("adapters")
class Adapters(Architecture):
    """A shared backbone with per-task LoRA adapters in its later stages (see the docstring)."""

    def __init__(
        self,
        backbone: Backbone,
        tasks: Mapping[str, str],
        at: int | None = None,
        rank: int | Mapping[str, int] | None = 8,
        budget: int | Mapping[str, int] | None = None,
        alpha: float | None = None,
        dropout: float = 0.0,
        layers: list[str] | tuple[str, ...] = LAYERS,
        freeze_base: bool = True,
    ) -> None:
        super().__init__(backbone, tasks)
        key = "model.architecture=adapters"
        total = len(backbone.require_stages(key).modules)
        self.at = int(at) if at is not None else total // 2 + 1
        layers = tuple(layers)
        if not layers or set(layers) - set(LAYERS):
            raise ConfigError(f"{key}: layers={list(layers)}; accepted: {', '.join(LAYERS)}")
        self.adapted = backbone.split(self.at, key)
        per_rank = cost_per_rank(self.adapted, layers)
        if not per_rank:
            raise ConfigError(f"{key}: stages {self.at}.. of {backbone.name!r} have no {layers}")
        self.ranks = self._ranks(rank, budget, per_rank, key)
        self.switch = TaskSwitch()
        self.base_parameters = list(self.adapted.parameters())
        inject(self.adapted, self.ranks, self.switch, layers, alpha, dropout)
        self.freeze_base = freeze_base
        if freeze_base:
            for p in [*backbone.parameters(), *self.base_parameters]:
                p.requires_grad_(False)
        self.places = [MeetingPlace("trunk", tuple(self.task_names), (backbone,))]
        if not freeze_base:
            base = tuple(self.base_parameters)
            self.places.append(
                MeetingPlace("adapted", tuple(self.task_names), (), ("params",), base, closed=False)
            )

    def _ranks(self, rank: Any, budget: Any, per_rank: int, key: str) -> dict[str, int]:
        if budget is not None:  # (it replaces rank)
            budgets = self._per_task(budget, "budget", key)
            ranks = {t: max(1, int(b) // per_rank) for t, b in budgets.items()}
            log.info(
                "%s: %s adapter parameters per unit of rank; ranks from the budget: %s",
                key,
                f"{per_rank:,}",
                ", ".join(f"{t} {r} ({r * per_rank:,} parameters)" for t, r in ranks.items()),
            )
            return ranks
        if rank is None:
            raise ConfigError(f"{key}: set rank (adapter rank per task) or budget (parameters)")
        ranks = self._per_task(rank, "rank", key)
        bad = {t: r for t, r in ranks.items() if int(r) < 1}
        if bad:
            raise ConfigError(f"{key}: rank must be >= 1, got {bad}")
        return {t: int(r) for t, r in ranks.items()}

    def _per_task(self, value: Any, name: str, key: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            return dict.fromkeys(self.task_names, value)
        missing = [t for t in self.task_names if t not in value]
        unknown = sorted(set(value) - set(self.task_names))
        if missing or unknown:
            raise ConfigError(
                f"{key}: {name}={dict(value)} must give every task of the run "
                f"({', '.join(self.task_names)}); missing {missing}, unknown {unknown}"
            )
        return {t: value[t] for t in self.task_names}

    def adapter_parameters(self, task: str) -> list[nn.Parameter]:
        """Task ``task``'s adapter parameters."""
        return [
            p
            for m in self.adapted.modules()
            if isinstance(m, LoRALayer)
            for p in [*m.down[task].parameters(), *m.up[task].parameters()]
        ]

    def stage_parameters(self) -> list[list[nn.Parameter]]:
        groups = [self.backbone.stage_parameters(s) for s in range(self.at)]
        base = {id(p) for p in self.base_parameters}
        for stage in self.adapted:
            groups.append([p for p in stage.parameters() if id(p) in base])
        return groups

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone, self.adapted]

    def forward(self, images: torch.Tensor, cut: bool = False) -> ArchitectureOutput:
        meetings: list[Meeting] = []
        x, maps = self.backbone.run(images, 0, self.at)
        shared = self.meet(meetings, self.places[0], [*maps, x], cut)
        maps, x = shared[:-1], shared[-1]
        own: dict[str, list[torch.Tensor]] = {}
        end = self.at + len(self.adapted)
        for task in self.task_names:
            self.switch.active = task
            try:
                _, own[task] = self.backbone.run(images, self.at, end, x=x, copies=self.adapted)
            finally:
                self.switch.active = None
        if len(self.places) > 1:  # the shared base weights meet at the task boundary
            flat = [m for task in self.task_names for m in own[task]]
            leaves = iter(self.meet(meetings, self.places[1], flat, cut))
            own = {task: [next(leaves) for _ in own[task]] for task in self.task_names}
        features = {t: Features.of([*maps, *own[t]]) for t in self.task_names}
        return ArchitectureOutput(features, meetings)
