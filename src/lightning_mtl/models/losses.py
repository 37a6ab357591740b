"""Task losses, selected by name in a task's ``loss:`` block.

A loss maps ``(output, target)`` of the *labelled* samples of a batch to one scalar. It
computes in float32 whatever the autocast dtype, so ``bf16-mixed`` and ``16-mixed`` runs do not
lose precision in the reduction. Dense regression losses skip pixels whose label equals
``ignore_value`` (NYUv2 marks missing depth with 0); if no pixel is valid they return ``None``,
and the task is left out of that step like a task with no labels in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")


@LOSSES.register("cross_entropy")
class CrossEntropy(nn.Module):
    """Softmax cross-entropy for classification (B×C vs B) and segmentation (B×C×H×W vs B×H×W)."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        if not bool((target != self.ignore_index).any()):
            return None
        return F.cross_entropy(
            output.float(),
            target.long(),
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )


@LOSSES.register("bce")
class BinaryCrossEntropy(nn.Module):
    """Sigmoid binary cross-entropy on logits, for multi-label tasks (``pos_weight`` optional)."""

    pos_weight: torch.Tensor | None  # a non-persistent buffer (None: no weighting)

    def __init__(self, pos_weight: list[float] | None = None) -> None:
        super().__init__()
        weight = None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float32)
        self.register_buffer("pos_weight", weight, persistent=False)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(
            output.float(), target.float(), pos_weight=self.pos_weight
        )


class PointwiseRegressionLoss(nn.Module):
    """Mean of an element-wise error, over the elements whose label is not ``ignore_value``."""

    def __init__(self, ignore_value: float | None = None) -> None:
        super().__init__()
        self.ignore_value = ignore_value

    def elementwise(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        output, target = output.float(), target.float().reshape(output.shape)
        if self.ignore_value is None:
            return self.elementwise(output, target).mean()
        valid = target != self.ignore_value
        if not bool(valid.any()):
            return None
        return self.elementwise(output[valid], target[valid]).mean()


@LOSSES.register("mse")
class MeanSquaredError(PointwiseRegressionLoss):
    def elementwise(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (output - target).square()


@LOSSES.register("l1")
class MeanAbsoluteError(PointwiseRegressionLoss):
    def elementwise(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (output - target).abs()


@LOSSES.register("smooth_l1")
class SmoothL1(PointwiseRegressionLoss):
    def __init__(self, beta: float = 1.0, ignore_value: float | None = None) -> None:
        super().__init__(ignore_value)
        self.beta = beta

    def elementwise(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(output, target, reduction="none", beta=self.beta)


@LOSSES.register("cosine")
class CosineDistance(nn.Module):
    """``1 - cos(n̂, n)`` per pixel for surface normals (B×3×H×W); all-zero labels are ignored."""

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        output, target = output.float(), target.float()
        valid = target.abs().sum(dim=1) > 0
        if not bool(valid.any()):
            return None
        cosine = F.cosine_similarity(output, target, dim=1)
        return (1.0 - cosine[valid]).mean()
