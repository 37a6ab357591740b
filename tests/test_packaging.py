"""The built wheel works outside the checkout: configs shipped inside the package, a user's own
config folder on Hydra's search path, data and logs under the working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = """# @package _global_
run_name: mine
model:
  backbone:
    name: test_resnet
data:
  train_size: 16
  val_size: 8
  test_size: 8
  batch_size: 8
  num_workers: 0
  image_size: 32
extras:
  print_config: false
"""


def uv() -> str:
    found = shutil.which("uv") or str(ROOT / ".tools" / "bin" / "uv")
    if not Path(found).is_file():
        pytest.skip("uv is not installed (make install puts it in .tools/)")
    return found


@pytest.mark.slow  # builds the wheel, makes a virtual environment, trains one step from it
def test_the_wheel_trains_outside_the_checkout_with_a_users_own_configs(tmp_path: Path) -> None:
    subprocess.run(
        [uv(), "build", "--wheel", "-q", "-o", str(tmp_path / "dist")], cwd=ROOT, check=True
    )
    (wheel,) = (tmp_path / "dist").glob("lightning_mtl-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([uv(), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [uv(), "pip", "install", "-q", "--python", str(python), "--no-deps", str(wheel)], check=True
    )
    # The dependencies come from this environment (a .pth line adds its site-packages, without
    # running its .pth files: the checkout's editable install is not seen); installing them anew
    # would download gigabytes. The package itself, its configs and scripts come from the wheel.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "work"
    (work / "myconfigs" / "experiment").mkdir(parents=True)
    (work / "myconfigs" / "experiment" / "mine.yaml").write_text(EXPERIMENT)
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ROOT", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    script = str(venv / "bin" / "mtl-train")

    def run(*arguments: str) -> str:
        result = subprocess.run(
            [script, *arguments], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        return result.stdout + result.stderr

    where = subprocess.run(
        [str(python), "-c", "import lightning_mtl; print(lightning_mtl.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(venv))  # the wheel's copy, not the checkout's
    shown = run("--config-dir", "myconfigs", "experiment=mine", "--cfg", "job")
    assert "name: test_resnet" in shown and "run_name: mine" in shown
    output = run("--config-dir", "myconfigs", "debug=fdr", "experiment=mine")
    assert "Running in `fast_dev_run` mode" in output and "test/segmentation/miou" in output
    (folder,) = (work / "logs" / "debug" / "runs").iterdir()  # under the working directory
    assert "name: test_resnet" in (folder / ".hydra" / "config.yaml").read_text()
    assert (folder / "train.log").is_file()
    assert "== Configuration groups ==" in run("--help")
