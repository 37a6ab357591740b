"""A timm backbone by name, returning pooled and multi-scale features, and runnable stage by stage.

Every model is created with ``features_only=True``: the feature maps of ``out_indices`` feed
the dense heads, and the global average of the deepest map is the pooled vector the
image-level heads read. One forward serves both kinds of head, and any timm family works the
same way (ResNet, ConvNeXt, EfficientNet, ViT, Swin, ...); ViTs return NCHW maps through
``forward_intermediates`` and NHWC families (Swin, MambaOut) are permuted to NCHW here.

**Stages.** Architectures other than hard sharing cut the backbone into consecutive *stages*
(branch after stage n, experts made of the later stages, a cross-stitch unit after each stage,
adapters in the later stages), and layer-wise training freezes, unfreezes and scales the
learning rate stage by stage. A stage is a run of the model's own modules:

* CNNs built as a sequential feature extractor by timm (``FeatureListNet``: ResNet, ConvNeXt,
  RegNet, Swin, ...; EfficientNet and MobileNet): stage i runs the modules up to the i-th
  feature map, so there is one stage per feature level (stage 0 holds the stem);
* ViTs (``VisionTransformer`` and its variants): stage 0 is the patch embedding (with the class
  token and position embedding), stage i ≥ 1 is block i-1; the stages that end at one of
  ``out_indices`` emit a feature map.

Running all stages gives exactly the features of :meth:`Backbone.forward` (tested). Other
families (timm models whose features come from hooks) serve the hard architecture only; an
architecture that needs stages refuses them with a :class:`ConfigError`.

Pretrained weights work offline: ``pretrained=true`` with ``weights_file=/path/model.safetensors``
(or ``.pth``) loads that file through timm's ``pretrained_cfg_overlay``, which also adapts the
classifier and input layers as timm does for hub weights; without a file, timm reads the local
Hugging Face cache (``cache_dir``, else ``$HF_HUB_CACHE``), and ``offline=true`` (the default)
never touches the network.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.stages import StagePlan, TimmFeatures, skip_checkpoint, stage_plan
from lightning_mtl.models.weights import check_backbone_name, hub_offline, missing_weights_message


@dataclass
class Features:
    """What a head reads: the pooled vector (B×C) and the feature maps (each B×Cᵢ×Hᵢ×Wᵢ)."""

    pooled: torch.Tensor
    maps: list[torch.Tensor]

    @classmethod
    def of(cls, maps: Sequence[torch.Tensor]) -> Features:
        """Features whose pooled vector is the global average of the deepest map."""
        maps = list(maps)
        return cls(pooled=maps[-1].mean(dim=(2, 3)), maps=maps)


@dataclass(frozen=True)
class FeatureInfo:
    """What a task's features look like: channels and stride of each map, for building heads."""

    channels: tuple[int, ...]
    reductions: tuple[int, ...]

    @property
    def pooled_dim(self) -> int:
        return self.channels[-1]


class Backbone(nn.Module):
    """The shared trunk. ``channels`` and ``reductions`` describe ``maps`` for the heads."""

    model: TimmFeatures  # timm's features model, read duck-typed (see models/stages.py)

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        weights_file: str | None = None,
        cache_dir: str | None = None,
        offline: bool = True,
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
        elif cache_dir is not None:
            kwargs["cache_dir"] = str(Path(cache_dir).expanduser())
        check_backbone_name(name)
        from_hub = pretrained and weights_file is None  # timm reads the Hugging Face cache
        with hub_offline(offline and from_hub):
            try:
                self.model = timm.create_model(
                    name, pretrained=pretrained, features_only=True, in_chans=in_chans, **kwargs
                )
            except OSError as error:  # not in the local cache (offline) or hub unreachable
                if not from_hub:
                    raise
                message = missing_weights_message(name, cache_dir, offline, error)
                raise ConfigError(message) from error
        self.grad_checkpointing = grad_checkpointing
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        info = self.model.feature_info
        self.channels: list[int] = list(info.channels())
        self.reductions: list[int] = list(info.reduction())
        fmt = getattr(self.model, "output_fmt", "NCHW")
        self._channels_last_output = str(fmt) in {"NHWC", "Format.NHWC"}
        self._stages = stage_plan(self.model)
        #: each stage's modules, by their names in the timm model (for the model report)
        self.stage_names: list[str] = []
        if self._stages is not None:
            names = {id(m): n for n, m in self.model.named_modules()}
            self.stage_names = [
                ", ".join(names.get(id(m), type(m).__name__) for m in stage)
                for stage in self._stages.modules
            ]

    @property
    def pooled_dim(self) -> int:
        return self.channels[-1]

    @property
    def info(self) -> FeatureInfo:
        return FeatureInfo(tuple(self.channels), tuple(self.reductions))

    def forward(self, images: torch.Tensor) -> Features:
        maps = list(self.model(images))
        if self._channels_last_output:
            maps = [m.permute(0, 3, 1, 2) for m in maps]
        return Features.of(maps)

    def data_config(self) -> dict[str, Any]:
        """timm's input size, mean and std for this model (for datasets of natural images)."""
        return timm.data.resolve_model_data_config(self.model)

    # ---------------------------------------------------------------------------------- stages
    @property
    def staged(self) -> bool:
        """Whether the backbone runs stage by stage (see the module docstring)."""
        return self._stages is not None

    def require_stages(self, who: str) -> StagePlan:
        if self._stages is None:
            raise ConfigError(
                f"{who} needs a backbone that runs stage by stage, but timm builds "
                f"{self.name!r} as {type(self.model).__name__}. Accepted: CNNs timm builds as "
                "FeatureListNet (resnet*, convnext*, regnet*, swin*, ...), EfficientNet / "
                "MobileNet, and VisionTransformer models (vit_*, deit_*); "
                "model.architecture=hard works with every timm model."
            )
        return self._stages

    @property
    def num_stages(self) -> int:
        return len(self.require_stages("this").modules)

    def stage_emits(self, stage: int) -> int | None:
        """The feature level emitted at the end of ``stage`` (None: it emits no map)."""
        return self.require_stages("this").emits[stage]

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        plan = self.require_stages("this")
        params = [p for m in plan.modules[stage] for p in m.parameters()]
        if stage == 0:
            params += plan.loose_parameters
        return params

    def run_stage(
        self, stage: int, x: torch.Tensor, modules: Iterable[nn.Module] | None = None
    ) -> torch.Tensor:
        """Run ``stage`` on ``x`` (the images for stage 0); ``modules``: a copy of the stage's
        modules to run instead of the backbone's own (branches, experts)."""
        plan = self.require_stages("this")
        if plan.vit is not None and stage == 0:
            if modules is not None:
                raise ConfigError("a ViT's patch embedding (stage 0) cannot be copied alone")
            vit = plan.vit
            x = vit.patch_embed(x)
            x = vit._pos_embed(x)
            x = vit.patch_drop(x)
            return vit.norm_pre(x)
        if modules is None:
            if plan.split_at is not None and stage >= plan.split_at:
                raise ValueError(f"stage {stage} was split off this backbone; pass its modules")
            modules = plan.modules[stage]
        for module in modules:
            if self.grad_checkpointing and self.training and not skip_checkpoint(plan, module):
                x = checkpoint(module, x, use_reentrant=False)
            else:
                x = module(x)
        return x

    def emit(self, x: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """A stage's output as an NCHW feature map (ViT tokens reshaped to the patch grid)."""
        plan = self.require_stages("this")
        if plan.vit is not None:
            vit = plan.vit
            tokens = x[:, vit.num_prefix_tokens :]
            height, width = vit.patch_embed.dynamic_feat_size(tuple(image_size))
            return tokens.reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()
        return x.permute(0, 3, 1, 2) if self._channels_last_output else x

    def summarize(self, x: torch.Tensor) -> torch.Tensor:
        """A stage output averaged to one vector per sample (B×C), whatever its layout."""
        plan = self.require_stages("this")
        if plan.vit is not None:
            return x[:, plan.vit.num_prefix_tokens :].mean(dim=1)
        return x.mean(dim=(1, 2)) if self._channels_last_output else x.mean(dim=(2, 3))

    def stage_channels(self, stage: int) -> int:
        """Channels of ``stage``'s output (what :meth:`summarize` returns per sample)."""
        return self.require_stages("this").channels[stage]

    def run(
        self,
        images: torch.Tensor,
        start: int,
        end: int,
        x: torch.Tensor | None = None,
        copies: nn.ModuleList | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run stages ``[start, end)`` from ``x`` (the images when start is 0); return the last
        output and the maps emitted on the way. ``copies[i]`` (a ``ModuleList`` per stage, as
        :meth:`split` returns) replaces stage ``start + i``."""
        x = images if x is None else x
        maps = []
        for stage in range(start, end):
            own = None if copies is None else cast(nn.ModuleList, copies[stage - start])
            x = self.run_stage(stage, x, own)
            if self.stage_emits(stage) is not None:
                maps.append(self.emit(x, images.shape[-2:]))
        return x, maps

    def split(self, at: int, who: str) -> nn.ModuleList:
        """Take stages ``[at, num_stages)`` out of this backbone and return them (one
        ``ModuleList`` per stage): the backbone keeps its first ``at`` stages (the shared trunk)
        and the caller owns the rest (a branch, an expert) and their copies."""
        plan = self.require_stages(who)
        if plan.split_at is not None:
            raise ValueError(f"{who}: this backbone was already split at stage {plan.split_at}")
        if not 1 <= at < len(plan.modules):
            raise ConfigError(
                f"{who}: at={at} must be between 1 and {len(plan.modules) - 1} (the stages of "
                f"{self.name!r} are 0..{len(plan.modules) - 1}; stage 0 is the stem)"
            )
        taken = nn.ModuleList(nn.ModuleList(plan.modules[s]) for s in range(at, len(plan.modules)))
        plan.remove(self.model, at)
        return taken


def copy_stages(stages: nn.ModuleList) -> nn.ModuleList:
    """An independent copy of stages taken with :meth:`Backbone.split` (same initial weights)."""
    return copy.deepcopy(stages)
