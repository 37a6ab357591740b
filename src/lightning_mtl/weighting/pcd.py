"""PCD, Priority-Constrained Descent ("Not All Objectives Are Born Equal", TMLR 2026).

The template's tool for **task prioritisation**: one task leads, the others are guaranteed a
share of progress. With the present tasks sorted by ``priority`` (the first one present is the
step's *primary* task, g₁) and each gradient normalised, ``g̃ᵢ = sᵢ gᵢ``,

    d̃ = argmin_d ½ ‖d − g̃₁‖²   s.t.   g̃ⱼ·d ≥ τⱼ ‖g̃ⱼ‖²   for every secondary task j,

i.e. follow the primary gradient as closely as possible while each secondary task gets at least
the fraction τⱼ of the first-order progress a step along its own normalised gradient would give.
The scale is ``sᵢ = 1/√(v̂ᵢ + ε)``, v̂ᵢ the bias-corrected EMA (decay β) of ‖gᵢ‖², so τ is
scale-free. The direction is d̃ rescaled to ‖g₁‖: ``d = Jᵀw`` with ``w = [1, μ₂, …]·s·‖g₁‖/‖d̃‖``
(μⱼ ≥ 0 the constraints' KKT multipliers).

The QP is torchjd's ``_solve_qp`` (the dual active-set method of Goldfarb & Idnani on G alone),
a private function of the pinned torchjd 0.18 (pyproject pins ``>=0.18,<0.19``); the rest of
torchjd's ``PCDWeighting`` is rewritten here because its state (one EMA vector and one step count
for a fixed task order) cannot follow tasks that come and go.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torchjd.aggregation._pcd import _solve_qp

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


def priority_order(priority: Sequence[str] | None, tasks: list[str]) -> list[str]:
    """``priority`` checked to name every task exactly once (None: the task order)."""
    if priority is None:
        return list(tasks)
    if isinstance(priority, str) or not isinstance(priority, Sequence):
        raise ConfigError(
            f"weighting.priority={priority!r} must be a list of task names, highest priority "
            f"first; tasks: {tasks}"
        )
    names = [str(name) for name in priority]
    unknown = sorted(set(names) - set(tasks))
    missing = [t for t in tasks if t not in names]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if unknown or missing or repeated:
        problems = [
            f"{what} {found}"
            for what, found in (("unknown", unknown), ("missing", missing), ("repeated", repeated))
            if found
        ]
        raise ConfigError(
            f"weighting.priority={names} must name each task exactly once ({'; '.join(problems)});"
            f" tasks: {tasks}"
        )
    return names


def task_taus(tau: float | Mapping[str, float], tasks: list[str], order: list[str]) -> torch.Tensor:
    """One τ per task (``self.tasks`` order), from a number or a ``{task: τ}`` mapping.

    A mapping must give every task that can be secondary, i.e. all but the top-priority one."""
    if isinstance(tau, Mapping):
        values = {str(name): value for name, value in tau.items()}
        unknown = sorted(set(values) - set(tasks))
        missing = [t for t in order[1:] if t not in values]
        if unknown or missing:
            raise ConfigError(
                f"weighting.tau={values} must map task names to numbers in [0, 1], one for every "
                f"task but the top-priority {order[0]!r} (never secondary); unknown {unknown}, "
                f"missing {missing}"
            )
        numbers = [values.get(t, 0.0) for t in tasks]
    else:
        numbers = [tau] * len(tasks)
    for name, value in zip(tasks, numbers, strict=True):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ConfigError(
                f"weighting.tau for task {name!r} is {value!r}; expected a number in [0, 1]"
            )
    return torch.tensor([float(v) for v in numbers], dtype=torch.float64)


@WEIGHTINGS.register("pcd")
class PCD(GradientWeighting):
    """PCD: ``priority`` (task names, highest first), ``tau`` (a number or ``{task: τ}``),
    ``beta`` (EMA decay of ‖gᵢ‖², in [0, 1)), ``eps`` (≥ 0, added to the EMA before √).

    State: per task, the EMA of ‖gᵢ‖² and its own step count for the bias correction
    ``v̂ᵢ = vᵢ / (1 − β^{nᵢ})`` (buffers, checkpointed). A task absent from a step keeps both;
    when it returns, its EMA resumes where it stopped. Cost per step: the QP on the m×m Gram
    matrix, about m active-set iterations of at most an m×m solve each (O(m⁴) worst case, on
    numbers only).

    Corners (as torchjd's): a zero primary gradient gives zero weights (no shared update this
    step; the heads still train); infeasible constraints (e.g. two anti-parallel secondary
    gradients) are dropped and d = g₁; a d̃ that is zero up to the Gram matrix's rounding gives
    zero weights; one present task gets weight 1 (it is the primary); a non-finite G gives NaN
    weights and leaves the state untouched (the base step never passes one here).
    """

    # buffers (register_buffer in __init__), declared for the type checker
    sq_norm_ema: torch.Tensor
    steps: torch.Tensor

    exact_gram = True  # a solve/pseudo-inverse/eigen cut-off of G: G in float64

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        priority: Sequence[str] | None = None,
        tau: float | Mapping[str, float] = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks, level, seed)
        if not 0 <= beta < 1:
            raise ConfigError(f"weighting.beta={beta!r}; PCD needs a decay in [0, 1)")
        if not eps >= 0:
            raise ConfigError(f"weighting.eps={eps!r}; PCD needs eps >= 0")
        self.beta, self.eps = float(beta), float(eps)
        order = priority_order(priority, self.tasks)
        self.rank = {self.index[name]: r for r, name in enumerate(order)}
        self.taus = task_taus(tau, self.tasks, order)
        k = len(self.tasks)
        self.register_buffer("sq_norm_ema", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros(k, dtype=torch.long))

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        m = len(present)
        if m == 0:
            return gram.new_zeros(0)
        gram = gram.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(gram).all()):
            return torch.full((m,), math.nan, dtype=torch.float64)
        order = sorted(range(m), key=lambda j: self.rank[present[j]])  # primary first
        tasks = [present[j] for j in order]
        sorted_gram = gram[order][:, order]
        scales = self._update_scales(sorted_gram.diagonal(), tasks)
        weights = self._weights(sorted_gram, scales, self.taus[tasks[1:]])
        out = torch.empty(m, dtype=torch.float64)
        out[order] = weights
        return out

    def _update_scales(self, sq_norms: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        """Advance the present tasks' EMAs of ‖gᵢ‖²; their normalising scales ``sᵢ``."""
        index = torch.tensor(tasks, device=self.sq_norm_ema.device)
        previous = self.sq_norm_ema[index].cpu()
        steps = self.steps[index].cpu() + 1
        ema = self.beta * previous + (1.0 - self.beta) * sq_norms
        self.sq_norm_ema[index] = ema.to(self.sq_norm_ema)
        self.steps[index] = steps.to(self.steps)
        correction = torch.tensor([1.0 - self.beta ** int(n) for n in steps], dtype=torch.float64)
        denominators = (ema / correction + self.eps).sqrt()
        # an EMA of zero: the gradient was always zero, its scale does not matter
        return torch.where(denominators > 0, 1.0 / denominators, 0.0)

    @staticmethod
    def _weights(gram: torch.Tensor, scales: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        """The weights of the (priority-sorted) gradients: the QP's, rescaled to ‖g₁‖."""
        weights = torch.zeros(gram.shape[0], dtype=torch.float64)
        sq_norms = gram.diagonal()
        if not sq_norms[0] > 0:
            return weights
        precision = 10.0 * torch.finfo(torch.float64).eps
        normalized = gram * torch.outer(scales, scales)
        w = _solve_qp(normalized, taus, dependence_tol=max(1e-9, precision))
        sq_norm = w @ normalized @ w
        rounding = (w.abs() @ normalized.diagonal().clamp_min(0).sqrt()) ** 2
        if sq_norm > precision * rounding:
            weights = w * scales * (sq_norms[0] / sq_norm).sqrt()
        return weights
