"""One gradient rule per meeting place, for architectures with several of them.

A branching tree meets at its trunk (all tasks) and at every shared branch (a subset of tasks);
multi-level experts meet at every level. Each place gets its own instance of the configured rule,
so that stateful rules (Nash-MTL's warm start, GradVac's cosine targets, GradNorm's learned
weights, DB-MTL's running norms) keep one state per place: a pair of tasks may agree in the
trunk and conflict in their shared branch. Every instance is built for all the run's tasks and
sees the tasks outside its place as absent (their weights and state untouched), so
per-task options (``pref_vector``, GradDrop's ``leak``) mean the same at every place.

Checkpoint keys: ``weighting.rules.<place>.<state>``. With a single place (hard sharing, MTAN,
cross-stitch) the Lightning module uses the rule itself (keys ``weighting.<state>``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import cast

import torch
from torch import nn

from lightning_mtl.models.meeting import MeetingPlace
from lightning_mtl.weighting.base import Combined, StepContext, Weighting
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.meetings import balance, check_gradient_step


class PlaceBalancer(Weighting):
    """A gradient rule at each of ``places`` (``make_rule()`` builds one instance)."""

    needs_gradients = True

    def __init__(
        self,
        tasks: Sequence[str],
        places: Sequence[MeetingPlace],
        make_rule: Callable[[], GradientWeighting],
    ) -> None:
        super().__init__(tasks)
        self.places = list(places)
        self.rules = nn.ModuleDict({place.name: make_rule() for place in self.places})
        self.root = self.rule_at(self.places[0].name)
        self.level = self.root.level

    @property
    def optimizer_options(self) -> Mapping[str, float]:  # type: ignore[override]
        return self.root.optimizer_options

    def rule_at(self, place: str) -> GradientWeighting:
        """The rule of the meeting place named ``place``."""
        # nn.ModuleDict is untyped: its items are the GradientWeightings make_rule() built
        return cast(GradientWeighting, self.rules[place])

    @property
    def last_gram(self) -> torch.Tensor | None:
        """The Gram matrix of the first place (the one nearest the images)."""
        return self.root.last_gram

    def prepare(
        self, places: Sequence[MeetingPlace] | None, world_size: int = 1, step: int | None = None
    ) -> None:
        for place in self.places:
            self.rule_at(place.name).prepare(None if places is None else [place], world_size, step)

    def forward(
        self, losses: Mapping[str, torch.Tensor], context: StepContext | None = None
    ) -> Combined:
        return self.combine(losses, check_gradient_step(self, losses, context))

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        return balance(losses, context, lambda place: self.rule_at(place.name))

    def extra_repr(self) -> str:
        return f"rule={type(self.root).__name__}, places={[p.name for p in self.places]}"
