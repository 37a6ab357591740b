"""One gradient rule at one meeting place: from the task gradients to the weights and the term
that sends the combined gradient upstream (the step that :class:`~lightning_mtl.weighting.
gradient.GradientWeighting` runs at every place, see ``gradient.py`` for the method).

Each function takes the rule as its first argument, as :mod:`~lightning_mtl.weighting.
rule_inputs` does: the rule holds the options and the state (cached weights, the last G,
warnings), these functions the path of a step through them:

- :func:`meet_at`: G (global under DDP) -> the rule's weights, guarded (a non-finite loss is
  weighted as absent, non-finite weights fall back to equal ones, an fp16 overflow makes the
  scaler skip the step), cached for ``update_every``; the term that sends ``Σ wᵢ gᵢ`` into the
  place (or ``Jᵀw`` into the shared parameters from a kept Jacobian);
- :func:`reused_at`: a step between two updates (``update_every``): one backward pass of
  ``Σ wᵢ Lᵢ`` with the cached weights, no task gradient;
- :func:`single_threaded_blas` and :func:`step_generator_seed`: how a rule's solve runs (one
  BLAS thread; a seed per step that is the same on every rank and after a resume).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from lightning_mtl.models.meeting import Meeting
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.jacobian import inject_into_parameters
from lightning_mtl.weighting.meetings import LeafGrads, split_like, surrogate
from lightning_mtl.weighting.rule_inputs import Solved, flat_rows, rule_inputs

if TYPE_CHECKING:  # gradient.py imports this module
    from lightning_mtl.weighting.gradient import GradientWeighting


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """One controller per process: creating one scans the loaded libraries."""
    return ThreadpoolController()


def single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """NumPy/SciPy's BLAS (OpenBLAS) limited to one thread while a rule solves its k×k problem.

    The rules' eigendecompositions, pseudo-inverses and NNLS solves on k×k matrices gain nothing
    from threads, but OpenBLAS's idle workers spin for a while after each call, on the cores the
    training step then needs: measured at 40 tasks, UPGrad's and DualProj's step took 1.04×
    ``equal``'s wall time but 1.38× its CPU time (the spinning thread), CAGrad's likewise.
    ``threadpoolctl`` sets and restores the limit (about 25 µs per step)."""
    return _blas_controller().limit(limits=1, user_api="blas")


def step_generator_seed(seed: int, step: int, *more: int) -> int:
    """A seed for ``(seed, step, *more)``: identical on every DDP rank and after a resume
    (``more``: e.g. the rank, for draws that must differ between ranks)."""
    key = (int(seed), int(step), *(int(m) for m in more))
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def cached_or_mean(rule: GradientWeighting, indices: list[int]) -> torch.Tensor:
    """The cached weights of ``indices``; a task never weighted yet gets the mean of the
    cached ones (the same on every rank)."""
    cached = rule.cached_weights
    known = cached[torch.isfinite(cached)]
    fallback = known.mean() if known.numel() else cached.new_ones(())
    chosen = cached[indices]
    return torch.where(torch.isfinite(chosen), chosen, fallback)


def reused_at(
    rule: GradientWeighting,
    meeting: Meeting,
    losses: Mapping[str, torch.Tensor],
    context: StepContext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """On a step that reuses the weights (``update_every``) at the only meeting place: the
    term that sends ``Σ wᵢ ∂Lᵢ/∂z`` into it from ONE backward pass of ``Σ wᵢ Lᵢ`` through
    the heads (no task gradient, no G, no all-reduce: the cached weights are the same on
    every rank). None on a step that computes the weights."""
    if rule.updates_now(context.step):
        return None
    rule.last_gram = None  # no G this step
    names = [n for n in rule.tasks if n in losses and n in meeting.place.tasks]
    weights = cached_or_mean(rule, [rule.index[n] for n in names]).float()
    inputs = [leaf for leaf in meeting.leaves if leaf.requires_grad]
    sent: list[torch.Tensor | None] = [None] * len(meeting.leaves)
    if names:
        factor = context.grad_scale or 1.0
        weighted = sum(w * losses[n].float() for w, n in zip(weights, names, strict=True))
        got = iter(
            torch.autograd.grad(weighted * factor, inputs, retain_graph=True, allow_unused=True)
        )
        for i, leaf in enumerate(meeting.leaves):
            grad = next(got) if leaf.requires_grad else None
            sent[i] = None if grad is None else grad.float() / factor
    term = surrogate(sent, meeting) + rule.zero_term()
    return term, {n: w.detach() for n, w in zip(names, weights, strict=True)}


def meet_at(
    rule: GradientWeighting,
    meeting: Meeting,
    grads: Mapping[str, LeafGrads],
    losses: Mapping[str, torch.Tensor],
    context: StepContext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The rule at one meeting: G of its tasks (global under DDP, float64), the weights, and
    the term (zero in value) that sends ``Σ wᵢ gᵢ`` into the meeting's tensors (or, with the
    params-level Jacobian, ``Jᵀw`` into the shared parameters directly).

    ``grads``: this rank's gradient of each of the place's tasks with a local loss, with
    respect to ``meeting.leaves`` (float32, None where a task does not reach a leaf). Tasks
    outside the place are absent here. Returns the term and the weight of each task
    present at the place on any rank.
    """
    k = len(rule.tasks)
    names = [name for name in rule.tasks if name in grads]
    local = [rule.index[name] for name in names]
    device = meeting.leaves[0].device
    stats = torch.zeros(2, k, device=device, dtype=torch.float64)
    for i, name in zip(local, names, strict=True):
        stats[0, i] = losses[name].detach().double()
        stats[1, i] = 1.0
    update = rule.updates_now(context.step)
    solved = Solved()
    if update:
        solved = rule_inputs(rule, meeting, grads, names, local, stats, context)
    elif context.all_reduce is not None:
        stats.copy_(context.all_reduce(stats))
    present = [i for i in range(k) if stats[1, i] > 0]
    loss_values = stats[0, present] / stats[1, present]

    finite = True
    if not present:
        weights = torch.zeros(0, device=device, dtype=torch.float64)
    elif not update:
        weights = cached_or_mean(rule, present).to(device)
        rule.last_gram = None  # no G this step (the conflict monitor measures its own)
    else:
        rule.last_gram = solved.gram.detach()
        sub = solved.gram[present][:, present]
        finite = bool(torch.isfinite(sub).all())
        usable = torch.isfinite(loss_values)
        kept = [j for j in range(len(present)) if usable[j]]
        if finite and not bool(usable.all()):
            # a non-finite loss with finite gradients: that task is left out of the rule
            # (weight 0, as if absent), so no rule state sees it
            bad = [rule.tasks[present[j]] for j in range(len(present)) if not usable[j]]
            rule.warn_once(
                f"loss-{bad}",
                "%s: non-finite loss of %s; weighted as absent (weight 0) this step",
                type(rule).__name__,
                bad,
            )
        if finite:
            weights = torch.zeros(len(present), device=device, dtype=torch.float64)
            if kept:
                keep = [present[j] for j in kept]
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(step_generator_seed(rule.seed, context.step))
                    got = rule_weights(
                        rule, solved, sub[kept][:, kept], keep, loss_values[kept], context
                    )
                weights[kept] = got.to(device=device, dtype=torch.float64)
            finite = bool(torch.isfinite(weights).all())
            if not finite:
                rule.warn_once(
                    "nan-weights",
                    "%s gave non-finite weights; equal weights this step",
                    type(rule).__name__,
                )
                weights = torch.ones(len(present), device=device, dtype=torch.float64)
        elif context.grad_scale is not None:
            # overflow under a GradScaler: NaN gradients make the scaler skip this step
            weights = torch.full((len(present),), float("nan"), device=device)
        else:
            rule.warn_once(
                "nonfinite",
                "non-finite task gradients or losses; %s falls back to equal weights",
                type(rule).__name__,
            )
            weights = torch.ones(len(present), device=device, dtype=torch.float64)
        stored = kept if finite else list(range(len(present)))
        if stored and bool(torch.isfinite(weights).all()):
            index = [present[j] for j in stored]
            rule.cached_weights[index] = weights[stored].to(rule.cached_weights)

    position = {task: j for j, task in enumerate(present)}
    local_weights = weights[[position[i] for i in local]] if local else weights[:0]
    if solved.jacobian is not None and present and meeting.place.closed:
        parts, factor = solved.direction(weights, present)
        total = inject_into_parameters(parts, solved.jacobian.params, factor)
    else:
        total = surrogate(
            weighted_direction(rule, meeting, grads, names, local_weights, local, context), meeting
        )
    extra = None
    if update and finite and present:
        extra = rule.extra_loss(solved.gram[present][:, present], present, loss_values, context)
    total = total + (extra - extra.detach() if extra is not None else rule.zero_term())
    shown = {rule.tasks[i]: weights[j].detach().float() for j, i in enumerate(present)}
    return total, shown


def rule_weights(
    rule: GradientWeighting,
    solved: Solved,
    sub: torch.Tensor,
    present: list[int],
    losses: torch.Tensor,
    context: StepContext,
) -> torch.Tensor:
    with single_threaded_blas():
        if rule.needs_jacobian:
            jacobian = solved.task_jacobian(present)
            return rule.jacobian_weights(jacobian, present, losses, context)
        if rule.needs_cross_gram:
            assert solved.cross is not None
            cross = solved.cross[present][:, present]
            return rule.cross_gram_weights(cross, sub, present, losses, context)
        return rule.gram_weights(sub, present, losses, context)


def weighted_direction(
    rule: GradientWeighting,
    meeting: Meeting,
    grads: Mapping[str, LeafGrads],
    names: list[str],
    weights: torch.Tensor,
    local: list[int],
    context: StepContext,
) -> list[torch.Tensor | None]:
    """``Σ wᵢ gᵢ`` per leaf (None where no task reaches it); a rule that overrides
    :meth:`representation_direction` gets the flat rows over the leaves some task reaches
    (40 heads on the pooled vector: its 512 numbers per sample, not the feature maps too)."""
    if rule.custom_direction:
        reached = [
            i for i in range(len(meeting.leaves)) if any(grads[n][i] is not None for n in names)
        ]
        rows = flat_rows(grads, names, meeting, reached)
        pieces = split_like(
            rule.representation_direction(rows, weights, local, context),
            [meeting.leaves[i] for i in reached],
            keep_dtype=True,
        )
        placed: list[torch.Tensor | None] = [None] * len(meeting.leaves)
        for i, piece in zip(reached, pieces, strict=True):
            placed[i] = piece
        return placed
    direction: list[torch.Tensor | None] = []
    for index in range(len(meeting.leaves)):
        parts = [
            (w, grads[n][index])
            for w, n in zip(weights.float(), names, strict=True)
            if grads[n][index] is not None
        ]
        direction.append(
            sum((w * g for w, g in parts[1:]), start=parts[0][0] * parts[0][1]) if parts else None
        )
    return direction
