"""STCH, Smooth Tchebycheff scalarization (Lin, Zhang, Yang, Zhang & Zhang, ICML 2024).

The smooth maximum of the tasks' normalised log-losses,

    STCH = μ log Σᵢ exp(λᵢ vᵢ / μ),   vᵢ = log(dᵢ + ε) − log(Nᵢ + ε),   dᵢ = Lᵢ − mᵢ,

optimises the worst-off task (a smooth Tchebycheff scalarization: every Pareto-optimal point is
reachable by some preference λ; μ → 0 gives the hard maximum). ``mᵢ`` is the loss's known lower
bound (``min_losses``, 0 by default) and ``Nᵢ`` normalises each task by its average distance over
the first ``warmup_steps`` steps (the paper's nadir estimate from a warm-up epoch), during which
the weights are equal. The weights are the gradient of k·STCH with respect to the losses,

    wᵢ = k · softmaxᵢ(λ v / μ) · λᵢ / (dᵢ + ε),

the gradient of the mean log-loss when all vᵢ agree (uniform λ). Loss values are global under
DDP. Cost O(k).

**λ and μ: the paper's convention.** λ (``preference``) lies on the simplex, uniform ``1/k`` by
default, and μ (``mu``) is the smoothing of the formula above: ``λᵢvᵢ`` differences of order μ
decide the weights. The reference code written with the STCH authors (and LibMTL's copy) takes
λ = 1 and minimises ``k · μ_ref · log Σᵢ exp(vᵢ / μ_ref)``. With uniform λ = 1/k,
``exp(λᵢvᵢ/μ) = exp(vᵢ/(kμ))``, so

    mu = μ_ref / k

gives the reference's softmax, hence its direction; our objective is then
``k · (μ_ref/k) · log Σ exp(vᵢ/μ_ref)``, the reference's divided by k, so our weights are the
reference's divided by k (a constant factor on the step size). E.g. ``μ_ref = 1`` with 3 tasks is
``mu=0.333``. (A general preference λ corresponds to the reference form with ``kλ``.) Two more
differences from the reference: it puts ε inside the ratio (``log(L/N + 1e-20)``), and during its
warm-up epoch it trains on ``Σ log Lᵢ`` where we use equal weights.

Corners:

* Tasks present in a step: the softmax runs over them (λ not renormalised), so the log-loss
  weights ``wᵢdᵢ`` still sum to ``k·Σ softmaxᵢλᵢ`` (1 for uniform λ); one task present gets
  ``k·λᵢ/(dᵢ + ε)``. An absent task's warm-up sums stay as they are; a task first seen after the
  warm-up takes its first (finite) loss as its nadir.
* ``Lᵢ < mᵢ`` is refused (``ValueError``: set ``weighting.min_losses``); ``dᵢ = 0`` gives
  ``log ε``, finite.
* A non-finite loss: the step is weighted as if that task were absent (weight 0), and it does
  not enter the nadir sums, during warm-up or after
  (:func:`~lightning_mtl.weighting.loss_checks.skip_non_finite`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.base import LossWeighting, StepContext
from lightning_mtl.weighting.loss_checks import (
    EPS,
    CheckedLossWeighting,
    distance_to_bound,
    lower_bounds,
)
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("stch")
class STCH(CheckedLossWeighting, LossWeighting):
    """STCH with smoothing ``mu``, ``warmup_steps``, an optional ``preference`` λ (on the
    simplex) and the losses' lower bounds ``min_losses``."""

    # buffers (register_buffer in __init__), declared for the type checker
    preference: torch.Tensor
    min_losses: torch.Tensor
    loss_sums: torch.Tensor
    loss_counts: torch.Tensor

    reads_loss_values = True

    def __init__(
        self,
        tasks: Sequence[str],
        mu: float = 0.5,
        warmup_steps: int = 100,
        preference: Sequence[float] | None = None,
        min_losses: float | Sequence[float] | Mapping[str, float] = 0.0,
        eps: float = EPS,
    ) -> None:
        super().__init__(tasks)
        k = len(self.tasks)
        if mu <= 0:
            raise ConfigError(f"weighting.mu={mu}; STCH needs mu > 0")
        if preference is not None and len(preference) != k:
            raise ConfigError(f"weighting.preference has {len(preference)} numbers; expected {k}")
        self.mu, self.warmup_steps, self.eps = mu, int(warmup_steps), eps
        pref = torch.full((k,), 1.0 / k) if preference is None else torch.tensor(preference)
        self.register_buffer("preference", pref.double(), persistent=False)
        bounds = lower_bounds(self.tasks, min_losses, "stch")
        self.register_buffer("min_losses", bounds, persistent=False)
        self.register_buffer("loss_sums", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("loss_counts", torch.zeros(k, dtype=torch.float64))

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        values = self.loss_values(losses, present, context).double()
        distance = distance_to_bound(self, values, present)
        if context.step < self.warmup_steps:
            self.loss_sums[present] += values.to(self.loss_sums)
            self.loss_counts[present] += 1
            return torch.ones_like(values)
        counts = self.loss_counts[present]
        unseen = counts == 0
        if bool(unseen.any()):  # first seen after the warm-up: its first loss is its nadir
            first = [i for i, new in zip(present, unseen.tolist(), strict=True) if new]
            self.loss_sums[first] = values[unseen].to(self.loss_sums)
            self.loss_counts[first] = 1.0
        means = self.loss_sums[present] / self.loss_counts[present]
        nadir = distance_to_bound(self, means, present, what="warm-up mean loss")
        shifted = distance + self.eps
        scaled = self.preference[present] * (shifted.log() - (nadir + self.eps).log())
        soft = torch.softmax(scaled / self.mu, dim=0)
        return len(self.tasks) * soft * self.preference[present] / shifted
