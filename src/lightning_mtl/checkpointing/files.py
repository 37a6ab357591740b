"""Checkpoint files that can be trusted: written atomically next to their target, read only
with ``weights_only=True`` and refused with one clear message when they are not checkpoints of
this template.

Why not Lightning's own ``TorchCheckpointIO``: it writes through an fsspec transaction whose
temporary file lives in ``$TMPDIR``; when that is another filesystem (tmpfs on many clusters)
the final move is a copy into the target, and a kill during it leaves a truncated ``last.ckpt``
(the last good checkpoint destroyed). Its loader lets torch's unpickler errors through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from lightning_mtl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# What every checkpoint written by mtl-train holds (eval rebuilds the model from the hparams).
MODEL_KEYS = ("state_dict", "hyper_parameters")
HPARAM_KEYS = ("backbone", "tasks", "weighting")
# What resuming training needs on top (a `save_weights_only` checkpoint lacks them).
TRAINING_KEYS = ("epoch", "global_step", "loops", "optimizer_states")
TEMP_SUFFIX = ".tmp"


def read_checkpoint(
    path: _PATH,
    *,
    for_training: bool = False,
    map_location: Any = "cpu",
    mmap: bool = False,
) -> dict[str, Any]:
    """Load ``path`` with ``weights_only=True`` (no pickled code ever runs) and check that it is
    a checkpoint of this template (for ``for_training``: one that can resume training).

    Raises ``ConfigError`` when the file does not exist and ``DataError`` naming the file and
    the problem when it is empty, truncated, another kind of file, holds a pickled object, or
    lacks the template's keys. ``mmap=True`` reads tensors lazily: a cheap check of a big file.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"ckpt_path={str(path)!r}: no such checkpoint file")
    expected = _expected(for_training)
    size = file.stat().st_size
    if size == 0:
        raise DataError(
            f"{file}: the file is empty (0 bytes; a write was interrupted?). {expected}"
        )
    if not zipfile.is_zipfile(file):
        raise DataError(
            f"{file}: not a torch checkpoint archive ({size} bytes; truncated, or another kind "
            f"of file). {expected}"
        )
    try:
        checkpoint = torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # torch's unpickler raises many types; none of them is useful here
        raise DataError(f"{file}: {_load_problem(error)}. {expected}") from None
    if not isinstance(checkpoint, dict):
        raise DataError(f"{file}: holds a {type(checkpoint).__name__}, not a dict. {expected}")
    required = MODEL_KEYS + (TRAINING_KEYS if for_training else ())
    missing = [key for key in required if key not in checkpoint]
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict):
        missing += [f"hyper_parameters.{key}" for key in HPARAM_KEYS if key not in hparams]
    if missing:
        raise DataError(f"{file}: not a checkpoint of this template: no {missing}. {expected}")
    return checkpoint


def _expected(for_training: bool) -> str:
    keys = list(MODEL_KEYS + (TRAINING_KEYS if for_training else ()))
    expected = f"Expected a checkpoint written by mtl-train: a torch zip archive with keys {keys}"
    if for_training:
        expected += " (a save_weights_only checkpoint cannot resume training)"
    return expected


def _load_problem(error: Exception) -> str:
    """One line for why torch could not load the file, without torch's advice to load it with
    ``weights_only=False`` (which would run whatever code the file carries)."""
    foreign = re.findall(r"GLOBAL ([\w.]+)", str(error))
    if foreign:
        return (
            f"holds a pickled Python object ({', '.join(sorted(set(foreign)))}) that a safe "
            "weights-only load refuses (none of its code was run)"
        )
    return f"unreadable, truncated or corrupt ({type(error).__name__} while reading it)"


def atomic_write(path: _PATH, write: Callable[[Any], None], *, durable: bool = True) -> None:
    """``write(file)`` into a temporary file in the target's folder, then ``os.replace``: a kill
    at any moment, or a reader on another rank, sees either the previous file or the new one,
    never a partial file. (A temporary file in the same folder is on the same filesystem, so the
    rename is atomic.) ``durable``: fsync the file and the folder, so the rename survives a
    crash of the machine too (checkpoints; not needed for prediction files)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
    try:
        with temporary.open("xb") as file:
            write(file)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    if durable:
        _fsync_folder(target.parent)


def atomic_save(checkpoint: dict[str, Any], path: _PATH) -> None:
    """``torch.save`` with :func:`atomic_write`, durable."""
    atomic_write(path, lambda file: torch.save(checkpoint, file))


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files left in ``folder`` by writes that were killed."""
    return sorted(folder.glob(f".*{TEMP_SUFFIX}"))


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with an atomic local write (see :func:`atomic_save`) and a
    weights-only, validating read (see :func:`read_checkpoint`). Remote paths (``s3://`` ...)
    keep Lightning's fsspec write."""

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable[..., Any] | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ConfigError(
                f"loading {path} with weights_only=False: refused, checkpoints of this template "
                "load with weights_only=True (a pickled object would run its code)"
            )
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return read_checkpoint(path, map_location=map_location)


def with_safe_checkpoint_io(plugins: Iterable[Any] | Any | None) -> list[Any]:
    """The trainer's plugins with :class:`SafeCheckpointIO` added, unless one of them is already
    a ``CheckpointIO`` (a user's choice wins)."""
    if plugins is None:
        plugins = []
    elif not isinstance(plugins, Iterable) or isinstance(plugins, str):
        plugins = [plugins]
    plugins = list(plugins)
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(SafeCheckpointIO())
    return plugins
