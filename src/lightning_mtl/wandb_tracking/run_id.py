"""The W&B run id of a training, kept across resumes: chosen before ``wandb.init``, written to
``<run dir>/wandb_run.json`` and to every checkpoint (the :class:`WandbRun` callback's state),
and read back from them when a training resumes from a checkpoint."""

from __future__ import annotations

import json
import logging
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_mtl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: the file in the run folder that names the run's W&B run
RUN_FILE = "wandb_run.json"
#: the callback's key in a checkpoint's ``callbacks`` block
STATE_KEY = "WandbRun"
ID_CHARACTERS = string.ascii_lowercase + string.digits


def new_run_id() -> str:
    """A fresh W&B run id (8 base-36 characters, like W&B's own)."""
    return "".join(secrets.choice(ID_CHARACTERS) for _ in range(8))


def read_run_file(run_dir: str | Path | None) -> dict[str, Any] | None:
    """The contents of ``<run_dir>/wandb_run.json`` (None if there is none or it is unreadable,
    with a warning for the latter)."""
    if run_dir is None:
        return None
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        log.warning("W&B: ignoring %s (%s)", path, error)
        return None
    return data if isinstance(data, dict) and isinstance(data.get("id"), str) else None


def write_run_file(save_dir: str | Path | None, run: Any, mode: str) -> None:
    """``<run dir>/wandb_run.json``: the run's id, project, entity, mode, URL and the local
    W&B folders of every session of this run (what ``wandb sync`` uploads)."""
    if not save_dir or mode == "disabled":
        return
    path = Path(save_dir) / RUN_FILE
    stored = read_run_file(save_dir) or {}
    folders = list(stored.get("folders", [])) if stored.get("id") == run.id else []
    local = str(Path(run.dir).parent) if getattr(run, "dir", None) else None
    if local and local not in folders:
        folders.append(local)
    data = {
        "id": run.id,
        "project": getattr(run, "project", None),
        "entity": getattr(run, "entity", None),
        "name": getattr(run, "name", None),
        "mode": mode,
        "url": getattr(run, "url", None),
        "folders": folders,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
        temporary.replace(path)
    except OSError as error:
        log.warning("W&B: could not write %s (%s): a resume will start a new run", path, error)


def resumed_checkpoint(ckpt_path: Any, run_dir: str | Path | None) -> Path | None:
    """The checkpoint file a training with ``ckpt_path`` resumes from, found the way
    :func:`lightning_mtl.checkpointing.resolve_ckpt_path` finds it (a file; a run folder's or
    ``last``'s newest complete checkpoint), but quietly: the entry point reports problems."""
    if ckpt_path is None or str(ckpt_path) in ("", "hpc"):
        return None
    value = str(ckpt_path)
    path = Path(run_dir) if value == "last" and run_dir is not None else Path(value).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for candidate in sorted(
        folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True
    ):
        if _readable(candidate):
            return candidate
    return None


def run_id_in_checkpoint(path: str | Path) -> str | None:
    """The W&B run id a checkpoint was written under (the :class:`WandbRun` callback's state),
    None when it has none or cannot be read."""
    from lightning_mtl.checkpointing.files import read_checkpoint

    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except (ConfigError, DataError):
        return None
    state = (checkpoint.get("callbacks") or {}).get(STATE_KEY) or {}
    run_id = state.get("run_id") if isinstance(state, Mapping) else None
    return run_id if isinstance(run_id, str) and run_id else None


def resumed_run_id(
    ckpt_path: Any, run_dir: str | Path | None, training: bool
) -> tuple[str | None, str]:
    """The W&B run a training continues, and where its id was found.

    Only a training resumed from a checkpoint continues a run: the id stored in that checkpoint,
    else the run folder's ``wandb_run.json``. Anything else (a fresh start, ``ckpt_path=last``
    with no checkpoint yet, an evaluation) gets ``(None, "new")``.
    """
    if not training:
        return None, "new"
    return run_id_from(resumed_checkpoint(ckpt_path, run_dir), run_dir)


def run_id_from(checkpoint: Path | None, run_dir: str | Path | None) -> tuple[str | None, str]:
    """:func:`resumed_run_id` for the checkpoint a training resumes from (None: a fresh start)."""
    if checkpoint is None:
        return None, "new"
    run_id = run_id_in_checkpoint(checkpoint)
    if run_id:
        return run_id, f"checkpoint {checkpoint}"
    stored = read_run_file(run_dir)
    if stored:
        return stored["id"], f"{Path(str(run_dir)) / RUN_FILE}"
    return None, "new"


def _readable(path: Path) -> bool:
    from lightning_mtl.checkpointing.files import read_checkpoint

    try:
        read_checkpoint(path, for_training=True, mmap=True)
    except (ConfigError, DataError):
        return False
    return True
