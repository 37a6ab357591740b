"""The registry of weighting methods; ``build_weighting`` is the one factory over it."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_mtl.registry import Registry
from lightning_mtl.weighting.base import Weighting

WEIGHTINGS: Registry[Weighting] = Registry("weighting method")


def build_weighting(
    name: str, tasks: Sequence[str], task_weights: Mapping[str, float] | None = None, **kwargs: Any
) -> Weighting:
    """Create the weighting ``name`` for ``tasks``.

    ``task_weights`` (each task's ``weight:``) is passed to methods that accept it (``static``).
    """
    factory = WEIGHTINGS.get(name, "weighting.name")
    if "task_weights" in inspect.signature(factory).parameters:
        kwargs["task_weights"] = dict(task_weights or {})
    return WEIGHTINGS.build(name, "weighting", list(tasks), **kwargs)
