"""GO4Align (Shen, Wang, Xiao, van Noord & Worring, NeurIPS 2024, "GO4Align: Group Optimization
for Multi-Task Alignment").

Adaptive group risk minimisation: tasks whose losses call for similar weights are put in one
group, and every task of a group gets the group's weight. Each step, from the distances
``Dᵢ = Lᵢ − min_lossᵢ + ε`` of the present tasks:

1. risk-guided indicators ``γᵢ = βᵢ · αᵢ``, with the *scale balance* ``βᵢ = (Σⱼ Dⱼ) / Dᵢ`` (a
   task with a small loss gets a large indicator) and the *smooth alignment*
   ``αᵢ = softmaxᵢ(rᵢ)``, ``rᵢ ← rᵢ − η Dᵢ``: multiplicative weights over the risk a task has
   accumulated over the steps it was seen (η = ``robust_step_size``);
2. dynamical group assignment: K-means (K = ``num_groups``) on the m numbers γ;
3. each task's weight is its group's centroid, the mean γ of the group:
   ``wᵢ = mean{γⱼ : j in the group of i}``; the objective is ``Σ wᵢ Lᵢ``.

With one group per task (K ≥ m), ``w = γ`` and the update direction is
``(Σⱼ Dⱼ) · Σᵢ αᵢ ∇ log Dᵢ``: every task's loss falls at a relative rate set by α, whatever its
scale (and the step length grows with Σⱼ Dⱼ: tune the learning rate for it). With K = 1 every
task gets the mean γ (equal weights). α moves weight away from the tasks with the largest
accumulated loss; η·D is in loss units, so with losses far above 1 the official η = 1e-4 makes α
nearly one-hot within a few hundred steps: scale η down with the losses. With gradient
accumulation r moves once per micro-batch.

Sources: the paper's method summary and the official code (github.com/autumn9999/GO4Align,
``methods/cluster_methods.py``, class ``GO4ALIGN``: β, the α update and the centroid weights as
above, ``robust_step_size`` 1e-4). Three differences, all deliberate:

* K-means is solved exactly: γ is one number per task, and optimal 1-D clusters are intervals of
  the sorted values, so a dynamic programme over the sorted γ finds the global optimum of the
  K-means objective in O(K·m²). The official code runs Lloyd's iterations from random initial
  centres (``kmeans_pytorch``), which can stop at a local optimum and differs between seeds;
  ours is deterministic (no seed) and identical on every DDP rank.
* r (log α) is kept per task and α is the softmax over the *present* tasks, so a task absent
  from a step keeps its r; the official code renormalises α over all tasks every step (the same
  weights when every task is present).
* ``min_losses`` and ε = 1e-8 follow the convention of the other loss-based methods
  (:mod:`~lightning_mtl.weighting.loss_checks`; the official code divides by the raw loss).

Corners: one present task gets weight 1 (β = α = 1); K larger than the number of present tasks
acts as one group per task, K = 1 gives every task the mean γ; a loss below its ``min_losses``
bound is refused (``ValueError``: set ``weighting.min_losses``); a loss at its bound has D = ε,
hence a very large β, so that task takes most of the weight (its gradient is usually ≈ 0 there);
a NaN or infinite loss makes the step weight the other tasks as if that task were absent (weight
0, its r not updated, one warning; :func:`~lightning_mtl.weighting.loss_checks.skip_non_finite`);
an absent task's r is untouched. Loss values are global under DDP (``reads_loss_values``).
Cost per step: O(k) plus the 1-D K-means, O(K·m²) scalar operations on the m present tasks.
"""

from __future__ import annotations

import math
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


def kmeans_1d(values: Sequence[float], groups: int) -> list[int]:
    """The globally optimal K-means partition of ``values`` (one number each) into
    ``min(groups, len(values))`` non-empty clusters: each value's cluster, numbered in
    increasing order of the values. Ties are broken by position (stable), so the result is
    deterministic. Dynamic programme over the sorted values, O(groups·n²)."""
    n = len(values)
    groups = min(groups, n)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: values[i])
    x = [float(values[i]) for i in order]
    # cost[a][b]: squared deviation of x[a:b] from its mean (Welford, numerically stable)
    cost = [[0.0] * (n + 1) for _ in range(n)]
    for a in range(n):
        mean, spread = 0.0, 0.0
        for b in range(a, n):
            count = b - a + 1
            delta = x[b] - mean
            mean += delta / count
            spread += delta * (x[b] - mean)
            cost[a][b + 1] = spread
    # best[g][j]: least cost of x[:j] in g clusters; cut[g][j]: where its last cluster starts
    best = [[math.inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for g in range(1, groups + 1):
        for j in range(g, n + 1):
            for a in range(g - 1, j):
                candidate = best[g - 1][a] + cost[a][j]
                if candidate < best[g][j]:
                    best[g][j], cut[g][j] = candidate, a
    labels = [0] * n
    end = n
    for g in range(groups, 0, -1):
        start = cut[g][end]
        for position in range(start, end):
            labels[order[position]] = g - 1
        end = start
    return labels


@WEIGHTINGS.register("go4align")
class GO4Align(CheckedLossWeighting, LossWeighting):
    """GO4Align with ``num_groups`` groups (K ≥ 1), the alignment step ``robust_step_size``
    (η ≥ 0) and each loss's lower bound ``min_losses``."""

    # buffers (register_buffer in __init__), declared for the type checker
    min_losses: torch.Tensor
    log_alpha: torch.Tensor

    reads_loss_values = True

    def __init__(
        self,
        tasks: Sequence[str],
        num_groups: int = 2,
        robust_step_size: float = 1e-4,
        min_losses: float | Sequence[float] | Mapping[str, float] = 0.0,
    ) -> None:
        super().__init__(tasks)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ConfigError(f"weighting.num_groups={num_groups!r}; expected an integer >= 1")
        if not isinstance(robust_step_size, int | float) or not 0 <= robust_step_size < math.inf:
            raise ConfigError(
                f"weighting.robust_step_size={robust_step_size!r}; expected a number >= 0"
            )
        self.num_groups, self.step_size = num_groups, float(robust_step_size)
        k = len(self.tasks)
        bounds = lower_bounds(self.tasks, min_losses, "go4align")
        self.register_buffer("min_losses", bounds, persistent=False)
        #: r = log α up to a constant: −η times the distance accumulated over the steps seen
        self.register_buffer("log_alpha", torch.zeros(k, dtype=torch.float64))

    def indicators(self, distances: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """γ = β·α of the tasks ``index`` with these distances (float64)."""
        beta = distances.sum() / distances
        return beta * torch.softmax(self.log_alpha[index], dim=0)

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        values = self.loss_values(losses, present, context)
        distances = distance_to_bound(self, values, present).to(self.log_alpha) + EPS
        index = torch.tensor(present, device=self.log_alpha.device)
        self.log_alpha[index] -= self.step_size * distances
        gamma = self.indicators(distances, index)
        labels = torch.tensor(kmeans_1d(gamma.tolist(), self.num_groups), device=gamma.device)
        groups = int(labels.max()) + 1
        sums = gamma.new_zeros(groups).index_add_(0, labels, gamma)
        counts = torch.bincount(labels, minlength=groups).to(gamma)
        return (sums / counts)[labels]
