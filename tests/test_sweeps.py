"""Hyper-parameter search from the command line: an Optuna study kept in SQLite and continued by
the same command; the cluster launcher's config renders the job a SLURM cluster gets."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra

from lightning_mtl import train
from lightning_mtl.utils.best_trial import find_job
from tests.conftest import FAST, compose_config

ROOT = Path(__file__).resolve().parents[1]

SMALL = [*FAST, "data.train_size=16", "data.val_size=8", "data.test_size=8"]


def run_command_line(monkeypatch: pytest.MonkeyPatch, *arguments: str) -> None:
    """``mtl-train <arguments>`` in this process (imports once for both sweeps)."""
    monkeypatch.setattr(sys, "argv", ["mtl-train", *arguments])
    GlobalHydra.instance().clear()
    train.main()
    GlobalHydra.instance().clear()


@pytest.mark.slow  # 5 trainings in one process, 15 s
def test_an_optuna_study_in_sqlite_is_continued_by_the_same_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = ["-m", "hparams_search=optuna", *SMALL, f"paths.log_dir={tmp_path}"]
    run_command_line(monkeypatch, *command, "hydra.sweeper.n_trials=3")
    storage = f"sqlite:///{tmp_path}/optuna/train_optimizer.sqlite"
    study = optuna.load_study(study_name="train_optimizer", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert all(1e-4 <= t.params["model.optimizer.lr"] <= 1e-2 for t in study.trials)
    assert len({t.params["model.optimizer.lr"] for t in study.trials}) == 3
    # each trial's value is the validation loss its run logged at the end
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    best = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {study.best_value}" in best
    found = yaml.safe_load((sweep / "best_trial.yaml").read_text())["best"]
    assert found["number"] == study.best_trial.number and found["value"] == study.best_value
    assert found["job_dir"] == str(sweep / str(study.best_trial.number))  # job n is trial n here

    run_command_line(monkeypatch, *command, "hydra.sweeper.n_trials=2")
    study = optuna.load_study(study_name="train_optimizer", storage=storage)
    assert len(study.trials) == 5 and all(t.value is not None for t in study.trials)
    # new trials, not the first invocation's drawn again
    assert len({t.params["model.optimizer.lr"] for t in study.trials}) == 5
    sweeps = sorted((tmp_path / "train" / "multiruns").iterdir())
    assert len(sweeps) == 2  # a second sweep folder
    # the best trial's folder, in whichever sweep it ran: the job given its learning rate
    found = yaml.safe_load((sweeps[-1] / "best_trial.yaml").read_text())["best"]
    assert found["number"] == study.best_trial.number
    overrides = yaml.safe_load((Path(found["job_dir"]) / ".hydra" / "overrides.yaml").read_text())
    assert f"model.optimizer.lr={study.best_trial.params['model.optimizer.lr']}" in overrides
    assert Path(found["job_dir"]).parent == (sweep if study.best_trial.number < 3 else sweeps[-1])


def test_the_best_trials_job_folder_is_found_in_this_or_an_earlier_sweep(tmp_path: Path) -> None:
    def job(sweep: str, number: int, *overrides: str) -> Path:
        folder = tmp_path / sweep / str(number)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
        (folder / ".hydra" / "config.yaml").write_text("seed: 1\n")
        return folder

    earlier = job("2026-01-01_10-00-00", 0, "model.optimizer.lr=0.001", "seed=1")
    job("2026-01-02_10-00-00", 0, "model.optimizer.lr=0.0010000000000000002", "seed=1")
    latest = job("2026-01-02_10-00-00", 1, "model.optimizer.lr=0.003", "weighting=famo")
    sweep = latest.parent
    assert find_job(sweep, {"model.optimizer.lr": 0.003, "weighting": "famo"}) == latest
    assert find_job(sweep, {"model.optimizer.lr": 0.001}) == earlier  # exact, in the sibling
    assert find_job(sweep, {"model.optimizer.lr": 0.003, "weighting": "equal"}) is None


def test_the_famo_search_samples_famos_own_hyper_parameters() -> None:
    cfg = compose_config("train", ["hparams_search=famo_optuna"])
    assert cfg.weighting.name == "famo" and cfg.optimized_metric == "val/loss"


def test_the_slurm_launcher_asks_for_the_trainers_gpus_nodes_and_tasks(tmp_path: Path) -> None:
    """``hydra/launcher=slurm``: one task per GPU (Lightning's SLURM environment then makes each
    task a DDP rank), the nodes of ``trainer.num_nodes``, the time from config; rendered into
    the sbatch script submitit would submit, without a cluster."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import _make_sbatch_string

    from lightning_mtl.utils.setup import CONFIG_DIR

    GlobalHydra.instance().clear()
    overrides = [
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.timeout_min=720",
        "hydra.launcher.partition=gpu",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["gpus_per_node"] == 4 and launcher["tasks_per_node"] == 4
    assert launcher["nodes"] == 2 and launcher["timeout_min"] == 720
    sbatch = _make_sbatch_string(
        command="python -u -m submitit.core._submit",
        folder=str(tmp_path),
        job_name="train",
        nodes=launcher["nodes"],
        ntasks_per_node=launcher["tasks_per_node"],
        gpus_per_node=launcher["gpus_per_node"],
        cpus_per_task=launcher["cpus_per_task"],
        time=launcher["timeout_min"],
        partition=launcher["partition"],
        mem=f"{launcher['mem_gb']}GB",
        signal_delay_s=launcher["signal_delay_s"],
    )
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=720",
        "#SBATCH --partition=gpu",
    ):
        assert line in sbatch, line


def test_the_wandb_sweep_runs_trials_with_valid_overrides() -> None:
    """``sweeps/wandb_optimizer.yaml``: the command W&B's agent runs composes with a value of
    every parameter, and the metric it optimises is one the runs log."""
    import yaml

    sweep = yaml.safe_load((ROOT / "sweeps" / "wandb_optimizer.yaml").read_text())
    assert sweep["command"][:2] == ["${env}", "mtl-train"]
    fixed = [a for a in sweep["command"][2:] if not a.startswith("${")]
    sampled = [f"{key}={spec['min']}" for key, spec in sweep["parameters"].items()]
    cfg = compose_config("train", [*fixed, *sampled])
    assert cfg.weighting.name == "famo" and cfg.weighting.lr == 0.001
    assert cfg.model.optimizer.lr == 0.0001
    assert sweep["metric"]["name"] == cfg.callbacks.model_checkpoint.monitor == "val/loss"
