"""The gradient step at an architecture's meeting places, shared by every gradient method.

:func:`balance` gives ``Σ Lᵢ`` plus, at each meeting place, a term that is zero in value and whose
backward pass sends the rule's combined gradient into the place's tensors
(:class:`InjectGradient`). Task gradients at a place are taken with respect to the detached
leaves that the modules after it read (:func:`task_gradient`), through later places by the chain
rule. :func:`task_gradients` serves the gradient-conflict monitor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_mtl.models.meeting import Meeting, MeetingPlace
from lightning_mtl.weighting.base import Combined, StepContext, Weighting
from lightning_mtl.weighting.jacobian import inject_into_parameters

if TYPE_CHECKING:
    from lightning_mtl.weighting.gradient import GradientWeighting


def task_gradients(
    losses: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], scale: float | None = None
) -> torch.Tensor:
    """The m×n matrix of each loss's gradient with respect to ``inputs`` (flattened, float32).

    With a GradScaler ``scale``, gradients are taken of ``scale·L`` and divided back in float32,
    as fp16 training needs to avoid underflow. Inputs a loss does not reach, and inputs that
    need no gradient (a frozen part), get zeros.
    """
    wanted = [x for x in inputs if x.requires_grad]
    rows = []
    for loss in losses:
        scaled = loss * scale if scale is not None else loss
        got = iter(
            torch.autograd.grad(scaled, wanted, retain_graph=True, allow_unused=True)
            if wanted
            else []
        )
        flat = []
        for x in inputs:
            grad = next(got) if x.requires_grad else None
            flat.append((grad if grad is not None else torch.zeros_like(x)).reshape(-1).float())
        row = torch.cat(flat)
        rows.append(row / scale if scale is not None else row)
    if not rows:
        n = sum(x.numel() for x in inputs)
        return torch.zeros(0, n, device=inputs[0].device if inputs else None)
    return torch.stack(rows)


def check_gradient_step(
    method: Weighting, losses: Mapping[str, torch.Tensor], context: StepContext | None
) -> StepContext:
    """The context of a gradient method's step, checked. Unlike loss-based methods, these run
    with no local loss too: under DDP the rank must join the all-reduce, and its shared
    parameters must still receive a (zero) gradient."""
    unknown = set(losses) - set(method.index)
    if unknown:
        raise KeyError(f"losses for unknown tasks {sorted(unknown)}; known: {method.tasks}")
    context = context or StepContext()
    if not context.meetings:
        raise ValueError(
            f"{type(method).__name__} needs context.meetings: where the task gradients meet "
            "(see lightning_mtl.models.meeting.cut_meeting for a plain PyTorch loop)"
        )
    return context


#: a task's gradient at a meeting: one entry per leaf, None where the task does not reach it
LeafGrads = list[torch.Tensor | None]


def balance(
    losses: Mapping[str, torch.Tensor],
    context: StepContext,
    rule_for: Callable[[MeetingPlace], GradientWeighting],
) -> Combined:
    """``Σ Lᵢ`` plus, at every meeting of ``context``, the rule's combined gradient injected.

    The heads read the meetings' detached leaves, so ``Σ Lᵢ`` gives every head exactly its own
    task's gradient, and each place's combined gradient reaches exactly the parameters between
    it and the place upstream (whose tensors the modules read detached too). Places are handled
    deepest first: a task's gradient at a place is the gradient of its loss plus
    ``⟨z_q, g_q⟩`` for every later place q that the task passes (g_q its gradient there), i.e.
    the chain rule across the cuts (:func:`task_gradient`, one backward pass per task through
    the modules between the place and the next cuts). Tasks whose heads read a place's leaves
    through their own aliases (:func:`~lightning_mtl.models.meeting.task_view`) and pass no
    later place get their gradients from one backward pass together (:func:`view_gradients`).

    A rule that reuses its weights this step (``update_every``) at the only meeting place needs
    no task gradient at all (:meth:`GradientWeighting.reused_weights`).

    A place whose tensors need no gradient (everything upstream frozen), or whose shared
    parameters are all frozen, has nothing to balance: it is skipped with one warning, and its
    tasks' heads still train.
    """
    meetings = list(context.meetings)
    scale = context.grad_scale
    loss_sum = sum(losses.values(), start=torch.zeros((), device=meetings[0].leaves[0].device))
    total = torch.zeros((), device=loss_sum.device)  # the terms besides Σ Lᵢ
    at_place: list[dict[str, LeafGrads]] = [{} for _ in meetings]
    shown_at: dict[str, dict[str, torch.Tensor]] = {}
    for index in reversed(range(len(meetings))):
        meeting = meetings[index]
        place = meeting.place
        rule = rule_for(place)
        inputs = [leaf for leaf in meeting.leaves if leaf.requires_grad]
        trainable = any(p.requires_grad for p in place.parameters())
        if not inputs or not trainable:
            rule.warn_inactive(place, "its shared parameters are all frozen")
            total = total + rule.zero_term()
            if not inputs:
                continue
        present = [task for task in place.tasks if task in losses]
        if trainable and len(meetings) == 1:
            reused = rule.reused_weights(meeting, losses, context)
            if reused is not None:
                term, shown_at[place.name] = reused
                total = total + term
                continue
        later_of = {
            task: [
                (meetings[q], at_place[q][task])
                for q in range(index + 1, len(meetings))
                if task in at_place[q]
            ]
            for task in present
        }
        together = [t for t in present if not later_of[t] and t in meeting.views]
        heads_too = (
            len(meetings) == 1
            and trainable
            and bool(losses)
            and len(together) == len(losses)
            and bool(context.downstream)
        )
        grads, head_grads = view_gradients(
            {t: losses[t] for t in together},
            meeting,
            scale,
            context.downstream if heads_too else (),
        )
        if heads_too:  # the heads' gradients are in hand: Lightning's backward skips the heads
            loss_sum = loss_sum.detach()
            total = total + inject_into_parameters(*head_grads).to(total.device)
        for task in present:
            if task not in grads:
                grads[task] = task_gradient(losses[task], meeting, later_of[task], scale)
        at_place[index] = grads
        if trainable:
            term, shown = rule.meet(meeting, grads, losses, context)
            total = total + term
            shown_at[place.name] = shown
    weights: dict[str, torch.Tensor] = {}
    for meeting in meetings:  # a task's weight: at the first place (in forward order) it meets
        for task, weight in shown_at.get(meeting.place.name, {}).items():
            weights.setdefault(task, weight)
    for task, loss in losses.items():  # balanced nowhere (every place skipped): its loss as is
        weights.setdefault(task, torch.ones((), device=loss.device))
    return Combined(loss_sum + total, weights, shown_at if len(shown_at) > 1 else {})


def view_gradients(
    losses: Mapping[str, torch.Tensor],
    meeting: Meeting,
    scale: float | None,
    downstream: Sequence[torch.nn.Parameter] = (),
) -> tuple[dict[str, LeafGrads], tuple[list[torch.Tensor], list[torch.nn.Parameter]]]:
    """The gradients at ``meeting`` of tasks whose heads read it through their own aliases
    (``meeting.views``), from ONE backward pass of their summed losses: each loss reaches only
    its own task's aliases. Float32, unscaled; None where a task does not reach a leaf.

    The same pass also gives the gradients of ``Σ Lᵢ`` for the ``downstream`` parameters (the
    heads), returned with the parameters that got one."""
    if not losses:
        return {}, ([], [])
    factor = scale or 1.0
    names = list(losses)
    slots = [(t, i, v) for t in names for i, v in enumerate(meeting.views[t]) if v is not None]
    total = torch.stack([losses[t].float() for t in names]).sum() * factor
    got = torch.autograd.grad(
        total,
        [v for _, _, v in slots] + list(downstream),
        retain_graph=True,
        allow_unused=True,
    )
    grads: dict[str, LeafGrads] = {t: [None] * len(meeting.leaves) for t in names}
    for (task, index, _), grad in zip(slots, got[: len(slots)], strict=True):
        if grad is not None:
            grads[task][index] = grad.float() / factor if scale is not None else grad.float()
    used = [(g, p) for g, p in zip(got[len(slots) :], downstream, strict=True) if g is not None]
    return grads, (
        [g / factor if scale is not None else g for g, _ in used],
        [p for _, p in used],
    )


def task_gradient(
    loss: torch.Tensor,
    meeting: Meeting,
    later: Sequence[tuple[Meeting, LeafGrads]],
    scale: float | None,
) -> LeafGrads:
    """One task's gradient at ``meeting.leaves`` (float32, None where it does not reach a leaf):
    of its loss, and through each later meeting q it passes, of ``⟨z_q, g_q⟩``."""
    factor = scale or 1.0
    outputs, grad_outputs = [loss * factor], [torch.ones_like(loss)]
    for other, other_row in later:
        for tensor, part in zip(other.tensors, other_row, strict=True):
            if tensor.requires_grad and part is not None:
                outputs.append(tensor)
                grad_outputs.append((part * factor).to(tensor.dtype))
    inputs = [leaf for leaf in meeting.leaves if leaf.requires_grad]
    got = iter(
        torch.autograd.grad(
            outputs, inputs, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True
        )
    )
    row: LeafGrads = []
    for leaf in meeting.leaves:
        grad = next(got) if leaf.requires_grad else None
        if grad is not None:
            grad = grad.float() / factor if scale is not None else grad.float()
        row.append(grad)
    return row


def surrogate(direction: Sequence[torch.Tensor | None], meeting: Meeting) -> torch.Tensor:
    """Zero in value; its backward sends ``d`` (one part per tensor of the meeting, None for
    zero) into the meeting's tensors (as ``⟨z, d⟩`` would).

    Every tensor appears (with a zero direction where no head read it), so DDP with
    ``find_unused_parameters=False`` sees a gradient for every shared parameter.
    """
    total = torch.zeros((), device=meeting.tensors[0].device)
    for tensor, part in zip(meeting.tensors, direction, strict=True):
        if tensor.requires_grad:
            part = torch.zeros_like(tensor, dtype=torch.float32) if part is None else part
            total = total + InjectGradient.apply(tensor, part.detach())
    return total


class InjectGradient(torch.autograd.Function):
    """Exactly zero in value (even for a NaN direction, so the logged loss stays finite on a
    step the GradScaler skips); its backward sends ``grad · direction`` into ``feature``.

    The product is formed in float32 and only then cast to the feature's dtype: an fp16 copy of
    the unscaled direction could underflow, the scaled gradient that fp16 features receive
    does not.
    """

    @staticmethod
    def forward(ctx: Any, feature: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(direction)
        ctx.dtype = feature.dtype
        return direction.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (direction,) = ctx.saved_tensors
        return (grad.float() * direction.float()).to(ctx.dtype), None


def split_like(
    vector: torch.Tensor, tensors: Sequence[torch.Tensor], keep_dtype: bool = False
) -> list[torch.Tensor]:
    """Cut a flat vector into pieces shaped like ``tensors`` (and typed like them, unless
    ``keep_dtype``)."""
    if vector.numel() == 0:
        return [torch.zeros(t.shape, device=t.device, dtype=vector.dtype) for t in tensors]
    pieces = torch.split(vector, [t.numel() for t in tensors])
    return [
        p.view(t.shape) if keep_dtype else p.view(t.shape).to(t.dtype)
        for p, t in zip(pieces, tensors, strict=True)
    ]
