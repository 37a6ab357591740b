"""Run and sweep folders: unique per process, shared by the ranks of one job; DDP processes that
Lightning starts join their parent's Hydra job."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_mtl.utils import run_folders
from lightning_mtl.utils.ddp_launch import ENV_JOB, join_parent_job
from lightning_mtl.utils.run_folders import claim_folder, cluster_job_id, register_resolvers


@pytest.fixture(autouse=True)
def fresh_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_folders, "_claimed", {})
    for key in ("SLURM_NTASKS", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def claim_as_a_new_process(path: str) -> str:
    """``claim_folder`` in a pool worker, as a process of its own would (a worker may run
    several claims: each starts with nothing claimed)."""
    run_folders._claimed.clear()
    return claim_folder(path)


def test_processes_starting_in_the_same_second_get_folders_of_their_own(tmp_path: Path) -> None:
    wanted = str(tmp_path / "runs" / "2026-12-01_10-00-00")
    with ProcessPoolExecutor(4) as pool:
        claimed = list(pool.map(claim_as_a_new_process, [wanted] * 4))
    suffixes = ["", "_2", "_3", "_4"]
    assert sorted(claimed) == sorted(wanted + s for s in suffixes)
    assert all(Path(c).is_dir() for c in claimed)
    # within a process the same value resolves to the same folder (Hydra resolves run.dir twice)
    first = claim_folder(str(tmp_path / "other"))
    assert claim_folder(str(tmp_path / "other")) == first == str(tmp_path / "other")


def test_the_ranks_of_a_cluster_job_share_one_folder_named_by_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slurm = {"SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242"}
    assert cluster_job_id(slurm) == "slurm-4242"
    array = {**slurm, "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "3"}
    assert cluster_job_id(array) == "slurm-4200_3"
    assert cluster_job_id({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242"}) is None  # one process
    assert cluster_job_id({"TORCHELASTIC_RUN_ID": "abc", "WORLD_SIZE": "16"}) == "torchrun-abc"
    assert cluster_job_id({"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "16"}) is None
    assert cluster_job_id({}) is None

    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert run_folders.run_stamp() == "slurm-77"
    wanted = str(tmp_path / "slurm-77")
    Path(wanted).mkdir()  # rank 0 was first
    assert claim_folder(wanted) == wanted  # rank 1 joins it, no _2


def test_the_run_dir_resolver_claims_only_a_new_training_run(tmp_path: Path) -> None:
    register_resolvers()
    base = str(tmp_path / "runs" / "stamp")
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")

    def resolve(mode: str, ckpt_path: str | None) -> str:
        cfg = OmegaConf.create(
            {
                "train": True,
                "ckpt_path": ckpt_path,
                "hydra": {"mode": mode, "run": {"dir": "${mtl_run_dir:" + base + "}"}},
            }
        )
        return str(cfg.hydra.run.dir)

    assert resolve("RunMode.MULTIRUN", None) == base and not Path(base).exists()  # not used
    assert resolve("RunMode.RUN", str(run / "checkpoints" / "last.ckpt")) == str(run)  # resumed
    assert resolve("RunMode.RUN", None) == base and Path(base).is_dir()  # claimed
    run_folders._claimed.clear()  # another process, the same second
    assert resolve("RunMode.RUN", None) == base + "_2"


def test_a_ddp_child_rebuilds_its_command_line_from_its_parents_job() -> None:
    argv = ["train.py", "-m", "--config-dir", "/my/configs", "seed=1,2", "hydra.run.dir=x"]
    job = {"overrides": ["seed=2", "task=[depth,count]"], "output_dir": "/l/0", "job_name": "train"}
    env = {ENV_JOB: json.dumps(job), "LOCAL_RANK": "1"}
    assert join_parent_job(argv, env) == [
        "train.py",
        "--config-dir",
        "/my/configs",
        "seed=2",
        "task=[depth,count]",
        'hydra.run.dir="/l/0"',
        "hydra.job.name=train_ddp_process_1",
        "hydra.output_subdir=null",
    ]
    assert join_parent_job(argv, {ENV_JOB: json.dumps(job), "LOCAL_RANK": "0"}) == argv  # rank 0
    assert join_parent_job(argv, {"LOCAL_RANK": "1"}) == argv  # torchrun's ranks: as given
