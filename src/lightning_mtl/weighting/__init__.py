"""Loss weighting and gradient balancing, each method one small file behind one registry.

Importing this package registers every method; ``build_weighting(name, tasks, **kwargs)``
creates one by name (``weighting=<name>`` in Hydra selects ``configs/weighting/<name>.yaml``).
"""

from lightning_mtl.weighting import equal, static, uncertainty  # noqa: F401  (registration)
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
