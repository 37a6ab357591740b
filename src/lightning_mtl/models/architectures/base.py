"""The architecture seam: how task features are built from the images, and where task gradients
meet.

An architecture is an ``nn.Module`` built as ``Architecture(backbone, tasks, **options)``, where
``tasks`` maps each task to what its head reads (``"maps"`` for dense heads, ``"pooled"`` for
image-level heads). It honours one small contract:

* ``forward(images, cut=False) -> ArchitectureOutput``: each task's :class:`Features` (what its
  head reads) and the :class:`Meeting` of every meeting place, in forward order;
* ``feature_info(task) -> FeatureInfo``: channels and strides of that task's maps, from which
  its head is built;
* ``places``: the static list of :class:`MeetingPlace` (name, tasks, upstream modules and
  parameters, balancer levels), known before the first forward (the params-level Gram engine
  hooks the modules before the forward pass);
* ``stage_parameters()``: the backbone-derived parameters stage by stage, bottom-up, copies
  included (freezing, gradual unfreezing, the backbone's LR scale and layer-wise LR decay).

**Meeting places.** Where the losses of several tasks flow back through the same tensors, their
gradients meet: the shared tensors, the tasks whose losses flow through them, and the
parameters upstream of them (up to the previous meeting place) that those tasks share. Hard
sharing has one (the backbone's output, all tasks); a branching tree has one per node, each with
its subset of tasks; soft sharing has no shared representation, and declares the task boundary
(what each head reads) as a place defined at ``level=params`` only. With ``cut=True`` (gradient
methods) every place hands the modules downstream *detached copies* of its tensors, so the task
gradients of a place cost backward passes through the modules between it and the losses only;
the balancer then sends one combined gradient into each place (:mod:`lightning_mtl.weighting`).

A new architecture is one file in this package (a class registered with
``@ARCHITECTURES.register("name")``) plus ``configs/architecture/<name>.yaml`` (its options and
their defaults). Loss-based balancers never look at meeting places.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.backbone import Backbone, FeatureInfo, Features
from lightning_mtl.models.meeting import LEVELS, Meeting, MeetingPlace
from lightning_mtl.registry import Registry

log = logging.getLogger(__name__)

ARCHITECTURES: Registry[Architecture] = Registry("architecture")
READS = ("maps", "pooled")


@dataclass
class ArchitectureOutput:
    """Each task's features and the meetings of the forward pass (parents before children)."""

    features: dict[str, Features]
    meetings: list[Meeting] = field(default_factory=list)


class Architecture(nn.Module):
    """Base class of every architecture (see the module docstring for the contract).

    Frozen batch-norm layers (all their parameters frozen) stay in eval mode while the rest
    trains: a frozen pretrained stage keeps its running statistics.
    """

    def __init__(self, backbone: Backbone, tasks: Mapping[str, str]) -> None:
        super().__init__()
        if not tasks:
            raise ConfigError("an architecture needs at least one task")
        bad = {t: r for t, r in tasks.items() if r not in READS}
        if bad:
            raise ValueError(f"tasks must map to one of {READS}, got {bad}")
        self.backbone = backbone
        self.task_names: list[str] = list(tasks)
        self.task_reads: dict[str, str] = dict(tasks)
        self.places: list[MeetingPlace] = []

    # ------------------------------------------------------------------------------ the contract
    def forward(self, images: torch.Tensor, cut: bool = False) -> ArchitectureOutput:
        raise NotImplementedError

    def feature_info(self, task: str) -> FeatureInfo:
        """What ``task``'s head reads (default: maps shaped like the backbone's)."""
        return self.backbone.info

    def stage_parameters(self) -> list[list[nn.Parameter]]:
        """Backbone-derived parameters per stage, bottom-up (default: the backbone's stages, or
        one group for a backbone that does not run stage by stage)."""
        if not self.backbone.staged:
            return [list(self.backbone.parameters())]
        return [self.backbone.stage_parameters(s) for s in range(self.backbone.num_stages)]

    def backbone_modules(self) -> list[nn.Module]:
        """The modules holding :meth:`stage_parameters` (the backbone and its copies)."""
        return [self.backbone]

    @property
    def levels(self) -> tuple[str, ...]:
        """The balancer levels defined at every meeting place."""
        return tuple(level for level in LEVELS if all(level in p.levels for p in self.places))

    # ------------------------------------------------------------------------------- helpers
    @property
    def name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)

    def meet(
        self,
        meetings: list[Meeting],
        place: MeetingPlace,
        tensors: Sequence[torch.Tensor],
        cut: bool,
    ) -> list[torch.Tensor]:
        """Record a meeting at ``place`` and return what downstream modules read, one tensor per
        entry of ``tensors``."""
        meeting = Meeting.of(place, tensors, cut)
        meetings.append(meeting)
        return [meeting.leaf(t) for t in tensors]

    def check_level(self, level: str, method: str) -> None:
        """Refuse a balancer level that some meeting place does not define."""
        if level in self.levels:
            return
        narrow = [p.name for p in self.places if level not in p.levels]
        raise ConfigError(
            f"weighting.level={level!r} ({method}) is not defined for "
            f"model.architecture={self.name}: its meeting place(s) {', '.join(narrow)} have no "
            f"representation shared by their tasks' heads. Accepted levels: "
            f"{', '.join(self.levels) or 'none'}."
        )

    def train(self, mode: bool = True) -> Architecture:
        """Train mode, except batch norm whose parameters are all frozen: it stays in eval mode,
        so a frozen (e.g. pretrained) stage keeps its running statistics."""
        super().train(mode)
        if mode:
            frozen_norms = 0
            for module in self.modules():
                params = list(module.parameters(recurse=False))
                frozen = params and not any(p.requires_grad for p in params)
                if isinstance(module, _BatchNorm) and frozen:
                    module.eval()
                    frozen_norms += 1
            if frozen_norms:
                _expect_frozen_norms(frozen_norms)
        return self


def _expect_frozen_norms(count: int) -> None:
    """Lightning warns when modules are in eval mode as training starts; here they are on
    purpose: say so once, and silence that warning."""
    global _FROZEN_NORMS_SAID
    if _FROZEN_NORMS_SAID:
        return
    _FROZEN_NORMS_SAID = True
    log.info("%d batch-norm layer(s) with frozen parameters run in eval mode (as intended)", count)
    warnings.filterwarnings(
        "ignore", r"Found \d+ module\(s\) in eval mode at the start of training"
    )


_FROZEN_NORMS_SAID = False


# --------------------------------------------------------------------------------------- factory
def architecture_options(spec: str | Mapping[str, Any], config_dir: Path | None) -> dict[str, Any]:
    """``{name, **options}`` from ``model.architecture``: a name (its options are the defaults of
    ``configs/architecture/<name>.yaml``) or a mapping (the options given override them)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(
            "model.architecture must be a name (e.g. model.architecture=branched) or a mapping "
            f"with a 'name' key; got {spec!r}"
        )
    name = str(spec["name"])
    ARCHITECTURES.get(name, "model.architecture")  # an unknown name lists the accepted ones
    options: dict[str, Any] = {}
    path = config_dir / "architecture" / f"{name}.yaml" if config_dir is not None else None
    if path is not None and path.is_file():
        from omegaconf import OmegaConf

        # an architecture's YAML (configs/architecture/<name>.yaml) is a mapping of its options
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        options = dict(cast("dict[str, Any]", loaded or {}))
    options.update(spec)
    options["name"] = name
    accepted = _option_names(ARCHITECTURES.get(name, "model.architecture"))
    unknown = sorted(set(options) - {"name"} - set(accepted))
    if unknown:
        close = {k: difflib.get_close_matches(k, accepted, n=1) for k in unknown}
        hints = "".join(f" Did you mean {c[0]!r} for {k!r}?" for k, c in close.items() if c)
        raise ConfigError(
            f"model.architecture ({name}): unknown option(s) {', '.join(unknown)}. Accepted "
            f"options: {', '.join(accepted)}.{hints}"
        )
    return options


def _option_names(factory: Any) -> list[str]:
    """The keyword options an architecture's constructor takes after ``backbone, tasks``."""
    parameters = list(inspect.signature(factory).parameters.values())[2:]
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_architecture(
    options: str | Mapping[str, Any], backbone: Backbone, tasks: Mapping[str, str]
) -> Architecture:
    """The architecture ``options["name"]`` with its other options (see
    :func:`architecture_options`), or a name with its Python defaults."""
    options = {"name": options} if isinstance(options, str) else dict(options)
    name = options.pop("name")
    return ARCHITECTURES.build(name, f"model.architecture ({name})", backbone, tasks, **options)


def task_groups(
    groups: Sequence[Sequence[str]] | None, tasks: Mapping[str, str], key: str
) -> list[list[str]]:
    """Validated task groups (each task in exactly one); None groups tasks by what their heads
    read (dense heads together, image-level heads together), or one group per task when all
    heads read the same."""
    names = list(tasks)
    if groups is None:
        by_kind = [[t for t in names if tasks[t] == kind] for kind in READS]
        by_kind = [g for g in by_kind if g]
        return by_kind if len(by_kind) > 1 else [[t] for t in names]
    checked = [[str(t) for t in group] for group in groups]
    seen = [t for group in checked for t in group]
    unknown = sorted(set(seen) - set(names))
    missing = [t for t in names if t not in seen]
    twice = sorted({t for t in seen if seen.count(t) > 1})
    if unknown or missing or twice or any(not g for g in checked):
        problems = []
        if unknown:
            problems.append(f"unknown tasks {unknown}")
        if missing:
            problems.append(f"tasks in no group {missing}")
        if twice:
            problems.append(f"tasks in several groups {twice}")
        if any(not g for g in checked):
            problems.append("an empty group")
        raise ConfigError(
            f"{key}={checked}: {'; '.join(problems)}. Every task of the run ({', '.join(names)}) "
            "must be in exactly one group."
        )
    return checked


def mix(weights: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ_e weights[:, e] · tensors[e]`` with one weight per sample (B×E), any tensor layout."""
    stacked = torch.stack(list(tensors), dim=1)  # B×E×...
    shape = (*weights.shape, *([1] * (stacked.dim() - 2)))
    return (weights.to(stacked.dtype).view(shape) * stacked).sum(dim=1)
