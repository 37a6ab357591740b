"""Multi-task architectures behind one seam (see :mod:`.base`); every module of this package
registers its architecture on import, so a new one is a file here plus
``configs/architecture/<name>.yaml``."""

import importlib
import pkgutil

from lightning_mtl.models.architectures.base import (
    ARCHITECTURES,
    LEVELS,
    Architecture,
    ArchitectureOutput,
    Meeting,
    MeetingPlace,
    architecture_options,
    build_architecture,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ARCHITECTURES",
    "LEVELS",
    "Architecture",
    "ArchitectureOutput",
    "Meeting",
    "MeetingPlace",
    "architecture_options",
    "build_architecture",
]
