"""How a timm features model splits into *stages*: runs of its own modules, each ending at a
feature level (see :mod:`lightning_mtl.models.backbone`).

* ``FeatureListNet`` / ``FeatureDictNet`` (ResNet, ConvNeXt, RegNet, Swin, ...): its modules in
  order, cut after each module that returns a feature map;
* EfficientNet / MobileNet feature models (``conv_stem``, ``bn1``, ``blocks``): the same over
  ``[conv_stem, bn1, *blocks]``, cut where ``_stage_out_idx`` says;
* ``FeatureGetterNet`` around a ``VisionTransformer``: stage 0 is the patch embedding (with the
  class token and position embedding), stage i ≥ 1 is block i-1.

Models whose features come from hooks have no plan (``None``): they serve hard sharing only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from torch import nn

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

#: A timm ``features_only`` model: ``FeatureListNet``, ``FeatureDictNet``, ``FeatureGetterNet`` or
#: a family's own features class (``EfficientNetFeatures``, ``MobileNetV3Features``, ...). They
#: share no typed base beyond ``nn.Module``, so they are read duck-typed (their type name and
#: ``hasattr`` select the attributes read), hence ``Any``.
TimmFeatures: TypeAlias = Any


@dataclass
class StagePlan:
    """How a timm features model splits into stages (see the module docstring)."""

    modules: list[list[nn.Module]]
    emits: list[int | None]
    channels: list[int]
    loose_parameters: list[nn.Parameter]  # a ViT's class token, position embedding, ...
    vit: VisionTransformer | None = None
    edge_modules: tuple[nn.Module, ...] = ()  # never checkpointed (as timm's FeatureListNet)
    split_at: int | None = None  # stages from here on were taken out (Backbone.split)

    def remove(self, model: TimmFeatures, at: int) -> None:
        """Drop stages ``[at, ...)`` from ``model`` and from this plan."""
        dropped = {id(m) for stage in self.modules[at:] for m in stage}
        if self.vit is not None:
            # a slice of a Sequential is a Sequential (torch types __getitem__ for both cases)
            self.vit.blocks = cast(nn.Sequential, self.vit.blocks[: at - 1])
        else:
            container = model.blocks if hasattr(model, "conv_stem") else model
            names = [n for n, m in container.named_children() if id(m) in dropped]
            for name in names:
                delattr(container, name)
            if hasattr(model, "return_layers"):
                model.return_layers = {
                    k: v
                    for k, v in model.return_layers.items()
                    if k in dict(model.named_children())
                }
        # the stages' layout (what they emit, their width) stays known; their modules are gone
        self.modules = [*self.modules[:at], *([] for _ in self.modules[at:])]
        self.split_at = at


def stage_plan(model: TimmFeatures) -> StagePlan | None:
    """Cut a timm features model into stages, or None for families that cannot be."""
    kind = type(model).__name__
    if kind in {"FeatureListNet", "FeatureDictNet"}:
        return _sequential_plan(model, list(model.named_children()), dict(model.return_layers))
    if hasattr(model, "conv_stem") and hasattr(model, "_stage_out_idx"):  # EfficientNet family
        if getattr(model, "feature_hooks", None) is not None:
            return None
        named = [("conv_stem", model.conv_stem), ("bn1", model.bn1)]
        named += [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
        out = sorted(model._stage_out_idx)
        # stage_out_idx i: the output of named[i + 1] (0 is the stem's bn1)
        return_layers = {named[i + 1][0]: str(level) for level, i in enumerate(out)}
        return _sequential_plan(model, named, return_layers)
    if kind == "FeatureGetterNet":
        return _vit_plan(model)
    return None


def _sequential_plan(
    model: TimmFeatures, named: list[tuple[str, nn.Module]], return_layers: dict[str, str]
) -> StagePlan | None:
    info = model.feature_info
    channels_by_level = list(info.channels())
    modules: list[list[nn.Module]] = []
    emits: list[int | None] = []
    current: list[nn.Module] = []
    for name, module in named:
        current.append(module)
        if name in return_layers:
            modules.append(current)
            emits.append(len(emits))
            current = []
    if current or not modules:  # modules after the last feature are never run by timm
        return None
    edges = (named[0][1], named[-1][1])
    loose = [p for p in model.parameters(recurse=False)]
    return StagePlan(modules, emits, channels_by_level[: len(modules)], loose, None, edges)


def _vit_plan(getter: TimmFeatures) -> StagePlan | None:
    from timm.models.vision_transformer import VisionTransformer

    vit = getter.model
    if not isinstance(vit, VisionTransformer):
        return None
    levels = {index: level for level, index in enumerate(getter.out_indices)}
    blocks = list(vit.blocks)
    modules = [[vit.patch_embed, vit.norm_pre], *[[b] for b in blocks]]
    emits = [None, *[levels.get(i) for i in range(len(blocks))]]
    width = vit.embed_dim
    in_blocks = {id(p) for p in vit.blocks.parameters()}
    in_stem = {id(p) for m in modules[0] for p in m.parameters()}
    loose = [p for p in vit.parameters() if id(p) not in in_blocks and id(p) not in in_stem]
    return StagePlan(modules, emits, [width] * len(modules), loose, vit, ())


def skip_checkpoint(plan: StagePlan, module: nn.Module) -> bool:
    """timm's rule: no checkpoint for the first and last module nor for in-place modules."""
    return any(module is m for m in plan.edge_modules) or getattr(module, "inplace", False) is True
