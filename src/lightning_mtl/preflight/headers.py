"""Task files that lost their ``# @package tasks`` line.

Hydra puts a file of the ``task`` group under the key ``task`` unless its header says
``# @package tasks``: such a task is composed beside the others, never read by the model, and the
run silently trains without it. After composition that shows as a stray top-level ``task`` key;
the files of the group without the header that declare those tasks are named in the report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import yaml
from omegaconf import DictConfig

from lightning_mtl.preflight.report import Problem

GROUP = "task"
HEADER = "# @package tasks"
_PACKAGE = re.compile(r"^#\s*@package\s+(\S+)")


def package_of(path: Path) -> str | None:
    """The ``# @package`` of a config file's leading comment lines (None: no header)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            return None
        match = _PACKAGE.match(stripped)
        if match:
            return match.group(1)
    return None


def config_dirs() -> list[Path]:
    """The config folders of this run: Hydra's search path when inside a Hydra run (it includes
    ``--config-dir``), else the project's ``configs/``."""
    from hydra.core.hydra_config import HydraConfig

    from lightning_mtl.utils.setup import CONFIG_DIR

    dirs = [CONFIG_DIR]
    if HydraConfig.initialized():
        for source in HydraConfig.get().runtime.config_sources:
            if source.provider != "hydra" and source.schema == "file":
                dirs.append(Path(source.path))
    return list(dict.fromkeys(dirs))


def _declared_tasks(path: Path) -> set[str]:
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return set()
    return {str(key) for key in content} if isinstance(content, dict) else set()


def task_header_problems(cfg: DictConfig, dirs: Iterable[Path] | None = None) -> list[Problem]:
    """A problem per task file whose tasks landed under ``task`` (a missing or wrong header)."""
    stray = cfg.get(GROUP)
    if not isinstance(stray, DictConfig) or not len(stray):
        return []
    names = {str(key) for key in stray}
    problems = []
    for folder in dirs if dirs is not None else config_dirs():
        for path in sorted((Path(folder) / GROUP).glob("*.yaml")):
            if package_of(path) == "tasks":
                continue
            found = names & _declared_tasks(path)
            if found:
                problems.append(_problem(str(path), sorted(found), package_of(path)))
                names -= found
    if names:  # added by an override (+task.x=...) or by a file outside the search path
        problems.append(_problem(f"config key {GROUP!r}", sorted(names), None))
    return problems


def _problem(where: str, tasks: list[str], package: str | None) -> Problem:
    header = f"header '# @package {package}'" if package else "no '# @package' header"
    return Problem(
        where,
        f"{header}: task(s) {', '.join(tasks)} composed under '{GROUP}', not 'tasks', so the "
        "model would silently train without them",
        f"the file's first line to be '{HEADER}'",
    )
