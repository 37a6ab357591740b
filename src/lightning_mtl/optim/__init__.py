"""The one optimizer: its parameter groups (:mod:`~lightning_mtl.optim.groups`: per backbone
stage, new layers, heads, balancer) and its implementation (:mod:`~lightning_mtl.optim.implementation`:
fused, foreach or single-tensor, chosen by ``model.optimizer_impl``)."""

from lightning_mtl.optim.groups import (
    NO_DECAY_NAMES,
    GroupRules,
    group_rules,
    optimizer_groups,
    parameters_in,
    split_decay,
    stage_groups,
    stage_lr,
)
from lightning_mtl.optim.implementation import (
    IMPL_ARGS,
    IMPL_KEY,
    IMPLEMENTATIONS,
    build_optimizer,
    check_implementation,
    fused_conflict,
    implementation_of,
    implementation_options,
    keep_implementation,
)

__all__ = [
    "IMPLEMENTATIONS",
    "IMPL_ARGS",
    "IMPL_KEY",
    "NO_DECAY_NAMES",
    "GroupRules",
    "build_optimizer",
    "check_implementation",
    "fused_conflict",
    "group_rules",
    "implementation_of",
    "implementation_options",
    "keep_implementation",
    "optimizer_groups",
    "parameters_in",
    "split_decay",
    "stage_groups",
    "stage_lr",
]
