"""The one optimizer's parameter groups: per backbone stage, new layers, heads, balancer.

Rules, applied to trainable parameters only (a frozen stage enters the optimizer when it is
unfrozen, with the same rules, see :mod:`lightning_mtl.callbacks.layerwise`):

* backbone stage ``s`` of ``S`` (copies in branches, experts and columns included) trains at
  ``lr · backbone_lr_scale · layer_decay^(S-1-s)``: the top stage at the backbone's LR, each
  stage below at ``layer_decay`` times the one above (layer-wise LR decay, as in BEiT and timm's
  ``param_groups_layer_decay``; 1 turns it off);
* the architecture's new layers (attention modules, gates, cross-stitch units, adapters) and the
  heads train at ``lr``;
* biases, normalisation weights (every 1-D parameter) and a ViT's position embedding and
  class/register tokens get no weight decay when ``no_decay_norm_bias`` (timm's rule);
* a balancer's learned parameters (uncertainty's log-variances, GradNorm's weights) get their
  own group without weight decay (and their own ``lr`` where the method sets one).

Written here rather than with ``timm.optim.param_groups_layer_decay``: that helper reads one
timm model's ``group_matcher``, while these groups span the backbone's copies, the
architecture's own layers, the heads and the balancer of one module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_mtl.errors import ConfigError

if TYPE_CHECKING:  # the module imports this one
    from lightning_mtl.module import MultiTaskModule

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token")


@dataclass(frozen=True)
class GroupRules:
    """The options that shape the groups (``model.*``)."""

    lr: float | None
    backbone_lr_scale: float = 1.0
    layer_decay: float = 1.0
    no_decay_norm_bias: bool = False

    def check(self) -> None:
        if (self.backbone_lr_scale != 1.0 or self.layer_decay != 1.0) and self.lr is None:
            raise ConfigError(
                "model.backbone_lr_scale and model.layer_decay need the base learning rate: "
                "set model.optimizer.lr"
            )
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"model.layer_decay={self.layer_decay}: expected 0 < value <= 1")
        if self.backbone_lr_scale < 0:
            raise ConfigError(f"model.backbone_lr_scale={self.backbone_lr_scale}: expected >= 0")


def group_rules(module: MultiTaskModule) -> GroupRules:
    """The rules of a ``MultiTaskModule``: its ``model.*`` options and the optimizer's ``lr``."""
    hparams = module.hparams
    return GroupRules(
        lr=getattr(module.make_optimizer, "keywords", {}).get("lr"),
        backbone_lr_scale=hparams["backbone_lr_scale"],
        layer_decay=hparams["layer_decay"],
        no_decay_norm_bias=hparams["no_decay_norm_bias"],
    )


def stage_lr(rules: GroupRules, stage: int, num_stages: int) -> float | None:
    """The learning rate of backbone stage ``stage`` (None: the optimizer's default)."""
    if rules.lr is None:
        return None
    return rules.lr * rules.backbone_lr_scale * rules.layer_decay ** (num_stages - 1 - stage)


def split_decay(
    named: Iterable[tuple[str, nn.Parameter]], rules: GroupRules
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(with weight decay, without): biases, 1-D weights and ViT embeddings go without."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in named:
        leaf = name.rsplit(".", 1)[-1]
        skip = param.ndim <= 1 or name.endswith(".bias") or leaf in NO_DECAY_NAMES
        (no_decay if rules.no_decay_norm_bias and skip else decay).append(param)
    return decay, no_decay


def _groups(
    name: str,
    named: list[tuple[str, nn.Parameter]],
    rules: GroupRules,
    lr: float | None,
    **options: Any,
) -> list[dict[str, Any]]:
    """One group (or two: with and without weight decay) of the trainable ``named``."""
    trainable = [(n, p) for n, p in named if p.requires_grad]
    decay, no_decay = split_decay(trainable, rules)
    extra = {"lr": lr} if lr is not None else {}
    groups = []
    if decay:
        groups.append({"params": decay, "name": name, **extra, **options})
    if no_decay:
        groups.append(
            {"params": no_decay, "name": f"{name}/no_decay", "weight_decay": 0.0, **extra}
        )
    return groups


def stage_groups(
    module: MultiTaskModule, stage: int, rules: GroupRules, exclude: set[int] | None = None
) -> list[dict[str, Any]]:
    """The groups of backbone stage ``stage`` (its trainable parameters not in ``exclude``, a
    set of ``id(parameter)``)."""
    exclude = exclude or set()
    architecture = module.net.architecture
    stages = architecture.stage_parameters()
    names = {id(p): n for n, p in module.named_parameters()}
    named = [(names[id(p)], p) for p in stages[stage] if id(p) not in exclude]
    return _groups(f"stage{stage}", named, rules, stage_lr(rules, stage, len(stages)))


def optimizer_groups(module: MultiTaskModule, rules: GroupRules) -> list[dict[str, Any]]:
    """Every group of ``module`` (a ``MultiTaskModule``): stages, new layers, heads, balancer."""
    rules.check()
    architecture = module.net.architecture
    stages = architecture.stage_parameters()
    in_stages = {id(p) for group in stages for p in group}
    groups = []
    for stage in range(len(stages)):
        groups += stage_groups(module, stage, rules)
    new = [
        (f"net.architecture.{n}", p)
        for n, p in architecture.named_parameters()
        if id(p) not in in_stages
    ]
    groups += _groups("architecture", new, rules, rules.lr)
    heads = [(f"net.heads.{n}", p) for n, p in module.net.heads.named_parameters()]
    groups += _groups("heads", heads, rules, rules.lr)
    balancer = [p for p in module.weighting.parameters() if p.requires_grad]
    if balancer:
        options = dict(module.weighting.optimizer_options)
        groups.append({"params": balancer, "name": "weighting", "weight_decay": 0.0, **options})
    return groups


def parameters_in(optimizer: torch.optim.Optimizer) -> set[int]:
    """``id`` of every parameter the optimizer holds."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}
