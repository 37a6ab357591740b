"""Where a resumed run continues and from which checkpoint.

A run's checkpoints live in ``<run>/checkpoints/``. Resuming keeps the run in ``<run>`` (the
``mtl_run_dir`` resolver of ``configs/hydra/default.yaml``, registered by ``utils.run_folders``), so the checkpoint callbacks find
their own folder again and Lightning restores their state (the best checkpoint so far among it):
the final test uses the run's true best checkpoint. ``ckpt_path`` accepts

* a checkpoint file (``<run>/checkpoints/last.ckpt``, or any file of this template);
* a run folder (``<run>`` or ``<run>/checkpoints``): its newest complete checkpoint;
* ``last``: the newest complete checkpoint of this run's own folder, or a fresh start when it
  has none (so one command line, with a fixed ``hydra.run.dir``, both starts and requeues a job).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_mtl.checkpointing.files import read_checkpoint, stale_temporaries
from lightning_mtl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CHECKPOINT_FOLDER = "checkpoints"
# Lightning's own names for ckpt_path that it resolves itself (SLURM's requeue checkpoint).
LIGHTNING_NAMES = ("hpc",)


def run_folder(ckpt_path: str | None) -> Path | None:
    """The run folder ``ckpt_path`` belongs to: ``<run>`` for ``<run>/checkpoints/<file>``,
    ``<run>/checkpoints`` or a folder holding ``checkpoints/``; else None."""
    if not ckpt_path or ckpt_path == "last" or ckpt_path in LIGHTNING_NAMES:
        return None
    path = Path(ckpt_path).expanduser().absolute()
    if path.is_file():
        return path.parent.parent if path.parent.name == CHECKPOINT_FOLDER else None
    if path.is_dir() and path.name == CHECKPOINT_FOLDER:
        return path.parent
    if (path / CHECKPOINT_FOLDER).is_dir():
        return path
    return None


def output_dir(default: str, *, _root_: DictConfig) -> str:
    """``hydra.run.dir``: the folder of the run being resumed when training resumes from a
    checkpoint inside a run folder, else ``default`` (a new folder). Evaluation (no ``train``
    key) and test-only runs (``train=false``) always get a new folder."""
    if not _root_.get("train"):
        return default
    folder = run_folder(OmegaConf.select(_root_, "ckpt_path", throw_on_missing=False))
    return str(folder) if folder is not None else default


def newest_checkpoint(folder: Path, *, for_training: bool = True) -> Path | None:
    """The newest (last written) complete checkpoint in ``folder`` or ``folder/checkpoints``;
    empty, truncated or foreign files are skipped with a warning. None if there is none."""
    if (folder / CHECKPOINT_FOLDER).is_dir():
        folder = folder / CHECKPOINT_FOLDER
    for temporary in stale_temporaries(folder):
        log.warning(
            "Ignoring %s: the temporary file of a checkpoint write that was killed", temporary
        )
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for candidate in candidates:
        try:
            read_checkpoint(candidate, for_training=for_training, mmap=True)
        except DataError as error:
            log.warning("Skipping a checkpoint that is not complete: %s", error)
            continue
        return candidate
    return None


def resolve_ckpt_path(ckpt_path: Any, run_dir: str | Path, *, for_training: bool) -> str | None:
    """The checkpoint file to load for ``ckpt_path`` (see the module docstring), checked before
    anything is trained or evaluated: a bad file or an empty run folder stops here with a
    ``ConfigError`` / ``DataError`` naming it."""
    if ckpt_path is None or ckpt_path in LIGHTNING_NAMES:
        return ckpt_path
    value = str(ckpt_path)
    if value == "last":
        found = newest_checkpoint(Path(run_dir), for_training=for_training)
        if found is None:
            log.warning("ckpt_path=last: no complete checkpoint in %s yet: starting fresh", run_dir)
            return None
        log.info("ckpt_path=last: resuming from %s", found)
        return str(found)
    path = Path(value).expanduser()
    if path.is_dir():
        found = newest_checkpoint(path, for_training=for_training)
        if found is None:
            raise DataError(
                f"ckpt_path={value!r}: no complete checkpoint (*.ckpt) in this folder or its "
                f"{CHECKPOINT_FOLDER}/"
            )
        log.info("ckpt_path=%s: using its newest complete checkpoint %s", value, found)
        return str(found)
    if not path.exists():
        raise ConfigError(
            f"ckpt_path={value!r}: no such checkpoint file or run folder (expected a .ckpt file, "
            "a run folder logs/<run_name>/runs/<date_time>, or 'last')"
        )
    read_checkpoint(path, for_training=for_training, mmap=True)
    return str(path)
