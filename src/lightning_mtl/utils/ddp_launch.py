"""DDP processes that Lightning starts join the Hydra job of rank 0, also inside a sweep.

Lightning starts ranks 1..n-1 of a DDP run (``trainer=ddp``, ``trainer=ddp_sim``) by running the
command line again with ``LOCAL_RANK`` set and ``hydra.run.dir`` appended. Under ``-m`` that
command line is the whole sweep: each child would run every job of the sweep in a sweep folder of
its own (lightning-hydra-template #393), and its ``hydra.run.dir`` is not the job's folder. So,
before training, rank 0 puts its job in the environment the children inherit (the job's config
name and overrides and its output folder; ``hand_job_to_children``), and a child rebuilds its
command line from it (``join_parent_job``): one single run with exactly the job's overrides, in
the job's folder, logging to ``<job name>_ddp_process_<n>.log``.

Processes that a cluster starts (``srun``, ``torchrun``) are not children: they run the command as
given and agree on the folder by the job's id (``utils.run_folders``). A sweep on a cluster goes
through the submitit launcher (one cluster job per sweep job), not ``-m`` under ``srun``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

ENV_JOB = "MTL_HYDRA_JOB"
# Hydra's command-line flags that take a value and that a child keeps (the user's config folder)
CONFIG_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def hand_job_to_children() -> None:
    """In a Hydra job: put the job's overrides and output folder in ``$MTL_HYDRA_JOB``, for the
    DDP processes Lightning is about to start (they inherit the environment)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    os.environ[ENV_JOB] = json.dumps(
        {
            "overrides": list(hydra.overrides.task),
            "output_dir": hydra.runtime.output_dir,
            "job_name": hydra.job.name,
        }
    )


def _config_flags(argv: Sequence[str]) -> list[str]:
    """The ``--config-dir``/``--config-name``/``--config-path`` flags of ``argv``, values kept."""
    kept: list[str] = []
    arguments = iter(argv)
    for argument in arguments:
        flag = argument.split("=", 1)[0]
        if flag in CONFIG_FLAGS:
            kept.append(argument)
            if "=" not in argument:
                kept.append(next(arguments, ""))
    return kept


def join_parent_job(argv: Sequence[str], environ: dict[str, str] | None = None) -> list[str]:
    """The command line this process runs: ``argv`` unchanged, unless this is a DDP process that
    Lightning started for a Hydra job (``LOCAL_RANK`` > 0 and ``$MTL_HYDRA_JOB`` set); then the
    job's overrides as one single run in the job's folder."""
    env = os.environ if environ is None else environ
    job, local_rank = env.get(ENV_JOB), env.get("LOCAL_RANK", "0")
    if not job or local_rank == "0":
        return list(argv)
    spec = json.loads(job)
    folder = str(spec["output_dir"]).replace('"', '\\"')
    return [
        argv[0],
        *_config_flags(argv[1:]),
        *spec["overrides"],
        f'hydra.run.dir="{folder}"',
        f"hydra.job.name={spec['job_name']}_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]
