"""Shared fixtures: composed configs shrunk to run in seconds on a CPU.

The environment is set before timm or wandb is imported: no network, no hub retries.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Runs the tests start (in-process or as subprocesses) record into a store of their own, never
# into the project's logs/results.sqlite; a test that checks the store names its own file.
os.environ.setdefault(
    "MTL_RESULTS_STORE",
    os.path.join(tempfile.gettempdir(), f"lightning-mtl-tests-{os.getpid()}", "results.sqlite"),
)

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from lightning_mtl.utils.setup import CONFIG_DIR, configure_environment

configure_environment()

# A run small enough for a test: 32×32 scenes, 2 short epochs, no workers, no progress bar, and
# timm's test_resnet (0.4 M parameters, 5 stages like resnet18's): the template's code paths at a
# fifth of the CPU time and a twentieth of the checkpoint size. Tests about the default backbone
# itself name it (the default run's own test trains the default config unchanged).
FAST = [
    "model.backbone.name=test_resnet",
    "data.train_size=48",
    "data.val_size=16",
    "data.test_size=16",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.image_size=32",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "extras.print_config=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    # the end-of-run figures and the affinity monitor have tests of their own
    "callbacks.run_plots=null",
    "callbacks.task_affinity=null",
]


def compose_config(
    config_name: str, overrides: list[str], output_dir: Path | None = None
) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` like the entry point does, outside a Hydra run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name=config_name, overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
            cfg.paths.work_dir = os.getcwd()
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides, name="train", out=None)``: a fast config writing under tmp_path."""

    def make(*overrides: str, name: str = "train", out: Path | None = None) -> DictConfig:
        fast = [o for o in FAST if name != "eval" or not o.startswith("callbacks.")]
        return compose_config(name, [*fast, *overrides], out or tmp_path)

    return make


# What DDP prints when a parameter gets no gradient or a logged value is not synchronised.
DDP_WARNINGS = ("find_unused_parameters", "unused parameters", "sync_dist")


def run_ddp_sim(
    run_dir: Path, *overrides: str, base: Sequence[str] = FAST, timeout: int = 600
) -> str:
    """``mtl-train trainer=ddp_sim`` (two gloo processes) on ``base`` (the FAST run, or another
    small one) plus ``overrides``, in a subprocess: Lightning's DDP launcher re-runs the command
    line for rank 1, so it cannot run in-process. Fails the test with the output's tail on a
    non-zero exit; returns stdout and stderr."""
    fast = [o for o in base if not o.startswith("trainer.accelerator")]
    command = [sys.executable, "-m", "lightning_mtl.train", "trainer=ddp_sim", *fast, *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    result = subprocess.run(
        [*command, f"hydra.run.dir={run_dir}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output
