"""Random Loss Weighting (Lin, Ye, Xu, Shi & Zhang, TMLR 2022, "Reasonable Effectiveness of
Random Weighting: A Litmus Test for Multi-Task Learning").

Each step draws ``z ~ N(0, I_k)`` and weights the losses by ``w = softmax(z)``:

    L = Σᵢ wᵢ Lᵢ,  Σᵢ wᵢ = 1

(as in the paper and LibMTL; note that the weights sum to 1, not k as with ``equal``, so the
effective learning rate is k times smaller). The paper's point: a method that does not beat
random weights has not learned anything about the tasks.

The draw comes from a generator seeded with ``(seed, step)``: every DDP rank draws the same
weights without communication, and a resumed run draws what the uninterrupted run would have.
Only the present tasks' entries of z enter the softmax. Cost per step: k random numbers.

Corners: one task present gets weight 1; zero and negative losses are weighted as any other
(the weights read no value). A non-finite loss counts as absent: the softmax runs over the finite
tasks, it gets weight 0 and adds ``0·Lᵢ`` (the combined loss is NaN;
:func:`~lightning_mtl.weighting.loss_checks.skip_non_finite`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lightning_mtl.weighting.base import LossWeighting, StepContext
from lightning_mtl.weighting.loss_checks import CheckedLossWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("rlw")
class RandomLossWeighting(CheckedLossWeighting, LossWeighting):
    """Softmax of standard-normal logits, redrawn every step from ``(seed, step)``."""

    # not for the values: under DDP the global losses say which tasks any rank labelled, so
    # every rank draws its softmax over the same tasks
    reads_loss_values = True

    def __init__(self, tasks: Sequence[str], seed: int = 0) -> None:
        super().__init__(tasks)
        self.seed = int(seed)

    def draw(self, step: int) -> torch.Tensor:
        state = np.random.SeedSequence((self.seed, step)).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        return torch.randn(len(self.tasks), generator=generator)

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        return torch.softmax(self.draw(context.step)[present], dim=0)
