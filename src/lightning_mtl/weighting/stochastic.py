"""Stochastic multi-objective rules that read two independent mini-batches: MoDo and SDMGrad.

MGDA-style weights solved on one mini-batch are biased: ``E[J]ᵀ E[J]`` is not ``E[Jᵀ J]``. MoDo
and SDMGrad take each step of their weights on ``A = J₁ J₂ᵀ`` instead, J₁ and J₂ the task
Jacobians of two *independent* mini-batches, an unbiased estimate of the full Gram matrix.

Here the two mini-batches are the two halves of the step's batch: the step computes, at the
parameter level, ``cross = J₁ J₂ᵀ`` (m×m, float64, global under DDP) and calls
:meth:`CrossGramWeighting.cross_gram_weights`; the update direction is ``Jᵀλ`` of the full batch
(the paper's eq. 2.9b uses the mean of both batches' losses, which is the full batch's loss).

The weight updates are torchjd's ``MoDoWeighting`` and ``SDMGradWeighting`` (pinned 0.18), each
called with the present tasks' block of our state: the state lives in this module's k-sized
buffers (checkpointed), is read for the present tasks, re-projected onto the simplex over them
(after a step on a subset the block no longer sums to 1) and written back, so an absent task's
entry is untouched and a returning task resumes from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchjd import aggregation as jd
from torchjd.aggregation._utils.simplex import project_onto_simplex

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


def check_number(key: str, value: object, low: float, high: float, closed_high: bool) -> float:
    """``value`` as a float in ``[low, high]`` (or ``[low, high)``), else a ConfigError."""
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    inside = (
        number is not None and low <= number and (number <= high if closed_high else number < high)
    )
    if not inside:
        bracket = "]" if closed_high else ")"
        raise ConfigError(
            f"weighting.{key}={value!r}; expected a number in [{low}, {high}{bracket}"
        )
    return float(number)  # type: ignore[arg-type]


class CrossGramWeighting(GradientWeighting):
    """A rule of the cross-batch matrix ``A = J₁ J₂ᵀ``: a simplex point per task (``state``)."""

    # buffers (register_buffer in __init__), declared for the type checker
    state: torch.Tensor

    needs_cross_gram = True
    levels = ("params",)
    level_note = (
        "It reads J₁ J₂ᵀ from the two halves of the batch; at the representation level each "
        "half's gradient lives on that half's own activations, so the two touch disjoint "
        "coordinates and J₁ J₂ᵀ is identically zero."
    )

    def __init__(self, tasks: Sequence[str], level: str = "params", seed: int = 0) -> None:
        super().__init__(tasks, level, seed)
        k = len(self.tasks)
        self.register_buffer("state", torch.full((k,), 1.0 / k, dtype=torch.float64))

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} reads J₁ J₂ᵀ of two half-batches (needs_cross_gram = True): "
            "the step must call cross_gram_weights, not gram_weights"
        )

    def cross_gram_weights(
        self,
        cross: torch.Tensor,
        gram: torch.Tensor,
        present: list[int],
        losses: torch.Tensor,
        context: StepContext,
    ) -> torch.Tensor:
        """Weights of the present tasks from ``cross = J₁ J₂ᵀ`` (m×m float64; ``gram``, the full
        batch's G, is not read: the direction Jᵀλ of the full batch is the step's)."""
        m = len(present)
        cross = cross.detach().double()
        if m == 0:
            return cross.new_zeros(0)
        if not bool(torch.isfinite(cross).all()):
            return torch.full((m,), math.nan, dtype=torch.float64, device=cross.device)
        index = torch.tensor(present, device=self.state.device)
        start = project_onto_simplex(self.state[index].to(cross))
        weights, state = self.update(cross, start, present)
        if bool(torch.isfinite(weights).all() and torch.isfinite(state).all()):
            self.state[index] = state.to(self.state)
        return weights

    def update(
        self, cross: torch.Tensor, start: torch.Tensor, present: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the rule from the simplex point ``start``: the weights and the new point."""
        raise NotImplementedError


@WEIGHTINGS.register("modo")
class MoDo(CrossGramWeighting):
    """MoDo (Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning",
    JMLR 2024): one projected-gradient step of the MGDA weights per training step,

        λ ← Π_Δ(λ − γ (A λ + ρ λ)),   A = J₁ J₂ᵀ,

    with step ``gamma`` (> 0) and ℓ₂ regularisation ``rho`` (≥ 0); the direction is Jᵀλ.
    State: λ per task (``state``). Cost per step: the step's params-level Jacobian has 2m rows
    (each task on each half) instead of m, plus ``J₁J₂ᵀ`` (m²·D); the rule itself is O(m²).

    Corners: one present task gets 1; zero gradients (A = 0) shrink λ towards uniform only
    through ρ; 1e4-scaled rows make the step large, so λ jumps to a vertex or face of the simplex
    (MoDo is not scale-free: γ is in units of 1/‖g‖²); a singular A is fine (no solve); a
    non-finite A gives NaN weights and leaves λ untouched.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "params",
        seed: int = 0,
        gamma: float = 0.1,
        rho: float = 0.1,
    ) -> None:
        super().__init__(tasks, level, seed)
        self.gamma = check_number("gamma", gamma, 0.0, math.inf, closed_high=False)
        if self.gamma == 0:
            raise ConfigError("weighting.gamma=0; MoDo needs a step > 0")
        self.rho = check_number("rho", rho, 0.0, math.inf, closed_high=False)

    def update(
        self, cross: torch.Tensor, start: torch.Tensor, present: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rule = jd.MoDoWeighting(gamma=self.gamma, rho=self.rho)
        # torchjd's private state (typed as None there, where it starts unset): seeded with ours
        rule._lambda = start  # type: ignore[assignment]
        rule._state_key = (len(present), cross.dtype, cross.device)
        weights = rule(cross)
        return weights, rule._lambda  # type: ignore[return-value]


@WEIGHTINGS.register("sdmgrad")
class SDMGrad(CrossGramWeighting):
    """SDMGrad (Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms", NeurIPS 2023): MGDA pulled towards a preferred direction.

    The weights w solve ``min_{w ∈ Δ} ½ ‖Jᵀ(w + λ w̃)‖²`` by ``n_iter`` steps of projected SGD
    with momentum on the scale-normalised A (``A / (mean √diag A)²``),

        v ← momentum · v + A (w + λ w̃),   w ← Π_Δ(w − lr · v),

    and the direction is ``Jᵀ(w + λ w̃)/(1 + λ)``: ``lambda_`` (≥ 0) weighs the preference w̃
    (``pref_vector``, one number per task; uniform by default). Options: ``lr`` (> 0),
    ``momentum`` ([0, 1)), ``n_iter`` (≥ 1). State: w per task (``state``), warm-starting the
    next step. Cost per step: as MoDo's (2m Jacobian rows and ``J₁J₂ᵀ``), then n_iter m×m
    products and simplex projections, O(n_iter·m²).

    w̃ on a subset of tasks is the preference restricted to them and rescaled to keep its sum.
    Corners: one present task gets 1; A = 0 leaves w unchanged (the normalisation's 1e-8 keeps it
    finite); the normalisation makes it scale-free, so 1e4-scaled rows give the same weights; a
    singular A is fine; a non-finite A gives NaN weights and leaves w untouched.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "params",
        seed: int = 0,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Sequence[float] | None = None,
    ) -> None:
        super().__init__(tasks, level, seed)
        self.lr = check_number("lr", lr, 0.0, math.inf, closed_high=False)
        if self.lr == 0:
            raise ConfigError("weighting.lr=0; SDMGrad needs an inner step > 0")
        self.momentum = check_number("momentum", momentum, 0.0, 1.0, closed_high=False)
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ConfigError(f"weighting.n_iter={n_iter!r}; expected an integer >= 1")
        self.n_iter = n_iter
        self.lambda_ = check_number("lambda_", lambda_, 0.0, math.inf, closed_high=False)
        self.pref = self._preference(pref_vector)

    def _preference(self, pref_vector: Sequence[float] | None) -> torch.Tensor | None:
        if pref_vector is None:
            return None
        k = len(self.tasks)
        if isinstance(pref_vector, str) or len(pref_vector) != k:
            raise ConfigError(
                f"weighting.pref_vector={pref_vector!r}; expected {k} numbers, one per task "
                f"({', '.join(self.tasks)})"
            )
        values = [
            check_number(f"pref_vector[{i}]", v, 0.0, math.inf, False)
            for i, v in enumerate(pref_vector)
        ]
        return torch.tensor(values, dtype=torch.float64)

    def present_preference(self, present: list[int]) -> torch.Tensor | None:
        """w̃ of the present tasks (None: torchjd's uniform 1/m)."""
        if self.pref is None:
            return None
        part = self.pref[present]
        total = part.sum()
        return part * (self.pref.sum() / total) if total > 0 else part

    def update(
        self, cross: torch.Tensor, start: torch.Tensor, present: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rule = jd.SDMGradWeighting(
            lr=self.lr,
            momentum=self.momentum,
            n_iter=self.n_iter,
            lambda_=self.lambda_,
            pref_vector=self.present_preference(present),
        )
        # torchjd's private state (typed as None there, where it starts unset): seeded with ours
        rule._w = start  # type: ignore[assignment]
        rule._state_key = (len(present), cross.dtype, cross.device)
        weights = rule(cross)
        return weights, rule._w  # type: ignore[return-value]
