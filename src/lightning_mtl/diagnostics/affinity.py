"""Inter-task affinity by look-ahead (Fifty et al., NeurIPS 2021, "Efficiently Identifying Task
Groupings for Multi-Task Learning", TAG) and the task groupings it suggests.

The affinity of task i onto task j at a training step, on the step's batch X::

    θ_{s|i} = θ_s − η ∇_{θ_s} L_i(X, θ_s, θ_i)        (a plain gradient step on i alone)
    Z_{i→j} = 1 − L_j(X, θ_{s|i}, θ_j) / L_j(X, θ_s, θ_j)

θ_s are the shared parameters, θ_j task j's own (unchanged by the look-ahead). Z_{i→j} > 0: a
step on i lowers j's loss (i helps j); Z_{i→j} < 0: i hurts j; Z_{i→i} is a task's effect on
itself. Averaged over the measuring steps of a run, the k×k table says which tasks to train
together (:func:`suggest_groups`).

Pure functions on tensors: no Lightning here (the callback that measures during training is
:class:`lightning_mtl.callbacks.task_affinity.TaskAffinityMonitor`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

#: suggest_groups searches every partition (by dynamic programming over subsets, 3^k · groups
#: steps in Python): under a tenth of a second at 10 tasks, about a second at 12; beyond (three
#: times the work per task added), refused.
MAX_GROUPING_TASKS = 12

#: ``losses_at(values)``: every task's loss with the shared parameters replaced by ``values``
#: (one tensor per shared parameter, in order), or left as they are with None
LossesAt = Callable[[Sequence[torch.Tensor] | None], Mapping[str, torch.Tensor]]


def lookahead_affinity(
    losses_at: LossesAt,
    names: Sequence[str],
    shared: Sequence[torch.Tensor],
    gradients: Sequence[Sequence[torch.Tensor] | None],
    lr: float | Sequence[float],
) -> torch.Tensor:
    """The k×k look-ahead affinity ``Z[i, j] = 1 − L_j(θ_s − η g_i) / L_j(θ_s)`` (float64, CPU).

    Args:
        losses_at: evaluates every task's loss on the step's batch, with the shared parameters
            replaced by the given values (None: as they are). It must be deterministic across
            calls (same dropout masks, no state that moves: the caller forks the RNG and copies
            the buffers), so that the only difference between two calls is the parameters.
            Tasks missing from its result have no loss there.
        names: the k tasks, in the order of the rows and columns.
        shared: the shared parameters θ_s.
        gradients: per task, its gradient ``g_i`` with respect to each of ``shared`` (same
            shapes), or None for a task absent from the step.
        lr: the look-ahead step size η (> 0): one for every shared parameter, or one each
            (the learning rate of the parameter's optimizer group, which differs between
            backbone stages under ``backbone_lr_scale`` or ``layer_decay``).

    Rows are the task stepped on (i), columns the task whose loss changes (j). An entry is NaN,
    never inf and never an error, where it has no meaning: row i when task i has no gradient
    (absent from the step); column j when task j's loss before the step is missing, not finite,
    or not positive (the ratio assumes a positive loss: with zero there is nothing to lower, and
    a negative loss turns the sign around); and a single entry whose look-ahead loss is missing
    or not finite (the step blew the loss up; that says "hurts", but an infinite value would
    poison every mean it enters).

    Cost: k + 1 calls of ``losses_at`` (the base losses once, then one look-ahead per task
    with a gradient), plus one copy of the shared parameters at a time.
    """
    rates = [float(lr)] * len(shared) if isinstance(lr, int | float) else [float(r) for r in lr]
    if len(rates) != len(shared) or not all(r > 0 and math.isfinite(r) for r in rates):
        raise ValueError(f"lr must be one finite number > 0 per shared parameter, got {lr}")
    if len(gradients) != len(names):
        raise ValueError(f"{len(gradients)} gradients for {len(names)} tasks")
    k = len(names)
    affinity = torch.full((k, k), math.nan, dtype=torch.float64)
    base = _loss_values(losses_at(None), names)
    usable = [value is not None and math.isfinite(value) and value > 0 for value in base]
    for i, gradient in enumerate(gradients):
        if gradient is None:
            continue
        if len(gradient) != len(shared):
            raise ValueError(
                f"task {names[i]!r}: {len(gradient)} gradients for {len(shared)} shared parameters"
            )
        with torch.no_grad():
            stepped = [
                p.detach() - rate * g.to(p.dtype)
                for p, g, rate in zip(shared, gradient, rates, strict=True)
            ]
        after = _loss_values(losses_at(stepped), names)
        for j in range(k):
            value = after[j]
            if usable[j] and value is not None and math.isfinite(value):
                affinity[i, j] = 1.0 - value / base[j]  # type: ignore[operator]
    return affinity


def _loss_values(losses: Mapping[str, torch.Tensor], names: Sequence[str]) -> list[float | None]:
    """The named losses as Python floats (one device transfer), None where missing."""
    present = [n for n in names if n in losses]
    if not present:
        return [None] * len(names)
    values = torch.stack([losses[n].detach().double().reshape(()) for n in present]).tolist()
    found = dict(zip(present, values, strict=True))
    return [found.get(n) for n in names]


# ------------------------------------------------------------------------------------ groupings
def suggest_groups(
    names: Sequence[str], affinity: np.ndarray | torch.Tensor, n_groups: int
) -> tuple[list[list[str]], float]:
    """The partition of the tasks into exactly ``n_groups`` disjoint, non-empty groups that
    maximises the total affinity score, and that score.

    A task's score is the mean affinity onto it from the other members of its group,
    ``mean_{i ∈ G, i ≠ j} Z[i, j]`` (0 for a task alone in its group: nothing helps or hurts
    it); the total is the mean of the task scores over all k tasks. NaN entries (pairs never
    measured, see :func:`lookahead_affinity`) count as 0, no evidence either way; the diagonal
    is not used.

    The search is exact: the best partition over all of them (a dynamic programme over the
    subsets of tasks, since a group's contribution depends on its members only; 3^k · n_groups
    steps). Refused above :data:`MAX_GROUPING_TASKS` tasks. Ties go to the partition found
    first, deterministically. Groups list their tasks in the order of ``names`` and come in the
    order of their first task.

    The paper's own search (after Standley et al. 2020) lets a task sit in several groups and
    be served by the group where it scores best (groups may overlap, each task counted once, at
    its best group); this is the simpler disjoint version,
    because one branch per group, every task in exactly one, is what the template's
    ``branched`` architecture builds (``model.architecture={name:branched,branches:[...]}``).
    """
    best = _best_partitions(names, affinity, n_groups, only=n_groups)
    return best[n_groups]


def best_groupings(
    names: Sequence[str], affinity: np.ndarray | torch.Tensor, max_groups: int | None = None
) -> list[tuple[int, list[list[str]], float]]:
    """``(n, groups, score)`` of :func:`suggest_groups` for every number of groups
    ``n = 1 .. max_groups`` (default: k, every task alone), from one search."""
    k = len(names)
    max_groups = k if max_groups is None else max_groups
    best = _best_partitions(names, affinity, max_groups)
    return [(n, *best[n]) for n in range(1, max_groups + 1)]


def _best_partitions(
    names: Sequence[str],
    affinity: np.ndarray | torch.Tensor,
    max_groups: int,
    only: int | None = None,
) -> dict[int, tuple[list[list[str]], float]]:
    """The best partition into n groups, for n up to ``max_groups`` (or ``only``)."""
    matrix = _checked_matrix(names, affinity)
    k = len(names)
    if not 1 <= max_groups <= k:
        raise ValueError(f"the number of groups must be in 1..{k} (the tasks), got {max_groups}")
    if k > MAX_GROUPING_TASKS:
        raise ValueError(
            f"suggest_groups searches every partition of the tasks; {k} tasks are too many "
            f"(at most {MAX_GROUPING_TASKS}): group a subset of them, or fix some groups by hand"
        )
    off = np.where(np.isnan(matrix), 0.0, matrix)
    np.fill_diagonal(off, 0.0)
    full = (1 << k) - 1
    # a group's share of the total (times k): Σ_{j∈G} mean_{i∈G, i≠j} Z[i, j]
    value = [0.0] * (full + 1)
    for mask in range(1, full + 1):
        members = [t for t in range(k) if mask >> t & 1]
        if len(members) > 1:
            value[mask] = float(off[np.ix_(members, members)].sum()) / (len(members) - 1)
    # best[n][mask]: the best total value of mask's tasks in exactly n groups; choice: one group
    minus = -math.inf
    best = [[minus] * (full + 1)]
    best[0][0] = 0.0
    choice: list[list[int]] = [[0] * (full + 1)]
    for n in range(1, max_groups + 1):
        row, picked, previous = [minus] * (full + 1), [0] * (full + 1), best[n - 1]
        for mask in range(1, full + 1):
            low = mask & -mask  # the group holding mask's first task: enumerate the rest of it
            rest = mask ^ low
            sub = rest
            while True:
                group = sub | low
                candidate = previous[mask ^ group]
                if candidate > minus:
                    total = value[group] + candidate
                    if total > row[mask]:
                        row[mask], picked[mask] = total, group
                if sub == 0:
                    break
                sub = (sub - 1) & rest
        best.append(row)
        choice.append(picked)
    found: dict[int, tuple[list[list[str]], float]] = {}
    for n in [only] if only is not None else range(1, max_groups + 1):
        groups, mask = [], full
        for m in range(n, 0, -1):
            group = choice[m][mask]
            groups.append([names[t] for t in range(k) if group >> t & 1])
            mask ^= group
        groups.sort(key=lambda g: list(names).index(g[0]))
        found[n] = (groups, best[n][full] / k)
    return found


def _checked_matrix(names: Sequence[str], affinity: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(affinity, torch.Tensor):
        affinity = affinity.detach().double().cpu().numpy()
    matrix = np.array(affinity, dtype=np.float64)
    k = len(names)
    if k == 0:
        raise ValueError("no tasks to group")
    if len(set(names)) != k:
        raise ValueError(f"task names must be distinct, got {list(names)}")
    if matrix.shape != (k, k):
        raise ValueError(f"affinity must be {k}×{k} for {k} tasks, got shape {matrix.shape}")
    if np.isinf(matrix).any():
        raise ValueError("affinity has infinite entries (use NaN for pairs not measured)")
    return matrix


# ------------------------------------------------------------------------------------ the report
def format_affinity(
    names: Sequence[str],
    matrix: np.ndarray | torch.Tensor,
    measurements: int | None = None,
) -> str:
    """The affinity table in Markdown (rows: the task stepped on, ``i →``; columns: the task
    whose loss changes) and the best disjoint grouping into 2 and 3 groups where there are
    enough tasks, for a run folder's report. ``measurements``: how many steps it averages."""
    table = _checked_matrix(names, matrix)
    k = len(names)
    lines = ["# Inter-task affinity (look-ahead, Fifty et al. 2021)", ""]
    lines.append(
        "Z[i → j] = 1 − L_j(after a gradient step on task i alone) / L_j(before), on the same "
        "batch: positive, a step on i lowers j's loss (i helps j); negative, i hurts j. The "
        "diagonal is each task's effect on itself. Signs and relative sizes are what count; the "
        "values scale with the learning rate (3 significant digits; n/a: never measured)."
        + (f" Mean over {measurements} measuring steps." if measurements is not None else "")
    )
    lines += ["", "| i → j | " + " | ".join(names) + " |", "|---" * (k + 1) + "|"]
    for i, name in enumerate(names):
        cells = ["n/a" if math.isnan(v) else f"{v:+.3g}" for v in table[i]]
        lines.append(f"| {name} → | " + " | ".join(cells) + " |")
    shown = [n for n in (2, 3) if n <= k and k <= MAX_GROUPING_TASKS]
    if shown:
        lines += ["", "## Suggested groups (disjoint, each task in one group)", ""]
        lines.append(
            "Score: each task's mean affinity from the other members of its group (0 alone), "
            "averaged over the tasks; unmeasured pairs count as 0."
        )
        lines.append("")
        for n in shown:
            groups, score = suggest_groups(names, table, n)
            text = " | ".join("{" + ", ".join(g) + "}" for g in groups)
            lines.append(f"- {n} groups: {text} (score {score:+.3g})")
    return "\n".join(lines) + "\n"
