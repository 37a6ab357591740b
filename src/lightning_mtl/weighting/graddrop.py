"""GradDrop, Gradient Sign Dropout (Chen et al., NeurIPS 2020).

At every element of the shared representation, the sign purity of the task gradients
``P = ½ (1 + Σᵢ gᵢ / Σᵢ |gᵢ|)`` decides which sign survives: with U ~ Uniform(0, 1) drawn per
element, task i's gradient is kept there if ``(P > U and gᵢ > 0) or (P < U and gᵢ < 0)``, and the
kept gradients are summed (``leak`` lets a fraction of each task's gradient through regardless).

GradDrop works element by element on the activations, so it needs the task gradients
themselves, not their Gram matrix, and it is defined at the representation level only (the paper
inserts it as a layer after the shared encoder). The masking is torchjd's ``GradDrop`` aggregator,
applied to the k×|z| matrix of representation gradients; the draw is seeded by
``(seed, step, rank)``, so a resumed run repeats it. Under DDP each rank masks its own samples'
activations with its own draw (a shared draw would give sample j of every rank the same U): the
global direction is the same random function of the global batch as in one process, though not
the same draw.
There are no task weights: ``train/weight/<task>`` logs 1, and ``update_every`` > 1 is refused
(there is nothing to reuse: the direction is a new random function of each step's gradients).
Cost: O(k·|z|) per step. Corners, as in the paper: one task keeps its whole gradient (purity 0
or 1); an element where every gradient is zero stays zero (its purity 0/0 keeps no task, and
no NaN reaches the sum); a zero task gradient adds nothing and does not change the purity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchjd import aggregation as jd

from lightning_mtl.weighting.base import StepContext
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.registry import WEIGHTINGS
from lightning_mtl.weighting.rule_step import step_generator_seed


@WEIGHTINGS.register("graddrop")
class GradDrop(GradientWeighting):
    """GradDrop with per-task ``leak`` (one number, or one per task; 0 by default)."""

    # buffers (register_buffer in __init__), declared for the type checker
    leak: torch.Tensor

    levels = ("representation",)
    reuses_weights = False
    level_note = "GradDrop masks gradient signs per activation of the shared representation."

    def __init__(
        self,
        tasks: Sequence[str],
        level: str = "representation",
        seed: int = 0,
        leak: float | Sequence[float] = 0.0,
    ) -> None:
        super().__init__(tasks, level, seed)
        self.register_buffer(
            "leak", torch.as_tensor(leak, dtype=torch.float32).expand(len(self.tasks)).clone()
        )

    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        return torch.ones(len(present), dtype=gram.dtype)

    def representation_direction(
        self, rows: torch.Tensor, weights: torch.Tensor, local: list[int], context: StepContext
    ) -> torch.Tensor:
        if not local or not bool(torch.isfinite(weights).all()):
            return super().representation_direction(rows, weights, local, context)
        with torch.random.fork_rng(devices=[rows.device] if rows.is_cuda else []):
            torch.manual_seed(step_generator_seed(self.seed, context.step, context.rank))
            return jd.GradDrop(leak=self.leak[local].to(rows))(rows)
