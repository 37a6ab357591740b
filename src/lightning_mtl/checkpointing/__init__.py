"""Checkpoints you can trust: atomic writes, safe and validated reads (``files``), and where a
resumed run continues and from which checkpoint (``resume``)."""

from lightning_mtl.checkpointing.files import (
    SafeCheckpointIO,
    atomic_save,
    read_checkpoint,
    with_safe_checkpoint_io,
)
from lightning_mtl.checkpointing.resume import (
    newest_checkpoint,
    resolve_ckpt_path,
    run_folder,
)

__all__ = [
    "SafeCheckpointIO",
    "atomic_save",
    "newest_checkpoint",
    "read_checkpoint",
    "resolve_ckpt_path",
    "run_folder",
    "with_safe_checkpoint_io",
]
