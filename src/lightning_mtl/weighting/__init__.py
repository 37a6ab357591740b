"""Loss weighting and gradient balancing, each method one small file behind one registry.

Importing this package registers every method; ``build_weighting(name, tasks, **kwargs)``
creates one by name (``weighting=<name>`` in Hydra selects ``configs/weighting/<name>.yaml``).
"""

from lightning_mtl.weighting import (  # noqa: F401  (importing registers each method)
    aggregators,
    cagrad,
    config,
    crmogm,
    db_mtl,
    dual_cone,
    dwa,
    equal,
    excess_mtl,
    fairgrad,
    famo,
    gls,
    go4align,
    graddrop,
    gradnorm,
    gradvac,
    imtl_aligned,
    imtl_l,
    ldc_mtl,
    nash_mtl,
    pcd,
    rlw,
    static,
    stch,
    stochastic,
    uncertainty,
)
from lightning_mtl.weighting.base import Combined, LossWeighting, StepContext, Weighting
from lightning_mtl.weighting.gradient import GradientWeighting
from lightning_mtl.weighting.meetings import task_gradients
from lightning_mtl.weighting.registry import WEIGHTINGS, build_balancer, build_weighting

__all__ = [
    "WEIGHTINGS",
    "Combined",
    "GradientWeighting",
    "LossWeighting",
    "StepContext",
    "Weighting",
    "build_balancer",
    "build_weighting",
    "task_gradients",
]
