"""Loss weighting and gradient balancing, each method one small file behind one registry.

Importing this package registers every method; ``build_weighting(name, tasks, **kwargs)``
creates one by name (``weighting=<name>`` in Hydra selects ``configs/weighting/<name>.yaml``).
"""

from lightning_mtl.weighting import (  # noqa: F401  (importing registers each method)
    dwa,
    equal,
    famo,
    gls,
    imtl_l,
    rlw,
    static,
    uncertainty,
)
from lightning_mtl.weighting.base import Combined, LossWeighting, StepContext, Weighting
from lightning_mtl.weighting.registry import WEIGHTINGS, build_weighting

__all__ = [
    "WEIGHTINGS",
    "Combined",
    "LossWeighting",
    "StepContext",
    "Weighting",
    "build_weighting",
]
