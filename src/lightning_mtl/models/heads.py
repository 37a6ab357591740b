"""Task heads: the task-specific layers on top of the shared backbone.

Every head honours one contract, so a task declares its head by name in YAML:

* ``forward(features, image_size) -> Tensor``: image-level heads read ``features.pooled``;
  dense heads decode ``features.maps`` and return a map at the input resolution.
* ``reads``: ``"pooled"`` or ``"maps"`` (architectures may group tasks by it).
* ``metric_kind``: which family of metrics (and of label shapes) the head's output pairs with.
* ``target_shape(output)``: the label shape the head expects for one sample, used to stop a
  mis-configured task before training.

A head is built from a :class:`~lightning_mtl.models.backbone.FeatureInfo` (channels and stride
of each map its task reads, as the architecture declares it):
``HEADS.build(name, key, info, **kwargs)``; an unknown name lists the accepted ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.backbone import FeatureInfo, Features
from lightning_mtl.registry import Registry

HEADS: Registry[Head] = Registry("task head")


class Head(nn.Module):
    """Base class of every head. ``out_features`` is the size of the per-sample output channels."""

    metric_kind: str = ""
    reads: str = "pooled"
    out_features: int = 0

    def forward(self, features: Features, image_size: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def target_shape(self, output: torch.Tensor) -> tuple[int, ...]:
        """The shape one sample's label must have for this head's output."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- image-level heads
def _mlp(in_dim: int, out_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    if hidden:
        layers += [nn.Linear(in_dim, hidden), nn.GELU()]
        in_dim = hidden
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class ImageHead(Head):
    """An MLP on the pooled feature vector (``hidden=0`` gives a linear probe)."""

    def __init__(self, info: FeatureInfo, out_features: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        if out_features <= 0:
            raise ConfigError(f"the head's output size must be positive, got {out_features}")
        self.out_features = out_features
        self.mlp = _mlp(info.pooled_dim, out_features, hidden, dropout)

    def forward(self, features: Features, image_size: tuple[int, int]) -> torch.Tensor:
        return self.mlp(features.pooled)


@HEADS.register("classification")
class ClassificationHead(ImageHead):
    """Logits over ``num_classes`` mutually exclusive classes; label: a class index."""

    metric_kind = "classification"

    def __init__(self, info: FeatureInfo, num_classes: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__(info, num_classes, hidden, dropout)

    def target_shape(self, output: torch.Tensor) -> tuple[int, ...]:
        return ()


@HEADS.register("multilabel")
class MultiLabelHead(ImageHead):
    """One logit per label, labels not exclusive; label: a multi-hot vector of ``num_labels``."""

    metric_kind = "multilabel"

    def __init__(self, info: FeatureInfo, num_labels: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__(info, num_labels, hidden, dropout)

    def target_shape(self, output: torch.Tensor) -> tuple[int, ...]:
        return (self.out_features,)


@HEADS.register("regression")
class RegressionHead(ImageHead):
    """``out_dim`` real values per image; label: a vector of ``out_dim`` values."""

    metric_kind = "regression"

    def __init__(self, info: FeatureInfo, out_dim: int = 1, hidden: int = 0, dropout: float = 0.0):
        super().__init__(info, out_dim, hidden, dropout)

    def target_shape(self, output: torch.Tensor) -> tuple[int, ...]:
        return (self.out_features,)


# ----------------------------------------------------------------------------------- dense heads
class FPNDecoder(nn.Module):
    """A light feature-pyramid decoder: lateral 1×1 convs, top-down sum, one 3×3 conv.

    It reads the maps whose stride is at least ``min_reduction`` (the stride-2 stem map is
    usually skipped: it is large and adds little), from the ``info`` of the task's features, and
    outputs ``channels`` maps at the finest
    of those strides.
    """

    def __init__(self, info: FeatureInfo, channels: int = 64, min_reduction: int = 4) -> None:
        super().__init__()
        self.levels = [i for i, r in enumerate(info.reductions) if r >= min_reduction]
        if not self.levels:
            self.levels = [len(info.reductions) - 1]
        self.lateral = nn.ModuleList(
            nn.Conv2d(info.channels[i], channels, kernel_size=1) for i in self.levels
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        selected = [maps[i] for i in self.levels]
        x = self.lateral[-1](selected[-1])
        for lateral, skip in zip(reversed(self.lateral[:-1]), reversed(selected[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = x + lateral(skip)
        return self.fuse(x)


class DenseHead(Head):
    """A decoder, a 1×1 projection to ``out_features`` channels, upsampling to the input size."""

    reads = "maps"

    def __init__(
        self,
        info: FeatureInfo,
        out_features: int,
        decoder_channels: int = 64,
        min_reduction: int = 4,
    ) -> None:
        super().__init__()
        if out_features <= 0:
            raise ConfigError(f"the head's output channels must be positive, got {out_features}")
        self.out_features = out_features
        self.decoder = FPNDecoder(info, decoder_channels, min_reduction)
        self.project = nn.Conv2d(decoder_channels, out_features, kernel_size=1)

    def forward(self, features: Features, image_size: tuple[int, int]) -> torch.Tensor:
        x = self.project(self.decoder(features.maps))
        x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
        return self.activate(x)

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        return x


@HEADS.register("segmentation")
class SegmentationHead(DenseHead):
    """Per-pixel logits over ``num_classes``; label: an H×W map of class indices."""

    metric_kind = "segmentation"

    def __init__(self, info: FeatureInfo, num_classes: int, **decoder: int) -> None:
        super().__init__(info, num_classes, **decoder)

    def target_shape(self, output: torch.Tensor) -> tuple[int, ...]:
        return tuple(output.shape[-2:])


_ACTIVATIONS = {
    "none": nn.Identity,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
}


@HEADS.register("dense_regression")
class DenseRegressionHead(DenseHead):
    """Per-pixel real values (depth, height, ...); label: an ``out_channels``×H×W map.

    ``activation`` constrains the range (``softplus`` for a positive depth).
    """

    metric_kind = "dense_regression"

    def __init__(
        self, info: FeatureInfo, out_channels: int = 1, activation: str = "none", **decoder: int
    ) -> None:
        super().__init__(info, out_channels, **decoder)
        if activation not in _ACTIVATIONS:
            raise ConfigError(
                f"activation={activation!r} is not known; accepted values: {', '.join(_ACTIVATIONS)}"
            )
        self.output_activation = _ACTIVATIONS[activation]()

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_activation(x)

    def target_shape(self, output: torch.Tensor) -> tuple[int, ...]:
        return (self.out_features, *output.shape[-2:])


@HEADS.register("normals")
class SurfaceNormalsHead(DenseHead):
    """Unit surface normals per pixel (3 channels, L2-normalised); label: a 3×H×W map."""

    metric_kind = "normals"

    def __init__(self, info: FeatureInfo, **decoder: int) -> None:
        super().__init__(info, 3, **decoder)

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)

    def target_shape(self, output: torch.Tensor) -> tuple[int, ...]:
        return (3, *output.shape[-2:])
