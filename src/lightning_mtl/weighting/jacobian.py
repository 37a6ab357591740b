"""The params-level Jacobian: formed from ONE k-batched backward pass, and applied without another.

At ``weighting.level=params`` a rule reads the Gram matrix of the k×D Jacobian J of the task
losses with respect to a meeting place's shared parameters θ. With the task gradients ``gᵢ`` of
the place's tensors z already known (one backward through the heads), row i of J is the
vector-Jacobian product ``(∂z/∂θ)ᵀ gᵢ``. :func:`parameter_jacobian` takes all k of them in one
``torch.autograd.grad(..., is_grads_batched=True)`` call: torch vmaps the backward pass of the
backbone over the k cotangents, so each backward kernel runs once on a k-fold batch instead of k
times (fewer, larger kernels; the Python overhead of one pass). The rule's combined gradient
``Jᵀw`` is then a k×D matrix-vector product, put straight into the parameters' ``.grad`` by
:func:`inject_into_parameters` during Lightning's backward: the backbone is not traversed a
second time. Cost per step: the forward, the heads' backward and one k-batched backbone backward
(about ``1 + k`` backward passes of compute, against the Gram-only engines' ``1 + k + 1``);
memory: the k×D Jacobian (float32; ``weighting.jacobian_budget_mb`` chooses torchjd's Gram-only
engine above it). Within the budget :mod:`~lightning_mtl.weighting.ghost_gram` takes a step
instead where its ghost products save more than that extra backward (small feature maps).

:func:`cross64` forms ``G = J Jᵀ`` in float64, in column blocks of at most 2¹⁶ numbers per row
so that the float64 copy never exceeds ``8·k·2¹⁶`` bytes (the params level's Jacobian is
converted block by block too, not parameter by parameter). Why float64: rules with a
pseudo-inverse, a linear solve or an eigenvalue cut-off (IMTL-G, Aligned-MTL, ConFIG, Nash-MTL) read the
round-off of a float32 G as rank when G is singular (dependent gradients, k > D); a float64 G
carries float32 inputs exactly (every product of two float32 numbers is exact in float64) and
sums them with 2⁻⁵³ relative error. Its cost is k²·D multiply-adds in float64: about twice the
float32 time on a CPU, on GPUs without fast float64 up to 32-64 times, in every case far below
the k backward passes that produce J.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

_BLOCK = 1 << 16  # columns per float64 block: k·512 KiB, converted while in cache
_warned_loop = False


def cross64(
    left: Sequence[torch.Tensor],
    right: Sequence[torch.Tensor] | None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``A Bᵀ`` in float64 for the flat rows ``left`` (A) and ``right`` (B; None: A itself).

    Each block of ``_BLOCK`` columns is copied (and so converted) into one preallocated float64
    buffer and multiplied there: the float64 copy stays at ``8·(rows of A and B)·2¹⁶`` bytes, in
    cache, and no block is allocated. On this project's 2-core CPU that takes 13 ms for 3 rows of
    2.4 M (resnet18's largest parameter), against 9 ms for float32 dot products and 30-64 ms for
    converting the rows whole or in larger, freshly allocated blocks. ``device``: where an empty
    product is made (no rows)."""
    n = int(left[0].numel()) if left else 0
    device = left[0].device if left else (device or torch.device("cpu"))
    size_b = len(left if right is None else right)
    total = torch.zeros(len(left), size_b, dtype=torch.float64, device=device)
    width = min(_BLOCK, n)
    a_buffer = torch.empty(len(left), width, dtype=torch.float64, device=device)
    b_buffer = a_buffer if right is None else a_buffer.new_empty(len(right), width)
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        a = _fill(a_buffer, left, start, size)
        b = a if right is None else _fill(b_buffer, right, start, size)
        total += a @ b.T
    return total


def _fill(
    buffer: torch.Tensor, rows: Sequence[torch.Tensor], start: int, size: int
) -> torch.Tensor:
    """Columns ``start:start+size`` of the flat ``rows``, copied (converted) into ``buffer``."""
    view = buffer[:, :size]
    for i, row in enumerate(rows):
        view[i].copy_(row[start : start + size])
    return view


class ParameterJacobian:
    """The m×D Jacobian of a meeting place's parameters, never held as one matrix unless asked
    (:meth:`matrix`): either ``blocks[p]``, the m×|θ_p| block of parameter p, or ``per_row[r][p]``,
    row r's gradient of parameter p as a backward pass returned it (float32, unscaled). G, the
    combined gradient and the cross-half Gram matrix are read piece by piece from either, so no
    m×D copy is made for them."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        blocks: Sequence[torch.Tensor] | None = None,
        per_row: Sequence[Sequence[torch.Tensor | None]] | None = None,
    ) -> None:
        self.params = list(params)
        #: the m×D matrix whose column blocks ``blocks`` are (:meth:`with_matrix`), else None
        self._matrix: torch.Tensor | None = None
        self._blocks = None if blocks is None else [b.reshape(b.shape[0], -1) for b in blocks]
        self._per_row = (
            None
            if per_row is None
            else [
                [
                    (g if g is not None else torch.zeros_like(p, dtype=torch.float32)).reshape(-1)
                    for g, p in zip(r, self.params, strict=True)
                ]
                for r in per_row
            ]
        )

    @property
    def rows(self) -> int:
        if self._per_row is not None:
            return len(self._per_row)
        return int(self._blocks[0].shape[0]) if self._blocks else 0

    def pieces(self, rows: range) -> list[list[torch.Tensor]]:
        """For each parameter, the list of the rows ``rows`` of its block (flat)."""
        if self._per_row is not None:
            return [[self._per_row[r][p] for r in rows] for p in range(len(self.params))]
        assert self._blocks is not None
        return [[block[r] for r in rows] for block in self._blocks]

    def gram(self, exact: bool, rows: range, other: range | None = None) -> torch.Tensor:
        """``J_a J_bᵀ`` over the rows ``rows`` (a) and ``other`` (b, default a), float64 (on the
        CPU). With ``exact`` formed in float64 (see the module docstring); otherwise each
        parameter's products in float32, summed in float64. Accumulated on the Jacobian's device
        and moved once (no host sync per product)."""
        other = rows if other is None else other
        device = self.params[0].device if self.params else torch.device("cpu")
        total = torch.zeros(len(rows), len(other), dtype=torch.float64, device=device)
        if self._blocks is not None and not exact:
            for block in self._blocks:
                a, b = block[rows.start : rows.stop], block[other.start : other.stop]
                total += (a @ b.T).double()
            return total.cpu()
        same = rows == other
        for left, right in zip(self.pieces(rows), self.pieces(other), strict=True):
            if exact:
                total += cross64(left, None if same else right, device)
                continue
            for i, x in enumerate(left):  # dot products: no stacked copy of the rows
                for j in range(i if same else 0, len(right)):
                    value = torch.dot(x, right[j]).double()
                    total[i, j] += value
                    if same and j != i:
                        total[j, i] += value
        return total.cpu()

    def combine(self, weights: torch.Tensor) -> tuple[list[torch.Tensor], float]:
        """``Jᵀw`` per parameter as ``(parts, factor)`` with ``Jᵀw = factor · parts`` (shaped like
        the parameters; w: one weight per row). Consumes the Jacobian: the sum is accumulated in
        the storage of the row of the largest weight, scaled by the ratios to it, so no new
        D-sized buffer and no scaling pass are made (:func:`inject_into_parameters` applies
        ``factor`` with the GradScaler's scale in one multiplication, or none)."""
        w = [float(v) for v in weights.float()]
        pivot = max(range(len(w)), key=lambda i: abs(w[i])) if w else 0
        factor = w[pivot] if w else 0.0
        out = []
        for p, row_parts in zip(self.params, self.pieces(range(self.rows)), strict=True):
            total = row_parts[pivot]
            if factor == 0.0:
                total.zero_()
            for i, part in enumerate(row_parts):
                if i != pivot and factor != 0.0 and w[i] != 0.0:
                    total.add_(part, alpha=w[i] / factor)
            out.append(total.view(p.shape))
        self._blocks = self._per_row = self._matrix = None  # its pivot row now holds the sum
        return out, (factor if factor != 0.0 else 1.0)

    def matrix(self) -> torch.Tensor:
        """The m×D matrix, for all-reducing and for rules that read J itself: one copy of the
        blocks or rows, none when it was built from a matrix (:meth:`with_matrix`)."""
        if self._matrix is not None:
            return self._matrix
        if self._blocks is not None:
            return torch.cat(self._blocks, dim=1)
        assert self._per_row is not None
        rows = self._per_row
        width = sum(int(part.numel()) for part in rows[0]) if rows else 0
        out = torch.empty(len(rows), width, device=self.params[0].device)
        for r, row in enumerate(rows):  # straight into the matrix (stack(cat) copied twice)
            torch.cat(row, out=out[r])
        return out

    def with_matrix(self, matrix: torch.Tensor) -> ParameterJacobian:
        """The same parameters with the blocks of ``matrix`` (views)."""
        sizes = [p.numel() for p in self.params]
        jacobian = ParameterJacobian(self.params, blocks=torch.split(matrix, sizes, dim=1))
        jacobian._matrix = matrix
        return jacobian


def parameter_jacobian(
    cotangents: Sequence[Sequence[torch.Tensor | None]],
    tensors: Sequence[torch.Tensor],
    params: Sequence[torch.nn.Parameter],
    scale: float | None,
    batched: bool | None = None,
) -> ParameterJacobian:
    """Row r of the Jacobian is ``Σ_t (∂t/∂θ)ᵀ cotangents[r][t]`` over ``tensors``, for the
    parameters ``params``. ``batched`` (default: everywhere but on a CPU): one vmapped backward
    pass over all rows (``is_grads_batched``; a graph torch cannot vmap falls back to one pass per
    row, warned once); else one pass per row, which on a CPU is faster (measured with
    ``benchmarks/weighting_cost.py``: vmap's batched convolution backward runs its k-fold batch
    no faster than k passes, and adds its own copies). With a GradScaler ``scale`` the
    cotangents are scaled before the (fp16) backward and J unscaled in float32."""
    factor = scale or 1.0
    rows = len(cotangents)
    device = tensors[0].device
    if batched is None:
        batched = device.type != "cpu"
    if rows == 0 or not params:
        return ParameterJacobian(
            params, blocks=[torch.zeros(rows, p.numel(), device=device) for p in params]
        )
    used = [i for i, t in enumerate(tensors) if t.requires_grad]
    outputs = [tensors[i] for i in used]
    cotangents = [list(row) for row in cotangents]

    def cotangent(r: int, i: int) -> torch.Tensor:
        part = cotangents[r][i]  # None: a tensor the row does not reach
        if part is None:
            return torch.zeros_like(tensors[i])
        return (part * factor).to(tensors[i].dtype)

    def block(g: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
        g = torch.zeros(rows, *p.shape, device=p.device) if g is None else g
        g = g.reshape(rows, -1).float()
        return g / factor if scale is not None else g

    if batched:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                got = torch.autograd.grad(
                    outputs,
                    list(params),
                    grad_outputs=[
                        torch.stack([cotangent(r, i) for r in range(rows)]) for i in used
                    ],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            return ParameterJacobian(
                params, blocks=[block(g, p) for g, p in zip(got, params, strict=True)]
            )
        except RuntimeError as error:
            global _warned_loop
            if not _warned_loop:
                _warned_loop = True
                log.warning(
                    "the backbone's backward pass cannot be batched over the tasks (%s); the "
                    "params-level Jacobian takes one backward pass per task",
                    str(error).splitlines()[0],
                )
    return ParameterJacobian(params, per_row=backward_rows(cotangents, tensors, params, scale))


def backward_rows(
    cotangents: Sequence[Sequence[torch.Tensor | None]],
    tensors: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    scale: float | None,
) -> list[list[torch.Tensor | None]]:
    """Per row, the gradients (float32) of ``inputs`` (parameters, or intermediate tensors) of
    ``Σ_t ⟨tensors[t], row[t]⟩``: one backward pass each, from the tensors the row reaches only,
    the graph kept (None: an input the row does not reach). With a GradScaler ``scale`` the row
    is scaled before the (fp16) pass and the gradients unscaled in float32."""
    factor = scale or 1.0
    results: list[list[torch.Tensor | None]] = []
    for row in cotangents:
        reached = [
            (tensor, part)
            for tensor, part in zip(tensors, row, strict=True)
            if part is not None and tensor.requires_grad
        ]
        if not reached or not inputs:
            results.append([None] * len(inputs))
            continue
        got = torch.autograd.grad(
            [tensor for tensor, _ in reached],
            list(inputs),
            grad_outputs=[(part * factor).to(tensor.dtype) for tensor, part in reached],
            retain_graph=True,
            allow_unused=True,
        )
        results.append(
            [None if g is None else (g.float() / factor if scale else g.float()) for g in got]
        )
    return results


def inject_into_parameters(
    directions: Sequence[torch.Tensor], params: Sequence[torch.nn.Parameter], factor: float = 1.0
) -> torch.Tensor:
    """Zero in value; in the backward pass it adds ``grad · factor · directions[p]`` to each
    parameter's gradient, as autograd does for any use of a parameter (so DDP's reducer,
    accumulation and the GradScaler see an ordinary gradient). The directions are this step's own
    buffers: they are scaled in place, and not at all where ``grad · factor`` is 1 on a CPU."""
    if not params:
        return torch.zeros(())
    return _InjectIntoParameters.apply(
        len(params), factor, *[d.detach() for d in directions], *params
    )


class _InjectIntoParameters(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, count: int, factor: float, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors[:count])
        ctx.dtypes = [p.dtype for p in tensors[count:]]
        ctx.factor = factor
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        directions = ctx.saved_tensors
        scale = grad.float() * ctx.factor
        unit = scale.device.type == "cpu" and float(scale) == 1.0  # no device sync on a CPU
        grads = []
        for d, dtype in zip(directions, ctx.dtypes, strict=True):
            if d.dtype != dtype:
                d = d.float() * scale
            elif not unit:
                d = d.mul_(scale.to(d.dtype))
            grads.append(d.to(dtype))
        return (None, None, *[None] * len(directions), *grads)


def batch_halves(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (float, over the batch) of the two halves of a step's batch: the two independent
    mini-batches of rules that read ``J₁J₂ᵀ`` (MoDo, SDMGrad). Dimension 0 of every meeting
    tensor is the batch. The halves interleave (even and odd positions), so under DDP the ranks'
    halves together are the halves one process would take of the union batch (each rank's batch
    of even size); a batch of one sample cannot be split."""
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) != 1:
        raise ValueError(
            f"the meeting tensors have batch sizes {sorted(sizes)}; a rule that reads J₁J₂ᵀ "
            "splits dimension 0 of each into two halves, which needs one batch size"
        )
    size = sizes.pop()
    if size < 2:
        raise ValueError("a rule that reads J₁J₂ᵀ splits the batch in two; it needs >= 2 samples")
    first = torch.zeros(size, device=tensors[0].device)
    first[0::2] = 1.0
    return first, 1.0 - first
