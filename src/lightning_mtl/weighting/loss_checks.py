"""The corners every loss-reading balancer shares: lower bounds of the losses and non-finite values.

**Lower bounds** (``weighting.min_losses``). Methods that take the log or a ratio of a loss (FAMO,
GLS, STCH, DWA, DB-MTL), and those whose objective is unbounded below for a negative loss
(uncertainty, IMTL-L), work with the distance ``dᵢ = Lᵢ − mᵢ`` of each loss to a known lower
bound ``mᵢ`` (0 by default; set it for log-likelihoods or shifted objectives). A loss strictly
below its bound is refused (:func:`distance_to_bound`, a ``ValueError`` naming the method, the
task, the value and the bound). A distance of exactly 0 is legal: the log methods take
``log(d + ε)`` with ``ε = 1e-8`` as FAMO's and DB-MTL's official code do, and nothing is ever
clamped. Bounds are rounded to float32, the precision of the losses, so a loss exactly at its
bound is at distance 0. They come from the config, not from checkpoints.

**Non-finite losses** (NaN, ±inf; :func:`skip_non_finite`). The step is weighted as if the
non-finite tasks were absent: the other tasks get exactly the weights the method gives without
them, the method's state is not updated with the non-finite values, and the non-finite task is
shown with weight 0. Its loss still enters the sum (as ``0·Lᵢ``), so the combined loss is NaN: a
GradScaler skips the step, and ``detect_anomaly`` or the roll-back of the balancer's state see
it. One warning per method instance and task. Under DDP a task whose loss is non-finite on any
rank has a non-finite global loss, so every rank leaves it out alike. In ``mtl-train`` no balancer
sees a non-finite loss: the module's ``model.nonfinite_loss`` policy (:mod:`lightning_mtl.nonfinite`)
skips the step or drops the task first; this is the balancer's own fallback (a plain PyTorch loop).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.base import Combined, StepContext, Weighting

log = logging.getLogger(__name__)

#: the offset of ``log(d + ε)`` at a zero distance, as in FAMO's and DB-MTL's official code
EPS = 1e-8


def method_name(method: Weighting) -> str:
    """The name a config selects ``method`` by (``famo``), else its class name."""
    return str(getattr(type(method), "registered_name", type(method).__name__))


def lower_bounds(tasks: Sequence[str], min_losses: Any, method: str) -> torch.Tensor:
    """``weighting.min_losses`` as k float64 numbers (rounded to float32) in ``tasks`` order.

    Accepted: one number for every task, a list of one number per task, or ``{task: bound}``
    (unlisted tasks: 0). Anything else is a :class:`~lightning_mtl.errors.ConfigError`.
    """
    key = f"weighting.min_losses (weighting={method})"
    if isinstance(min_losses, Mapping):
        unknown = sorted(set(map(str, min_losses)) - set(tasks))
        if unknown:
            raise ConfigError(f"{key} names unknown tasks {unknown}; tasks: {list(tasks)}")
        values = [min_losses.get(task, 0.0) for task in tasks]
    elif isinstance(min_losses, Sequence) and not isinstance(min_losses, str):
        values = list(min_losses)
        if len(values) != len(tasks):
            raise ConfigError(
                f"{key} has {len(values)} numbers; expected one number, one per task "
                f"({len(tasks)}: {list(tasks)}), or {{task: bound}}"
            )
    else:
        values = [min_losses] * len(tasks)
    chosen = []
    for task, value in zip(tasks, values, strict=True):
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
        ):
            raise ConfigError(
                f"{key}: the bound of task {task!r} is {value!r}; expected a finite number "
                "(the smallest value that task's loss can take)"
            )
        chosen.append(float(value))
    return torch.tensor(chosen, dtype=torch.float32).double()


def distance_to_bound(
    method: Weighting, values: torch.Tensor, present: Sequence[int], what: str = "loss"
) -> torch.Tensor:
    """``Lᵢ − mᵢ`` (float64) for the ``present`` tasks (indices into ``method.tasks``), with
    ``mᵢ`` = ``method.min_losses``. A value strictly below its bound is refused with a
    ``ValueError`` naming the method, the task, the value, the bound and ``weighting.min_losses``.

    The one check of every method that reads ``min_losses``; NaN values pass (they are
    :func:`skip_non_finite`'s).
    """
    bounds = method.get_buffer("min_losses")[list(present)].to(values.device, torch.float64)
    distance = values.detach().double() - bounds
    below = (distance < 0).tolist()
    if any(below):
        j = below.index(True)
        name = method_name(method)
        task = method.tasks[present[j]]
        raise ValueError(
            f"weighting={name}: the {what} of task {task!r} is {float(values[j]):.9g}, below its "
            f"lower bound {float(bounds[j]):.9g}; {name} works with the distance L − min_loss, "
            f"which must be >= 0. Set weighting.min_losses to a lower bound of that loss "
            f"(one number, one per task, or {{{task}: <bound>}}; e.g. the loss's known minimum, "
            "or a value it never goes below for a log-likelihood)."
        )
    return distance


def warn_non_finite(method: Weighting, tasks: Sequence[str], values: Sequence[float]) -> None:
    """Log, once per method instance and task, that a task's loss was non-finite."""
    warned: set[str] = method.__dict__.setdefault("_warned_non_finite", set())
    new = [(task, value) for task, value in zip(tasks, values, strict=True) if task not in warned]
    if not new:
        return
    warned.update(task for task, _ in new)
    name = method_name(method)
    listed = ", ".join(f"{task!r} ({value})" for task, value in new)
    log.warning(
        "weighting=%s: non-finite loss of task %s; this step is weighted as if it were absent "
        "(weight 0, %s's state not updated with it) and the combined loss is non-finite, so a "
        "GradScaler skips the step. Warned once per task.",
        name,
        listed,
        name,
    )


def skip_non_finite(
    method: Weighting,
    losses: Mapping[str, torch.Tensor],
    context: StepContext,
    combine: Callable[[Mapping[str, torch.Tensor], StepContext], Combined],
) -> Combined:
    """``combine`` of the finite tasks only, as if the non-finite ones were absent; those get
    weight 0 and add ``0·Lᵢ`` (NaN) to the loss. Under DDP, a non-finite global loss
    (``context.global_losses``) counts as non-finite on every rank."""
    names = [name for name in method.tasks if name in losses]
    glob = context.global_losses
    local_ok = (
        torch.isfinite(torch.stack([losses[n].detach().float() for n in names])).tolist()
        if names
        else []
    )
    global_ok = torch.isfinite(glob).tolist() if glob is not None else None
    bad = [
        name
        for name, ok in zip(names, local_ok, strict=True)
        if not ok or (global_ok is not None and not global_ok[method.index[name]])
    ]
    if glob is not None and torch.isinf(glob).any():
        # ±inf on some rank: absent for every rank (NaN is how global losses say "absent")
        context = dataclasses.replace(
            context, global_losses=torch.where(torch.isfinite(glob), glob, torch.nan)
        )
    if not bad:
        return combine(losses, context)
    warn_non_finite(method, bad, [float(losses[n].detach().float()) for n in bad])
    kept = {name: losses[name] for name in names if name not in bad}
    device = losses[bad[0]].device
    if kept or (global_ok is not None and any(global_ok)):
        result = combine(kept, context)
    else:
        result = Combined(method.zero_term().to(device), {})
    total = result.loss
    for name in bad:
        total = total + 0.0 * losses[name].float()
    zero = torch.zeros((), device=device)
    weights = {
        name: result.weights.get(name, zero)
        for name in method.tasks
        if name in result.weights or name in bad
    }
    return Combined(total, weights, result.places)


class CheckedLossWeighting:
    """Mixin for :class:`~lightning_mtl.weighting.base.LossWeighting` subclasses: their
    ``combine`` runs through :func:`skip_non_finite` (put it first among the bases)."""

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        parent = super().combine  # type: ignore[misc]
        return skip_non_finite(self, losses, context, parent)  # type: ignore[arg-type]
