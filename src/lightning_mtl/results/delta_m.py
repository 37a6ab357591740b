"""Δm, the multi-task measure: how much a multi-task model is better or worse than training each
task alone, averaged over every metric of every task.

Maninis et al. (CVPR 2019, "Attentive single-tasking of multiple tasks") defined it over tasks;
the Nash-MTL (Navon et al. 2022) and FAMO (Liu et al. 2023) papers report it over every metric
of every task, which is what this computes::

    Δm = 100 / K · Σₖ (−1)^{hₖ} · (M_mtl,k − M_stl,k) / |M_stl,k|

over the K (task, metric) pairs, with hₖ = 1 when higher is better for metric k. Negative Δm:
the multi-task model is better than the single-task baselines on average. The absolute value in
the denominator keeps the sign meaningful for a metric whose baseline is negative (R² can be);
for the usual positive metrics it is the papers' formula. A pair whose baseline is 0 has no
relative change and is left out, as is a metric whose direction is unknown; both are reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

NOT_FINITE = "the run's value is not finite"


@dataclass
class DeltaM:
    """Δm in % (``None`` when it cannot be computed: ``missing`` says why) and its terms."""

    value: float | None
    #: (task, metric) -> the signed relative change in %, the terms of the mean
    terms: dict[tuple[str, str], float] = field(default_factory=dict)
    #: tasks of the run with no baseline value at all
    missing: list[str] = field(default_factory=list)
    #: (task, metric) pairs left out, and why
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)


def delta_m(
    mtl: Mapping[str, Mapping[str, float]],
    stl: Mapping[str, Mapping[str, float]],
    higher_is_better: Callable[[str], bool | None],
) -> DeltaM:
    """Δm of the metrics ``mtl[task][metric]`` against the baselines ``stl[task][metric]``.

    ``higher_is_better(metric)`` gives a metric's direction (``None``: unknown). Every task of
    ``mtl`` needs a baseline: when one has none, Δm is ``None`` and the task is in ``missing``
    (a Δm over fewer tasks would not be comparable with the other rows). A metric the baseline
    lacks is skipped, with the reason; a value of the run that is not finite (a diverged run)
    makes Δm ``None`` too.
    """
    result = DeltaM(value=None)
    result.missing = [task for task in mtl if not stl.get(task)]
    for task, metrics in mtl.items():
        if task in result.missing:
            continue
        for metric, value in metrics.items():
            direction = higher_is_better(metric)
            base = stl[task].get(metric)
            if direction is None:
                result.skipped[(task, metric)] = "direction unknown"
            elif base is None or not math.isfinite(base):
                result.skipped[(task, metric)] = "no baseline value"
            elif base == 0:
                result.skipped[(task, metric)] = "baseline value 0 (no relative change)"
            elif not math.isfinite(value):
                result.skipped[(task, metric)] = NOT_FINITE
            else:
                sign = -1.0 if direction else 1.0
                result.terms[(task, metric)] = 100.0 * sign * (value - base) / abs(base)
    diverged = any(why == NOT_FINITE for why in result.skipped.values())
    if result.terms and not result.missing and not diverged:
        result.value = sum(result.terms.values()) / len(result.terms)
    return result
