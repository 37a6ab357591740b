"""What a gradient rule reads at one meeting place, for the global batch: the Gram matrix G of
the task gradients (float64), and where the rule or the params-level path needs them the
parameters' Jacobian and the cross-half Gram matrix ``J₁J₂ᵀ``; with the DDP all-reduce that
makes them global. The step that uses them is :mod:`lightning_mtl.weighting.gradient`.

At the representation level G is summed leaf by leaf over the tasks reaching each leaf
(:func:`place_gram`); at the params level from the place's Gram engine when it is active and
serves the step (:mod:`~lightning_mtl.weighting.ghost_gram` within the Jacobian budget,
:mod:`~lightning_mtl.weighting.shared_gramian` above it), else from the Jacobian
(:mod:`~lightning_mtl.weighting.jacobian`), whose rows the step then combines into ``Jᵀw``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.meeting import Meeting
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.jacobian import (
    ParameterJacobian,
    batch_halves,
    cross64,
    parameter_jacobian,
)
from lightning_mtl.weighting.meetings import LeafGrads

if TYPE_CHECKING:
    from lightning_mtl.weighting.gradient import GradientWeighting


def rule_inputs(
    method: GradientWeighting,
    meeting: Meeting,
    grads: Mapping[str, LeafGrads],
    names: list[str],
    local: list[int],
    stats: torch.Tensor,
    context: StepContext,
) -> Solved:
    """What ``method``'s rule reads at ``meeting``, for the global batch: G (k×k, float64) and, where the rule or
    the params-level path needs them, the Jacobian and ``J₁J₂ᵀ``. ``stats`` (the loss
    sums and counts) is summed over ranks in place, in the same all-reduce."""
    k = len(method.tasks)
    if method.level == "representation":
        if method.needs_jacobian or method.needs_cross_gram:
            raise ConfigError(f"{type(method).__name__} is defined at level=params only")
        gram = place_gram(grads, names, local, k, len(meeting.leaves), stats.device)
        if context.all_reduce is not None:
            gram = reduce_with(gram, stats, context) / context.world_size**2
        return Solved(gram)
    cotangents = [list(grads[n]) for n in names]  # None: a tensor the task does not reach
    shares: tuple[float, ...] = (1.0,)
    if method.needs_cross_gram:
        halves = batch_halves(meeting.tensors)
        shares = tuple(float(h.mean()) for h in halves)
        # each half's rows are the gradients of that half's own mean loss: masked, / share
        cotangents = [
            [None if c is None else c * (h / h.mean()).view(-1, *[1] * (c.dim() - 1)) for c in row]
            for h in halves
            for row in cotangents
        ]
    gramian = method._gramians.get(meeting.place.name)
    if context.all_reduce is None and gramian is not None and gramian.active:
        engine_gram = gramian.gramian(
            cotangents, meeting.tensors, context.grad_scale, method.exact_gram
        )
        if engine_gram is not None:
            method.note_gram_source(meeting.place.name, gramian.source)
            return Solved.of(engine_gram.double(), local, k, shares)
    params = meeting.place.trainable_parameters()
    method.note_gram_source(meeting.place.name, "the explicit k×D Jacobian")
    jacobian = parameter_jacobian(cotangents, meeting.tensors, params, context.grad_scale)
    rows = list(local)  # the row of each task (halves: then the same again, + len(local))
    if context.all_reduce is not None or method.needs_jacobian:
        # k rows (per half) in task order: the rule reads J, or J is all-reduced
        width = sum(p.numel() for p in params)
        if local == list(range(k)) and len(shares) == 1:
            full = jacobian.matrix()  # every task has its row already, in order: no scatter
        else:
            full = torch.zeros(len(shares) * k, width, device=stats.device)
            index = torch.tensor(
                [i + h * k for h in range(len(shares)) for i in local],
                dtype=torch.long,
                device=full.device,
            )
            if local:
                full[index] = jacobian.matrix()
        if context.all_reduce is not None:
            full = reduce_with(full, stats, context) / context.world_size
        jacobian, rows = jacobian.with_matrix(full), list(range(k))
    m = len(rows)
    parts = [
        [
            jacobian.gram(method.exact_gram, range(a * m, (a + 1) * m), range(b * m, (b + 1) * m))
            for b in range(len(shares))
        ]
        for a in range(len(shares))
    ]
    local_gram = functools.reduce(
        operator.add,
        (
            shares[a] * shares[b] * parts[a][b]
            for a in range(len(shares))
            for b in range(len(shares))
        ),
    ).to(stats.device)
    cross = parts[0][1] if len(shares) == 2 else None
    solved = Solved.of(
        local_gram, rows if rows != list(range(k)) else list(range(k)), k, None, cross
    )
    solved.jacobian, solved.rows, solved.shares = jacobian, rows, shares
    return solved


class Solved:
    """What one step's rule reads: G (k×k), and where formed the parameters' Jacobian (with the
    row of each task, per half) and the cross-half Gram matrix ``J₁J₂ᵀ`` (k×k)."""

    def __init__(self, gram: torch.Tensor | None = None) -> None:
        self.gram = gram if gram is not None else torch.zeros(0, 0, dtype=torch.float64)
        self.cross: torch.Tensor | None = None
        self.jacobian: ParameterJacobian | None = None
        self.rows: list[int] = []
        self.shares: tuple[float, ...] = (1.0,)

    @classmethod
    def of(
        cls,
        local_gram: torch.Tensor,
        rows: list[int],
        k: int,
        shares: tuple[float, ...] | None,
        cross: torch.Tensor | None = None,
    ) -> Solved:
        """From the Gram matrix of the rows ``rows`` (tasks' indices): with ``shares`` it is the
        engine's (2m)×(2m) matrix of the two halves, combined here into G and ``J₁J₂ᵀ``."""
        m = len(rows)
        if shares is not None and len(shares) == 2:
            a, b = shares
            g = local_gram
            cross = g[:m, m:]
            local_gram = a * a * g[:m, :m] + a * b * (g[:m, m:] + g[m:, :m]) + b * b * g[m:, m:]
        index = torch.tensor(rows, dtype=torch.long, device=local_gram.device)
        solved = cls(local_gram.new_zeros(k, k))
        solved.gram[index[:, None], index[None, :]] = local_gram
        if cross is not None:
            solved.cross = local_gram.new_zeros(k, k)
            solved.cross[index[:, None], index[None, :]] = cross
        return solved

    def direction(
        self, weights: torch.Tensor, present: list[int]
    ) -> tuple[list[torch.Tensor], float]:
        """``Jᵀw`` per parameter (as :meth:`ParameterJacobian.combine`: parts and a factor), for
        the present tasks' ``weights`` (halves: the batch's J is their share-weighted sum)."""
        assert self.jacobian is not None
        position = {task: row for row, task in enumerate(self.rows)}
        m = len(self.rows)
        vector = weights.new_zeros(len(self.shares) * m, dtype=torch.float32)
        for w, i in zip(weights.float(), present, strict=True):
            if i in position:
                for h, share in enumerate(self.shares):
                    vector[position[i] + h * m] = w * share
        return self.jacobian.combine(vector)

    def task_jacobian(self, present: list[int]) -> torch.Tensor:
        """The present tasks' rows of J as one matrix (for rules that read J)."""
        assert self.jacobian is not None
        matrix = self.jacobian.matrix()
        return matrix if present == list(range(matrix.shape[0])) else matrix[present]


def place_gram(
    grads: Mapping[str, LeafGrads],
    names: list[str],
    local: list[int],
    k: int,
    width: int,
    device: torch.device,
) -> torch.Tensor:
    """The k×k Gram matrix (float64) of the task gradients at a meeting, formed leaf by leaf
    over the tasks that reach each leaf only: ``G[S,S] += R Rᵀ`` with R the rows of the tasks S
    reaching the leaf. A head that reads the pooled vector costs its 512 numbers per sample,
    not the whole representation's (all feature maps) of zeros."""
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    for leaf in range(width):
        reach = [
            (i, grad)
            for i, n in zip(local, names, strict=True)
            if (grad := grads[n][leaf]) is not None
        ]
        if not reach:
            continue
        index = torch.tensor([i for i, _ in reach], dtype=torch.long, device=device)
        rows = [g.reshape(-1) for _, g in reach]  # cross64 copies them block by block
        gram[index[:, None], index[None, :]] += cross64(rows, None)
    return gram


def flat_rows(
    grads: Mapping[str, LeafGrads], names: list[str], meeting: Meeting, leaves: list[int]
) -> torch.Tensor:
    """The m×|z| matrix of the tasks' gradients over the ``leaves`` (indices into
    ``meeting.leaves``; zeros where a task does not reach one)."""
    width = sum(meeting.leaves[i].numel() for i in leaves)
    if not names or not leaves:
        return torch.zeros(len(names), width, device=meeting.leaves[0].device)
    return torch.stack(
        [
            torch.cat(
                [
                    (
                        grad
                        if (grad := grads[n][i]) is not None
                        else torch.zeros_like(meeting.leaves[i], dtype=torch.float32)
                    ).reshape(-1)
                    for i in leaves
                ]
            )
            for n in names
        ]
    )


def reduce_with(tensor: torch.Tensor, stats: torch.Tensor, context: StepContext) -> torch.Tensor:
    """``tensor`` summed over the DDP ranks, in one all-reduce with ``stats`` (summed in place)."""
    assert context.all_reduce is not None
    packed = context.all_reduce(torch.cat([tensor.flatten(), stats.to(tensor.dtype).flatten()]))
    stats.copy_(packed[tensor.numel() :].view_as(stats))
    return packed[: tensor.numel()].view_as(tensor)
