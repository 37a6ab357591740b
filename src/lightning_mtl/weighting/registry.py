"""The registry of weighting methods; ``build_weighting`` is the one factory over it."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.meeting import MeetingPlace
from lightning_mtl.registry import Registry
from lightning_mtl.weighting.base import Weighting

if TYPE_CHECKING:
    from lightning_mtl.weighting.gradient import GradientWeighting
    from lightning_mtl.weighting.places import PlaceBalancer

log = logging.getLogger(__name__)

WEIGHTINGS: Registry[Weighting] = Registry("weighting method")

#: options every gradient method takes besides its own (GradientWeighting.configure)
GRADIENT_OPTIONS = ("update_every", "jacobian_budget_mb")


def build_weighting(
    name: str,
    tasks: Sequence[str],
    task_weights: Mapping[str, float] | None = None,
    places: Sequence[MeetingPlace] | None = None,
    **kwargs: Any,
) -> Weighting:
    """Create the weighting ``name`` for ``tasks``.

    ``task_weights`` (each task's ``weight:``) is passed to methods that accept it (``static``).
    A gradient method on an architecture with several meeting ``places`` gets one instance per
    place (:class:`~lightning_mtl.weighting.places.PlaceBalancer`).
    """
    factory = WEIGHTINGS.get(name, "weighting.name")
    if "task_weights" in inspect.signature(factory).parameters:
        kwargs["task_weights"] = dict(task_weights or {})
    common = {key: kwargs.pop(key) for key in GRADIENT_OPTIONS if key in kwargs}
    if common and not getattr(factory, "needs_gradients", False):
        raise ConfigError(
            f"weighting.{', weighting.'.join(common)} applies to gradient-based methods only; "
            f"weighting={name} is loss-based (it costs no task gradient to amortise)"
        )

    def make() -> Any:
        method = WEIGHTINGS.build(name, "weighting", list(tasks), **kwargs)
        if common:  # only a gradient method accepts them (checked above)
            cast("GradientWeighting", method).configure(**common)
        return method

    if getattr(factory, "needs_gradients", False) and places is not None and len(places) > 1:
        from lightning_mtl.weighting.places import PlaceBalancer

        return PlaceBalancer(tasks, places, make)
    return make()


def build_balancer(
    config: Mapping[str, Any],
    tasks: Sequence[Any],
    places: Sequence[MeetingPlace],
    check_level: Callable[[str, str], None],
) -> Weighting:
    """The balancer of a ``weighting:`` block for ``tasks`` (``TaskSpec``s) on an architecture
    with ``places``; a gradient method's level must be one ``check_level`` accepts."""
    config = dict(config)
    if "name" not in config:
        raise ConfigError("weighting.name is missing (e.g. weighting=equal on the command line)")
    name = config.pop("name")
    custom = {t.name: t.weight for t in tasks if t.weight != 1.0}
    if custom and name != "static":
        log.warning(
            "tasks.<name>.weight %s is read only by weighting=static; weighting=%s ignores it",
            custom,
            name,
        )
    balancer = build_weighting(
        name,
        [task.name for task in tasks],
        task_weights={task.name: task.weight for task in tasks},
        places=places,
        **config,
    )
    if balancer.needs_gradients:
        # a gradient method: a GradientWeighting, or a PlaceBalancer of them (both have a level)
        check_level(cast("GradientWeighting | PlaceBalancer", balancer).level, name)
    return balancer
