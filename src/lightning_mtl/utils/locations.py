"""Where the configs and the project root are: light to import (no torch), so that the console
scripts answer ``--help`` and ``--cfg job`` without loading the training stack.

From a checkout (an editable install) the repository's own ``configs/`` (the ones a user edits)
and the repository as the root of ``data/`` and ``logs/``; from an installed wheel the configs
shipped inside the package (pyproject.toml: force-include) and the working directory as the root.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning_mtl.utils.run_folders import register_resolvers

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _checkout_root() -> Path | None:
    """The repository the package runs from (an editable install: ``src/lightning_mtl`` inside a
    checkout that has ``configs/``), or None for an installed wheel."""
    root = PACKAGE_DIR.parents[1]
    if (root / "configs").is_dir() and (root / "pyproject.toml").is_file():
        return root
    return None


_CHECKOUT = _checkout_root()
PROJECT_ROOT = _CHECKOUT if _CHECKOUT is not None else Path.cwd()
CONFIG_DIR = _CHECKOUT / "configs" if _CHECKOUT is not None else PACKAGE_DIR / "configs"


def configure_environment() -> str:
    """Point ``PROJECT_ROOT`` at the repository (or, installed from a wheel, at the working
    directory), register the configs' resolvers and return the config directory for Hydra.

    A user's own configs join Hydra's search path with ``--config-dir /path/to/configs`` (or
    ``hydra.searchpath=[file:///path]``): their ``experiment/``, ``task/``, ... files are then
    found beside the shipped ones, and ``--config-name`` can name a primary config there."""
    os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
    register_resolvers()  # run folders: unique names, a resumed run continues in its own
    if not CONFIG_DIR.is_dir():
        raise FileNotFoundError(
            f"no configs/ folder at {CONFIG_DIR}: the package was installed without its configs; "
            "reinstall it from a wheel built with `uv build` or pass `--config-dir /path/to/configs`"
        )
    return str(CONFIG_DIR)
