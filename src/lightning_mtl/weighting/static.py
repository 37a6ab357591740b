"""Static (priority) weighting: ``L = Σᵢ wᵢ Lᵢ`` with fixed, user-chosen ``wᵢ``. Cost: none.

Task prioritisation in its simplest form: raise the weight of the task you care most about,
or lower a task whose loss lives on a large scale. Weights come from ``weighting.weights``
(``{task: w}``) or, where a task is not listed there, from the task's own ``weight:`` key.

Corners: the weights read no value, so one task present, zero and negative losses take the fixed
weights as they are, and a non-finite loss too (the combined loss is then non-finite and a
GradScaler skips the step); with no state to poison it reads no loss value (no host copy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.base import LossWeighting, StepContext
from lightning_mtl.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("static")
class Static(LossWeighting):
    """Fixed weights; ``normalize=true`` rescales them to sum to the number of tasks."""

    # buffers (register_buffer in __init__), declared for the type checker
    static_weights: torch.Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        task_weights: Mapping[str, float] | None = None,
        weights: Mapping[str, float] | None = None,
        normalize: bool = False,
    ) -> None:
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = set(weights) - set(self.tasks)
        if unknown:
            raise ConfigError(
                f"weighting.weights names unknown tasks {sorted(unknown)}; tasks: {self.tasks}"
            )
        fallback = dict(task_weights or {})
        values = [float(weights.get(name, fallback.get(name, 1.0))) for name in self.tasks]
        if any(v < 0 for v in values) or not any(v > 0 for v in values):
            raise ConfigError(
                f"weighting.weights must be >= 0 with at least one > 0, got {dict(zip(self.tasks, values, strict=True))}"
            )
        vector = torch.tensor(values, dtype=torch.float32)
        if normalize:
            vector = vector * len(values) / vector.sum()
        # Not persistent: the config decides the weights, also when a run resumes.
        self.register_buffer("static_weights", vector, persistent=False)

    def weights(
        self, losses: torch.Tensor, present: list[int], context: StepContext
    ) -> torch.Tensor:
        return self.static_weights[present]
