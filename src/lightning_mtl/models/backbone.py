"""A timm backbone by name, returning pooled and multi-scale features in one forward pass.

Every model is created with ``features_only=True``: the feature maps of ``out_indices`` feed
the dense heads, and the global average of the deepest map is the pooled vector the
image-level heads read. One forward serves both kinds of head, and any timm family works the
same way (ResNet, ConvNeXt, EfficientNet, ViT, Swin, ...); ViTs return NCHW maps through
``forward_intermediates`` and NHWC families (Swin, MambaOut) are permuted to NCHW here.

Pretrained weights work offline: ``pretrained=true`` with ``weights_file=/path/model.safetensors``
(or ``.pth``) loads that file through timm's ``pretrained_cfg_overlay``, which also adapts the
classifier and input layers as timm does for hub weights.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from lightning_mtl.errors import ConfigError


@dataclass
class Features:
    """What the heads read: the pooled vector (B×C) and the feature maps (each B×Cᵢ×Hᵢ×Wᵢ)."""

    pooled: torch.Tensor
    maps: list[torch.Tensor]


class Backbone(nn.Module):
    """The shared trunk. ``channels`` and ``reductions`` describe ``maps`` for the heads."""

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        weights_file: str | None = None,
        out_indices: list[int] | None = None,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        if weights_file is not None:
            if not pretrained:
                raise ConfigError(
                    f"model.backbone.weights_file={weights_file!r} is set but "
                    "model.backbone.pretrained=false; set pretrained=true to load it"
                )
            path = Path(weights_file).expanduser()
            if not path.is_file():
                raise ConfigError(
                    f"model.backbone.weights_file={weights_file!r}: no such file. Expected a "
                    ".safetensors, .pth or .bin state dict of the timm model "
                    f"{name!r} (e.g. saved with torch.save(model.state_dict(), path))"
                )
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        check_backbone_name(name)
        self.model = timm.create_model(
            name, pretrained=pretrained, features_only=True, in_chans=in_chans, **kwargs
        )
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        info = self.model.feature_info
        self.channels: list[int] = list(info.channels())
        self.reductions: list[int] = list(info.reduction())
        fmt = getattr(self.model, "output_fmt", "NCHW")
        self._channels_last_output = str(fmt) in {"NHWC", "Format.NHWC"}

    @property
    def pooled_dim(self) -> int:
        return self.channels[-1]

    def forward(self, images: torch.Tensor) -> Features:
        maps = list(self.model(images))
        if self._channels_last_output:
            maps = [m.permute(0, 3, 1, 2) for m in maps]
        return Features(pooled=maps[-1].mean(dim=(2, 3)), maps=maps)

    def data_config(self) -> dict[str, Any]:
        """timm's input size, mean and std for this model (for datasets of natural images)."""
        return timm.data.resolve_model_data_config(self.model)


def check_backbone_name(name: str) -> None:
    """Fail early, with close matches, on a name timm does not know."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ConfigError(
        f"model.backbone.name={name!r} is not a timm model.{hint} "
        "Accepted values: any name in timm.list_models() (e.g. resnet18, convnext_atto, "
        "efficientnet_b0, vit_tiny_patch16_224)."
    )
