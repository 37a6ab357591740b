"""End to end from composed Hydra configs: train, log, checkpoint, resume, evaluate, precision,
W&B offline, and a 2-process DDP run."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, open_dict

from lightning_mtl.eval import evaluate
from lightning_mtl.train import train
from lightning_mtl.weighting import WEIGHTINGS
from tests.conftest import DDP_WARNINGS, FAST, run_ddp_sim

TASKS = ["segmentation", "depth", "count", "dominant_color", "colors"]
VAL_METRICS = {
    "segmentation": ["miou", "pixel_accuracy"],
    "depth": ["mae", "rmse", "abs_rel", "delta1"],
    "count": ["mae", "r2"],
    "dominant_color": ["accuracy", "f1"],
    "colors": ["accuracy", "f1", "map"],
}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


class StateProbe(L.Callback):
    """Records the balancer's state and the step when (re)started training."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step
        self.start_state = {k: v.clone() for k, v in pl_module.weighting.state_dict().items()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One short run of the default experiment with uncertainty weighting (2 epochs, 12 steps)."""
    from tests.conftest import compose_config

    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(
        "train",
        [*FAST, "weighting=uncertainty", "trainer.max_epochs=2", "extras.print_config=true"],
        out,
    )
    metrics, objects = train(cfg)
    return {"out": out, "metrics": metrics, "objects": objects, "cfg": cfg}


def test_default_experiment_trains_logs_and_checkpoints(trained_run: dict) -> None:
    out, metrics = trained_run["out"], trained_run["metrics"]
    assert trained_run["objects"]["trainer"].global_step == 12
    rows = read_csv(out / "csv" / "metrics.csv")
    header = set(rows[0])
    for task in TASKS:
        assert f"train/{task}/loss" in header
        assert f"train/weight/{task}" in header
        assert f"val/{task}/loss" in header
        for metric in VAL_METRICS[task]:
            assert f"val/{task}/{metric}" in header
            assert f"test/{task}/{metric}" in metrics
            assert f"train/{task}/{metric}" in header
    losses = column(rows, "train/loss")
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    # uncertainty weights move away from their initial value ½·exp(0)
    assert column(rows, "train/weight/depth")[-1] != pytest.approx(0.5)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert len(list((out / "checkpoints").glob("epoch_*.ckpt"))) == 1
    assert "tasks" in (out / "config_tree.log").read_text()
    # checkpoints hold no pickled code: they load with weights_only=True
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 12 and "weighting.log_vars" in checkpoint["state_dict"]


def test_resume_restores_step_and_balancer_state(
    trained_run: dict, make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    last = trained_run["out"] / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["state_dict"]["weighting.log_vars"]
    assert not torch.equal(saved, torch.zeros_like(saved))
    cfg = make_cfg(
        "weighting=uncertainty",
        "trainer.max_epochs=3",
        f"ckpt_path={last}",
        "+callbacks.probe._target_=tests.test_train.StateProbe",
        "test=false",
    )
    _, objects = train(cfg)
    trainer = objects["trainer"]
    probe = next(cb for cb in trainer.callbacks if isinstance(cb, StateProbe))
    assert probe.start_step == 12
    assert torch.equal(probe.start_state["log_vars"], saved)
    assert trainer.global_step == 18 and trainer.current_epoch == 3
    steps = [
        int(row["step"])
        for row in read_csv(tmp_path / "csv" / "metrics.csv")
        if row.get("train/loss")
    ]
    assert min(steps) >= 12 and max(steps) == 17


def test_eval_reproduces_the_validation_metrics_of_training(
    trained_run: dict, make_cfg: Callable[..., DictConfig]
) -> None:
    rows = read_csv(trained_run["out"] / "csv" / "metrics.csv")
    last_val = [row for row in rows if row.get("val/loss")][-1]
    # no weighting override: the architecture comes from the checkpoint's hyperparameters
    cfg = make_cfg(f"ckpt_path={trained_run['out'] / 'checkpoints' / 'last.ckpt'}", name="eval")
    metrics = evaluate(cfg)
    compared = 0
    for key, value in last_val.items():
        if key.startswith("val/") and value:
            assert metrics[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
            compared += 1
    assert compared == 19  # 13 metrics, 5 task losses, val/loss
    assert all(f"test/{task}/loss" in metrics for task in TASKS)


def test_bf16_mixed_precision_run(make_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    cfg = make_cfg(
        "trainer.precision=bf16-mixed",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "test=false",
        "task=[segmentation,count]",
    )
    _, objects = train(cfg)
    assert objects["trainer"].precision == "bf16-mixed"
    losses = column(read_csv(tmp_path / "csv" / "metrics.csv"), "train/loss")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


class ScalerProbe(L.Callback):
    """At every step's start: the GradScaler's scale, a backbone weight and the balancer state."""

    def __init__(self) -> None:
        self.starts: list[tuple[float, torch.Tensor, dict[str, torch.Tensor]]] = []

    def _record(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        state = {k: v.clone() for k, v in module.weighting.state_dict().items()}
        weight = next(module.net.architecture.backbone.parameters()).detach().clone()
        self.starts.append((trainer.precision_plugin.scaler.get_scale(), weight, state))

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._record(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._record(trainer, module)


# A stateful loss-based and a stateful gradient method in the default suite; FAMO (its own
# optimiser step on the log-weights) and the params level (a Jacobian per parameter) slow.
FP16_CASES = [
    ("dwa", "representation"),
    ("gradvac", "representation"),
    pytest.param("famo", "representation", marks=pytest.mark.slow),
    pytest.param("nash_mtl", "params", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("method", "level"), FP16_CASES)
def test_fp16_grad_scaler_skips_overflowing_steps_and_they_leave_no_trace_in_the_balancer(
    method: str, level: str, make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """16-mixed with a real GradScaler (on CPU through Lightning's MixedPrecision plugin): a huge
    initial scale overflows the first steps, the scaler skips them, and neither the weights nor
    the balancer's state move on those steps; the later steps train."""
    cfg = make_cfg(
        f"weighting={method}",
        *([f"weighting.level={level}"] if method in {"nash_mtl", "gradvac"} else []),
        "trainer.precision=null",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "test=false",
        "callbacks.model_checkpoint=null",
        "task=[segmentation,count,dominant_color]",
        "+callbacks.probe._target_=tests.test_train.ScalerProbe",
    )
    scaler = {"_target_": "torch.amp.GradScaler", "device": "cpu"}
    scaler.update(init_scale=2.0**30, backoff_factor=2.0**-16)  # 2^30, then 2^14, ...
    plugin = {"_target_": "lightning.pytorch.plugins.precision.MixedPrecision"}
    plugin.update(precision="16-mixed", device="cpu", scaler=scaler)
    with open_dict(cfg):
        cfg.trainer.plugins = [plugin]
    _, objects = train(cfg)
    trainer = objects["trainer"]
    probe = next(cb for cb in trainer.callbacks if isinstance(cb, ScalerProbe))
    steps = list(zip(probe.starts, probe.starts[1:], strict=False))
    assert len(steps) == 6
    skipped = [(a, b) for a, b in steps if b[0] < a[0]]
    taken = [(a, b) for a, b in steps if b[0] >= a[0]]
    assert skipped and taken, [a[0] for a, _ in steps]
    for a, b in skipped:  # a skipped step: no weight moved, the balancer is as before it
        assert torch.equal(a[1], b[1])
        for key in a[2]:  # bit for bit (NaN: never computed, e.g. update_every's cache)
            torch.testing.assert_close(a[2][key], b[2][key], rtol=0, atol=0, equal_nan=True)
    for a, b in taken:
        assert not torch.equal(a[1], b[1])
    assert all(torch.isfinite(p).all() for p in objects["model"].parameters())
    losses = column(read_csv(tmp_path / "csv" / "metrics.csv"), "train/loss")
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


def test_wandb_offline_run_writes_its_files(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = make_cfg(
        "logger=wandb",
        "tags=[ci,offline]",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "test=false",
    )
    _, objects = train(cfg)
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = next(lg for lg in objects["trainer"].loggers if isinstance(lg, WandbLogger))
    run = logger.experiment
    # the whole resolved config is the run's config; the model report's counts its summary
    assert run.config["tasks"]["depth"]["loss"]["name"] == "l1"
    assert run.config["model"]["backbone"]["name"] == "test_resnet"
    model = objects["model"]
    assert run.summary["model/params/total"] == sum(p.numel() for p in model.parameters())
    assert set(run.tags) == {"ci", "offline"} and run.project == "lightning-mtl"
    assert "segmentation/val/miou" in run.summary.keys()  # noqa: SIM118 (W&B: task first)
    wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert next(runs[0].glob("run-*.wandb")).stat().st_size > 0
    assert (tmp_path / "csv" / "metrics.csv").is_file()  # the CSV logger runs beside W&B


# A real 2-process run per mechanism that DDP could break (slow: a minute each on 2 CPU cores).
# Every method's DDP step is compared with one process on the union batch in seconds by
# tests/test_weighting_ddp.py, and FAMO's all-reduced losses run under ddp_sim in the default
# suite (tests/test_merged_data.py); these add the whole Lightning path: nash_mtl (a cvxpy
# solve that must give both ranks the same weights) and uncertainty (the balancer's own learned
# parameters, synchronised by DDP like the model's) as the two jobs of one `-m` sweep, which also
# checks that DDP inside a Hydra sweep runs each job once, in its own folder; pcgrad at the params
# level (all-reduced Jacobian, a random projection order seeded alike on each rank) alone.
DDP_CHECKS = ["trainer.max_epochs=2", "callbacks.gradient_conflict.every_n_steps=2", "test=true"]


def check_ddp_run(folder: Path, output: str) -> None:
    """What a 2-process run of the FAST config with DDP_CHECKS leaves in its folder."""
    rows = read_csv(folder / "csv" / "metrics.csv")
    # 48 samples, 2 ranks, batch 8: 3 steps per epoch per rank
    assert max(int(row["step"]) for row in rows if row.get("train/loss")) == 5
    assert any(row.get("val/segmentation/miou") for row in rows)
    assert any(row.get("test/segmentation/miou") for row in rows)
    assert len(column(rows, "train/grad_cos/segmentation/depth")) == 3  # steps 0, 2, 4
    assert len(list((folder / "checkpoints").glob("*.ckpt"))) >= 1
    for warning in DDP_WARNINGS:
        assert warning not in output, warning


@pytest.mark.slow
def test_ddp_sim_two_cpu_processes_pcgrad_at_params(tmp_path: Path) -> None:
    output = run_ddp_sim(
        tmp_path, "weighting=pcgrad", "weighting.level=params", *DDP_CHECKS, timeout=300
    )
    assert "world_size: 2" in output or "MEMBER: 2/2" in output
    check_ddp_run(tmp_path, output)


@pytest.mark.slow
def test_a_ddp_sweep_runs_each_job_once_in_its_own_folder(tmp_path: Path) -> None:
    """``-m trainer=ddp_sim weighting=nash_mtl,uncertainty``: Lightning starts rank 1 by running
    the command line again, which under ``-m`` is the whole sweep; rank 1 must join each job of
    rank 0 instead (utils/ddp_launch.py), and the second job must start its own processes (not
    reuse the first job's, which have ended: utils/entry.py)."""
    command = [sys.executable, "-m", "lightning_mtl.train", "-m", "trainer=ddp_sim"]
    fast = [o for o in FAST if not o.startswith("trainer.accelerator")]
    overrides = [*fast, *DDP_CHECKS, "weighting=nash_mtl,uncertainty", f"paths.log_dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    result = subprocess.run(
        [*command, *overrides], env=env, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["multiruns"]  # no runs/
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()  # one sweep folder, not one per rank
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, method in zip(jobs, ["nash_mtl", "uncertainty"], strict=True):
        assert {p.name for p in job.glob("*.log")} == {"train.log", "train_ddp_process_1.log"}
        assert f"weighting={method}" in (job / ".hydra" / "overrides.yaml").read_text()
        check_ddp_run(job, output)
    assert output.count("world_size: 2") + output.count("MEMBER: 2/2") >= 2


GRADIENT_AT_PARAMS = {"mgda", "pcgrad", "upgrad", "nash_mtl"}  # a few also at the params level


# in the default suite: one of each kind (the formulas of all are tested in seconds elsewhere)
QUICK = {"equal", "dwa", "famo", "uncertainty", "upgrad", "nash_mtl", "graddrop", "pcgrad@params"}


def _method_cases() -> list:
    cases = [*sorted(WEIGHTINGS.names()), *(f"{m}@params" for m in sorted(GRADIENT_AT_PARAMS))]
    return [c if c in QUICK else pytest.param(c, marks=pytest.mark.slow) for c in cases]


@pytest.mark.parametrize("method", _method_cases())
def test_every_weighting_method_trains_the_default_experiment(
    method: str, make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    name, _, level = method.partition("@")
    cfg = make_cfg(
        f"weighting={name}",
        *([f"weighting.level={level}"] if level else []),
        "trainer.max_epochs=3",  # DWA leaves its warm-up of two epochs
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "test=false",
        "callbacks.model_checkpoint=null",
        "callbacks.gradient_conflict.every_n_steps=2",
        *(["weighting.warmup_steps=2"] if name == "stch" else []),
        # without a warm-up, ExcessMTL's first step uses the raw excess risk (the official
        # code's choice): on these losses one task's is large enough to saturate its weight
        *(["weighting.n_warmup_steps=1"] if name == "excess_mtl" else []),
    )
    _, objects = train(cfg)
    rows = read_csv(tmp_path / "csv" / "metrics.csv")
    gradient_based = objects["model"].weighting.needs_gradients
    for task in TASKS:
        weights = column(rows, f"train/weight/{task}")
        assert len(weights) == 6 and all(w == w for w in weights), (method, task)
        if not gradient_based:  # loss-based weights are positive; some Gram rules' are not
            assert all(w >= 0 for w in weights), (method, task)
        # the task's gradient norm, every 2 steps (0, 2, 4)
        assert len(column(rows, f"train/grad_norm/{task}")) == 3, (method, task)
    cosines = column(rows, "train/grad_cos/segmentation/depth")
    assert len(cosines) == 3 and all(-1.0001 <= c <= 1.0001 for c in cosines)
    assert all(torch.isfinite(torch.tensor(column(rows, "train/loss"))))
    if name in {"modo", "sdmgrad"}:
        # With these gradient scales γ·J₁J₂ᵀ ≫ 1, so MoDo's first projected step lands on the
        # simplex vertex of the smallest gradient (MGDA's min-norm answer here) and stays there;
        # SDMGrad's inner solve reaches the same vertex, pulled towards 1/k by λ = 0.3: each
        # weight is (λ/k + w*ᵢ)/(1 + λ). The papers' rules (equal to torchjd's, tested apart).
        last = [column(rows, f"train/weight/{t}")[-1] for t in TASKS]
        floor = 0.0 if name == "modo" else 0.3 / len(TASKS) / 1.3
        assert sum(last) == pytest.approx(1.0, abs=1e-5), (method, last)
        assert min(last) >= floor - 1e-6 and max(last) > 0.5, (method, last)
    # adaptive weights
    if name not in {"equal", "static", "graddrop", "dualproj", "modo", "sdmgrad"}:
        # some task's weight moves (one may sit at a bound)
        moving = [t for t in TASKS if len(set(column(rows, f"train/weight/{t}"))) > 1]
        assert moving, method
