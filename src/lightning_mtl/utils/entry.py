"""The one way the console scripts (``mtl-train``, ``mtl-eval``, ``mtl-predict``, ``mtl-export``)
start: Hydra composes the config, a DDP process that Lightning started joins its parent's job, and
the template's own errors end the run with their message and exit code 1, without a trace.

Light to import: the job's module (torch, Lightning, timm) is imported only when a job runs, so
``--help``, ``--cfg job`` and ``--info`` answer in about a second.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from lightning_mtl.errors import config_error_in, report_error
from lightning_mtl.utils.ddp_launch import hand_job_to_children, join_parent_job
from lightning_mtl.utils.locations import configure_environment


def end_distributed_job(environment: dict[str, str]) -> None:
    """Leave no DDP state behind for the next job of a sweep (``-m trainer=ddp``): close the
    process group and restore the environment as it was before the job. Lightning sets
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``, ... in this process when it starts the DDP
    processes; left there, the next job's trainer would take them as a cluster's, start no
    processes and wait on the previous job's, already finished."""
    if "torch" in sys.modules:  # no job imported it: nothing to close
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    for key in set(os.environ) - set(environment):
        del os.environ[key]
    os.environ.update(environment)


def run_entry_point(job: str, config_name: str) -> None:
    """Run the function ``job`` (``"module:function"``, imported when the first job starts) on
    ``configs/<config_name>.yaml`` composed with the command line (``-m`` sweeps included). What
    it returns goes back to Hydra: a sweeper such as Optuna optimises it."""
    # A DDP process Lightning started for a Hydra job runs that job, not the command line's sweep.
    sys.argv = join_parent_job(sys.argv)
    module_name, function_name = job.split(":")

    def run(cfg: DictConfig) -> Any:
        function = getattr(importlib.import_module(module_name), function_name)
        hand_job_to_children()  # this job's overrides and folder, for its DDP processes
        environment = dict(os.environ)
        try:
            return function(cfg)
        except Exception as error:
            cause = config_error_in(error)
            if cause is None:
                raise
            report_error(cause)  # the message names the file or key: no trace, exit code 1
            raise SystemExit(1) from None
        finally:
            end_distributed_job(environment)

    config_path = configure_environment()
    hydra.main(version_base="1.3", config_path=config_path, config_name=config_name)(run)()
