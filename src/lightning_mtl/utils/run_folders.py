"""Run and sweep folder names that never collide and that every rank of a job agrees on.

Hydra names a run ``${now:%Y-%m-%d}_${now:%H-%M-%S}``: two runs started in the same second (two
jobs of an array, two terminals) would share a folder and overwrite each other's checkpoints, and
the ranks of a multi-node job started by ``srun`` or ``torchrun`` (each one composes its own config)
may read the clock a second apart and write to different folders. The resolvers here fix both:

* ``${mtl_stamp:}``: the folder's name, the start time ``YYYY-MM-DD_HH-MM-SS``; for a job whose
  processes the cluster starts (SLURM with several tasks, ``torchrun`` with a rendezvous id) the
  job's id instead (``slurm-<job>[_<array task>]``, ``torchrun-<id>``), the same on every rank.
  Cached in the config, so a sweep and its submitit jobs read one value.
* ``${mtl_unique_dir:<path>}``: claims ``<path>`` by creating it (an atomic ``mkdir``); if another
  process took it first, ``<path>_2``, ``<path>_3``, ... Used for sweep folders.
* ``${mtl_run_dir:<path>}``: a training resumed from a checkpoint in a run folder continues in
  that folder (``checkpointing.resume.output_dir``); otherwise ``<path>``, claimed like above.

Processes of a job that the cluster starts share their folder and claim nothing (they would each
get a different one); DDP processes that Lightning starts are handed the folder of rank 0
(``utils.ddp_launch``).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"
# what this process claimed, per requested path: Hydra resolves hydra.run.dir more than once
_claimed: dict[str, str] = {}


def cluster_job_id(environ: os._Environ[str] | dict[str, str] | None = None) -> str | None:
    """The id of a multi-process job whose processes the cluster started, the same on every rank
    (SLURM with more than one task, ``torchrun`` with a rendezvous id); None otherwise (one
    process, or DDP processes that Lightning starts itself)."""
    env = os.environ if environ is None else environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        array_task = env.get("SLURM_ARRAY_TASK_ID")
        job = env.get("SLURM_ARRAY_JOB_ID") if array_task else env["SLURM_JOB_ID"]
        return f"slurm-{job}" + (f"_{array_task}" if array_task else "")
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none" and int(env.get("WORLD_SIZE", "1") or 1) > 1:
        return f"torchrun-{run_id}"
    return None


def run_stamp() -> str:
    """``${mtl_stamp:}``: the start time, or the cluster job's id (see ``cluster_job_id``)."""
    return cluster_job_id() or datetime.now().strftime(STAMP_FORMAT)


def claim_folder(path: str) -> str:
    """``path`` if this process could create it, else the first free ``path_<n>`` (n >= 2).

    ``os.mkdir`` is atomic, so two processes asking for the same name in the same second get
    different folders. The answer is remembered per ``path``: resolving the same config value
    again in this process gives the same folder. The ranks of a cluster-started job share
    ``path`` (created if missing) instead of claiming one each."""
    if path in _claimed:
        return _claimed[path]
    folder = Path(path)
    if cluster_job_id() is not None:
        folder.mkdir(parents=True, exist_ok=True)
        _claimed[path] = path
        return path
    folder.parent.mkdir(parents=True, exist_ok=True)
    candidate, number = folder, 1
    while True:
        try:
            candidate.mkdir()
            break
        except FileExistsError:
            number += 1
            candidate = folder.with_name(f"{folder.name}_{number}")
    _claimed[path] = str(candidate)
    return str(candidate)


def ensure_folder(path: str) -> str:
    """``${mtl_folder:<path>}``: ``path``, created if missing (an Optuna study's SQLite file
    needs its folder to exist before the first job runs)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def rank_suffix() -> str:
    """``${mtl_rank_suffix:}``: ``""`` on the first process, ``_rank<n>`` on the others of a job
    the cluster starts, so each rank logs to a file of its own in the shared folder."""
    if cluster_job_id() is None:
        return ""
    rank = os.environ.get("SLURM_PROCID") if "SLURM_JOB_ID" in os.environ else None
    rank = rank or os.environ.get("RANK", "0")
    return "" if rank in ("", "0") else f"_rank{rank}"


def _run_dir(default: str, *, _root_: DictConfig) -> str:
    from lightning_mtl.checkpointing.resume import output_dir

    resumed = output_dir(default, _root_=_root_)
    if resumed != default:
        return resumed
    # In a sweep, hydra.run.dir is not used (Lightning reads it to start DDP processes, which
    # utils.ddp_launch points to the job's folder): nothing to claim.
    if str(OmegaConf.select(_root_, "hydra.mode", default="")).endswith("MULTIRUN"):
        return default
    return claim_folder(default)


def register_resolvers() -> None:
    """Register ``mtl_stamp``, ``mtl_unique_dir``, ``mtl_rank_suffix``, ``mtl_folder`` and ``mtl_run_dir`` (before Hydra composes a
    config that uses them). The stamp is cached in the config: Hydra copies the cache into every
    job of a sweep, submitit's included."""
    if not OmegaConf.has_resolver("mtl_stamp"):
        OmegaConf.register_new_resolver("mtl_stamp", run_stamp, use_cache=True)
    if not OmegaConf.has_resolver("mtl_unique_dir"):
        OmegaConf.register_new_resolver("mtl_unique_dir", claim_folder, use_cache=True)
    if not OmegaConf.has_resolver("mtl_folder"):
        OmegaConf.register_new_resolver("mtl_folder", ensure_folder)
    if not OmegaConf.has_resolver("mtl_rank_suffix"):
        OmegaConf.register_new_resolver("mtl_rank_suffix", rank_suffix)
    if not OmegaConf.has_resolver("mtl_run_dir"):
        OmegaConf.register_new_resolver("mtl_run_dir", _run_dir)
