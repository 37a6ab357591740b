"""Every documented switch works: every option of every config group composes, resolves and
passes the pre-flight schema, and trains one step; so do the combinations the README and docs/
tell users about (``logger=none``, ``callbacks=none``, ``debug=*`` with ``trainer=ddp_sim``, each
``experiment=`` on generated files in its native format).

Composing covers everything in the default suite. One step of each option costs a Lightning run:
the default suite runs a few (in one process), the slow suite the rest (every task file,
experiment, source, and the DDP combinations in subprocesses). Two groups have their own
end-to-end tests, which this file checks cover every option rather than repeat them: every
``weighting=`` trains the default experiment in tests/test_train.py, every
``model.architecture=`` trains from its switch in tests/test_architectures.py.
``trainer=gpu`` and ``trainer=ddp`` need GPUs: they are composed and schema-checked only.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from lightning_mtl.preflight import config_problems
from lightning_mtl.train import train
from lightning_mtl.utils.setup import CONFIG_DIR
from tests.conftest import FAST, compose_config, run_ddp_sim
from tests.test_sources_images import OFFICE31_CLASSES, write_celeba, write_image
from tests.test_sources_npy import write_layout

# Groups selected as `group=option`; `task` is a multi-select, `architecture` a model key,
# `data/source` a package of merged data, `hydra` the run's own (every CLI run composes it),
# `preprocess` a group of predict.yaml and export.yaml only (tests/test_predict_export.py).
SPECIAL = {"task", "architecture", "hydra", "preprocess"}
SHAPES_TASKS = ["segmentation", "depth", "count", "dominant_color", "colors"]
# One optimizer step, one validation and one test batch: what a switch needs to show it works.
STEP = [
    "++trainer.max_epochs=1",
    "++trainer.max_steps=1",
    "++trainer.limit_train_batches=1",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "++trainer.num_sanity_val_steps=0",
    "++trainer.log_every_n_steps=1",
    "++trainer.accelerator=cpu",
    "++trainer.devices=1",
    "++extras.print_config=false",
    "++preflight.progress=false",
]
SHAPES_DATA = [o for o in FAST if o.startswith("data.")]
MERGED_SHAPES_DATA = [
    "data.batch_size=4",
    "data.num_workers=0",
    "data.persistent_workers=false",
    *(f"data.sources.{s}.sizes={{train: 16, val: 8, test: 8}}" for s in ("scenes", "objects")),
    *(f"data.sources.{s}.image_size=32" for s in ("scenes", "objects")),
]
# The real-data experiments on a few generated files (test_real_experiments.py's recipe).
REAL_DATA = ["data.batch_size=2", "data.num_workers=0", "data.persistent_workers=false"]
QUIET = ["++callbacks.rich_progress_bar=null", "++callbacks.model_summary=null"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def plain_groups() -> list[str]:
    """Every top-level config folder selected as ``group=option``."""
    return sorted(
        p.name
        for p in CONFIG_DIR.iterdir()
        if p.is_dir() and p.name not in SPECIAL and any(p.glob("*.yaml"))
    )


def cycled_selections() -> Iterator[list[str]]:
    """Selections that together pick every option of every group at least once: selection i
    takes option ``i mod n`` of each group of n options, a task file, an architecture and (with
    merged data) an extra source; the first ones each take a debug config with
    ``trainer=ddp_sim`` (as the docs combine them), the others each trainer in turn."""
    groups = {g: options(g) for g in plain_groups() if g not in {"experiment", "debug", "trainer"}}
    debugs, trainers = options("debug"), options("trainer")
    tasks, architectures = options("task"), options("architecture")
    sources = options("data/source")
    lengths = [*(len(v) for v in groups.values()), len(tasks), len(architectures), len(sources)]
    for i in range(max(*lengths, len(debugs) + len(trainers))):
        picks = [f"{g}={opts[i % len(opts)]}" for g, opts in groups.items()]
        if i < len(debugs):
            picks += [f"debug={debugs[i]}", "trainer=ddp_sim"]
        else:
            picks.append(f"trainer={trainers[(i - len(debugs)) % len(trainers)]}")
        picks += [f"task=[{tasks[i % len(tasks)]}]"]
        picks.append(f"model.architecture={architectures[i % len(architectures)]}")
        if groups["data"][i % len(groups["data"])] != "shapes":
            picks.append(f"+data/source@data.sources.extra={sources[i % len(sources)]}")
        yield picks


class Composer:
    """Composes ``train.yaml`` many times inside one Hydra initialisation (0.3-1 s each)."""

    def __init__(self, out: Path) -> None:
        self.paths = [f"paths.{k}={out}" for k in ("output_dir", "log_dir", "work_dir")]

    def __call__(self, overrides: list[str]) -> DictConfig:
        return compose(config_name="train", overrides=[*overrides, *self.paths])


@pytest.fixture
def composer(tmp_path: Path) -> Iterator[Composer]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        yield Composer(tmp_path)
    GlobalHydra.instance().clear()


def check_composed(cfg: DictConfig, what: str) -> None:
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict) and container["tasks"], what
    assert container["model"]["tasks"] == container["tasks"], what
    assert "task" not in container, f"{what}: a task file lost its '# @package tasks' line"
    assert [str(p) for p in config_problems(cfg)] == [], what


def test_every_option_of_every_group_composes_and_passes_the_schema(composer: Composer) -> None:
    selected: dict[str, set[str]] = {}
    for picks in cycled_selections():
        check_composed(composer(picks), " ".join(picks))
        for pick in picks:
            key, _, value = pick.lstrip("+").partition("=")
            selected.setdefault(key.split("@")[0], set()).add(value.strip("[]"))
    for experiment in options("experiment"):
        check_composed(composer([f"experiment={experiment}"]), f"experiment={experiment}")
    # nothing left out: every file of every folder was selected at least once
    for group in [g for g in plain_groups() if g != "experiment"]:
        assert selected[group] >= set(options(group)), group
    assert selected["task"] == set(options("task"))
    assert selected["model.architecture"] == set(options("architecture"))
    assert selected["data/source"] == set(options("data/source"))
    for debug in options("debug"):
        assert any(f"debug={debug}" in p and "trainer=ddp_sim" in p for p in cycled_selections())


def test_readme_switches_name_existing_options() -> None:
    """Every ``group=option`` the README and the docs pages show names a config file, so the
    tests here reach it."""
    pages = [CONFIG_DIR.parent / "README.md", *sorted((CONFIG_DIR.parent / "docs").glob("*.md"))]
    readme = "\n".join(page.read_text() for page in pages)
    # the switch tables and the commands it shows (not the error messages it quotes)
    text = "\n".join(
        line for line in readme.splitlines() if line.startswith("|") or "mtl-train " in line
    )
    groups = "|".join([*plain_groups(), "task"])
    found = 0
    for group, value in re.findall(rf"(?<![.\w+])({groups})=([\w|\\\[\],]+)", text):
        for name in re.split(r"[|,\\\[\]]+", value):
            own_example = f"configs/{group}/{name}.yaml" in readme  # a file the README writes
            if name and name != "null" and not own_example:
                assert name in options(group), f"README: {group}={name}"
                found += 1
    assert found > 20


# ------------------------------------------------------------------------- one step of each


def step_overrides(data: str, *picks: str, callbacks: str = "default") -> list[str]:
    tiny = {"shapes": SHAPES_DATA, "merged_shapes": MERGED_SHAPES_DATA}[data]
    return [f"data={data}", f"callbacks={callbacks}", *picks, *tiny, *STEP, *QUIET]


def one_step(out: Path, overrides: list[str]) -> dict[str, float]:
    cfg = compose_config("train", overrides, out)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1, overrides
    assert math.isfinite(metrics["train/loss"]), overrides
    assert any(k.startswith("test/") for k in metrics), overrides
    return metrics


# Together these select every option of callbacks, finetune, logger and debug, the in-process
# trainers and both Shapes data configs. The first ones (the documented `logger=none` and
# `callbacks=none` among them) run in the default suite, the others in the slow one (W&B's
# start, anomaly detection and the profiler cost tens of seconds on a 2-core CPU).
RUNS = [
    ("shapes", "logger=none", "callbacks=default", "weighting=uncertainty"),
    ("merged_shapes", "callbacks=none", "finetune=frozen", "debug=fdr", "trainer=cpu"),
    ("shapes", "finetune=gradual", "weighting=famo"),
    ("shapes", "debug=overfit", "model.architecture=mtan"),
    ("shapes", "logger=wandb", "debug=limit", "weighting=upgrad"),
    ("merged_shapes", "logger=csv", "debug=profiler", "model.architecture=mmoe"),
    ("shapes", "logger=none", "callbacks=none", "debug=default"),
]
DEFAULT_RUNS = 3


def run_switches(out: Path, data: str, *picks: str) -> None:
    callbacks = next((p.split("=")[1] for p in picks if p.startswith("callbacks=")), "default")
    picks = tuple(p for p in picks if not p.startswith("callbacks="))
    start = time.perf_counter()
    one_step(out, step_overrides(data, *picks, callbacks=callbacks))
    print(f"{data} {' '.join(picks)}: {time.perf_counter() - start:.1f} s")


def test_one_step_of_the_readme_switches_in_one_process(tmp_path: Path) -> None:
    for i, (data, *picks) in enumerate(RUNS[:DEFAULT_RUNS]):
        run_switches(tmp_path / str(i), data, *picks)
    covered = " ".join(" ".join(run) for run in RUNS)
    for group in ("callbacks", "finetune", "logger", "debug"):
        for option in options(group):
            assert f"{group}={option}" in covered, f"{group}={option}"


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS[DEFAULT_RUNS:], ids=lambda run: " ".join(run))
def test_one_step_of_the_other_small_group_options(tmp_path: Path, run: tuple[str, ...]) -> None:
    run_switches(tmp_path, *run)


def test_every_weighting_and_architecture_option_has_its_training_test() -> None:
    """The weighting and architecture groups are run by their own end-to-end tests (not again
    here): each config file is one of their cases."""
    from tests.test_architectures import NAMES
    from tests.test_train import _method_cases

    trained = {getattr(case, "values", (case,))[0] for case in _method_cases()}
    assert set(options("weighting")) <= trained
    assert set(options("architecture")) <= set(NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("task", SHAPES_TASKS)
def test_one_step_of_every_shapes_task_file_alone(tmp_path: Path, task: str) -> None:
    one_step(tmp_path, step_overrides("shapes", f"task=[{task}]"))


def write_experiment_data(root: Path, experiment: str) -> None:
    """Files in the dataset's native format under ``root`` (``paths.data_dir``)."""
    if experiment == "celeba":
        write_celeba(root / "celeba", partition=(0, 0, 0, 0, 1, 1, 2, 2))
    elif experiment == "nyuv2":
        write_layout(root / "nyuv2", {"label": 13}, with_normals=True)
    elif experiment == "cityscapes":
        write_layout(root / "cityscapes", {"label_7": 7, "label_19": 19}, with_normals=False)
    elif experiment == "own_data":  # the README's CSV folder: a class and a regression column
        rows = ["image,species,length,split"]
        for i in range(6):
            write_image(root / "my_images" / "photos" / f"{i}.png", (40 * i, 0, 0))
            split = ("train", "train", "val", "val", "test", "test")[i]
            rows.append(f"photos/{i}.png,{i % 3},{1.5 * i},{split}")
        (root / "my_images" / "labels.csv").write_text("\n".join(rows) + "\n")
    elif experiment == "office31":
        for d, domain in enumerate(("amazon", "dslr", "webcam")):
            for c, name in enumerate(OFFICE31_CLASSES):
                for i in range(5):
                    path = root / "office31" / domain / "images" / name / f"{i}.jpg"
                    write_image(path, (c * 80, d * 60, i * 40))


REAL_EXPERIMENTS = {"celeba", "cityscapes", "nyuv2", "office31", "own_data"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment", [e for e in options("experiment") if e != "shapes_heterogeneous"]
)
def test_one_step_of_every_experiment(tmp_path: Path, experiment: str) -> None:
    overrides = [f"experiment={experiment}", *STEP, *QUIET]
    if experiment in REAL_EXPERIMENTS:
        write_experiment_data(tmp_path / "data", experiment)
        overrides += [*REAL_DATA, f"paths.data_dir={tmp_path / 'data'}"]
    else:
        overrides += SHAPES_DATA
    one_step(tmp_path, overrides)


@pytest.mark.slow
def test_one_step_of_the_heterogeneous_experiment(tmp_path: Path) -> None:
    one_step(tmp_path, ["experiment=shapes_heterogeneous", *MERGED_SHAPES_DATA, *STEP, *QUIET])


def _source_data(root: Path, source: str) -> list[str]:
    """Files for ``data/source/<source>`` and the overrides that train a task on them."""
    task = ["task=[dominant_color]"]
    if source == "csv_folder":
        rows = ["image,label,split"]
        for i in range(6):
            write_image(root / "my_images" / f"{i}.png", (40 * i, 0, 0))
            rows.append(f"{i}.png,{i % 2},{('train', 'train', 'val', 'val', 'test', 'test')[i]}")
        (root / "my_images" / "labels.csv").write_text("\n".join(rows) + "\n")
        return [
            *task,
            "tasks.dominant_color.target=label",
            "tasks.dominant_color.head.num_classes=2",
        ]
    if source == "office_home":
        for domain in ("Art", "Clipart"):
            for c, name in enumerate(("Alarm_Clock", "Backpack")):
                for i in range(5):
                    write_image(
                        root / "office_home" / domain / name / f"{i:05d}.jpg", (c * 90, i, 0)
                    )
        return [*task, "tasks.dominant_color.target=Art", "tasks.dominant_color.head.num_classes=2"]
    write_experiment_data(root, {"office31": "office31"}.get(source, source))
    return []


@pytest.mark.slow
@pytest.mark.parametrize("source", ["csv_folder", "office_home"])
def test_one_step_of_the_sources_no_experiment_uses(tmp_path: Path, source: str) -> None:
    overrides = [
        "data=merged",
        f"+data/source@data.sources.{source}={source}",
        f"paths.data_dir={tmp_path / 'data'}",
        *_source_data(tmp_path / "data", source),
        *REAL_DATA,
        *STEP,
        *QUIET,
    ]
    one_step(tmp_path, overrides)


@pytest.mark.slow  # a DDP run in a subprocess
def test_a_debug_config_with_ddp_sim(tmp_path: Path) -> None:
    """``debug=<any> trainer=ddp_sim``: every debug config sets one CPU device (debuggers and
    multiprocessing do not mix), so the combination runs the DDP strategy in one process. The
    debug options differ only in Trainer flags, each run in-process above; one of them shows the
    combination works."""
    output = run_ddp_sim(tmp_path, "debug=fdr", *(s for s in STEP if "accelerator" not in s))
    assert "Running in `fast_dev_run` mode" in output


@pytest.mark.slow
def test_logger_none_with_ddp_sim(tmp_path: Path) -> None:
    run_ddp_sim(tmp_path, "logger=none", *(s for s in STEP if "devices" not in s))
