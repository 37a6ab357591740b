"""The jobs of a Hydra sweep: each job's architecture, overrides and last logged metrics (see
:mod:`lightning_mtl.compare`)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# metrics.csv columns kept besides the test metrics, and their names in the table
PARAMS_TOTAL = "model/params/total"
PARAMS_TRAINABLE = "model/params/trainable"
FLOPS = "model/flops_per_image"
STEP_MS = "perf/step_ms"
SAMPLES_PER_S = "perf/samples_per_s"
EXTRA_COLUMNS = {
    PARAMS_TOTAL: "params_total",
    PARAMS_TRAINABLE: "params_trainable",
    FLOPS: "flops_per_image",
    STEP_MS: "step_ms",
    SAMPLES_PER_S: "samples_per_s",
}
#: written in a job directory by :class:`CompareCallback` when the job raised: its error, one line
ERROR_FILE = "job_error.txt"
DEFAULT_BASELINE = "hard"


def is_test_metric(column: str) -> bool:
    """``test/<task>/<metric>`` (or ``test/<source>/<task>/<metric>``), losses excluded."""
    parts = column.split("/")
    return parts[0] == "test" and len(parts) >= 3 and parts[-1] != "loss"


# ------------------------------------------------------------------------------------ the runs
@dataclass
class Run:
    """One job of the sweep: what it was, and the last logged value of every metric.

    ``problem`` is ``None`` for a complete job, else why it is missing from the comparison
    (its row is kept, with what it did log).
    """

    job: str
    overrides: list[str]
    architecture: str | None = None
    tasks: list[str] = field(default_factory=list)
    values: dict[str, float] = field(default_factory=dict)
    problem: str | None = None
    label: str = ""

    @property
    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.values.items() if is_test_metric(k)}


def read_metrics(path: Path) -> dict[str, float]:
    """The last non-empty value of every column of a CSV logger's ``metrics.csv``."""
    values: dict[str, float] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for column, value in row.items():
                if column is None or value in (None, ""):
                    continue
                try:
                    values[column] = float(value)
                except ValueError:
                    continue
    return values


def architecture_name(value: Any) -> str | None:
    """``model.architecture`` as a name: a string, or the ``name`` of a mapping."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        name = value.get("name")
        return str(name) if name is not None else None
    return None


def read_run(job_dir: Path, job: str, failure: str | None = None) -> Run:
    """A job directory: its config, overrides and metrics (see the module docstring)."""
    hydra_dir = job_dir / ".hydra"
    overrides_file = hydra_dir / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
    run = Run(job=job, overrides=overrides)
    config_file = hydra_dir / "config.yaml"
    if config_file.is_file():
        cfg = OmegaConf.load(config_file)
        run.architecture = architecture_name(
            OmegaConf.select(cfg, "model.architecture", default=DEFAULT_BASELINE)
        )
        tasks = OmegaConf.select(cfg, "tasks", default=None)
        run.tasks = [str(t) for t in tasks] if isinstance(tasks, DictConfig) else []
    metrics_file = job_dir / "csv" / "metrics.csv"
    if metrics_file.is_file():
        run.values = read_metrics(metrics_file)
        if not run.metrics:
            run.problem = "no test metrics in csv/metrics.csv (failed or unfinished, or test=false)"
    else:
        run.problem = "no csv/metrics.csv (the job failed early, or ran without the CSV logger)"
    error_file = job_dir / ERROR_FILE
    if failure is None and error_file.is_file():
        failure = error_file.read_text().strip()
    if failure:
        run.problem = (
            f"{run.problem}; job failed: {failure}" if run.problem else f"job failed: {failure}"
        )
    return run


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The overrides of every job Hydra's basic sweeper launches for this sweep, in order,
    rebuilt from ``multirun.yaml`` as the sweeper builds them (``None``: not a basic sweep, or
    not readable)."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        cfg = OmegaConf.load(path)
        target = str(OmegaConf.select(cfg, "hydra.sweeper._target_", default=""))
        if not target.endswith("BasicSweeper"):
            return None
        params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
        arguments = [f"{key}={value}" for key, value in params.items()]
        arguments += [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.task", default=[])]
        parsed = OverridesParser.create().parse_overrides(arguments)
        return [list(job) for job in BasicSweeper.split_arguments(parsed, None)[0]]
    except Exception as error:  # a glob sweep needs the config loader; any other surprise
        log.debug("cannot rebuild the sweep's jobs from %s: %s", path, error)
        return None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job directory under ``sweep_dir`` (holding ``.hydra/config.yaml``), in job order."""

    def order(path: Path) -> tuple[Any, ...]:
        parts = path.relative_to(sweep_dir).parts
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)

    found = {p.parent.parent for p in sweep_dir.glob("**/.hydra/config.yaml")}
    return sorted((d for d in found if d != sweep_dir), key=order)


def collect_runs(sweep_dir: Path | str, failures: Mapping[str, str] | None = None) -> list[Run]:
    """One :class:`Run` per job of the sweep, labelled; jobs that never started included.

    ``failures`` maps a job directory (as a path string) to the error it failed with.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep directory {sweep_dir}")
    failures = {str(Path(k).resolve()): v for k, v in (failures or {}).items()}
    runs = [
        read_run(d, d.relative_to(sweep_dir).as_posix(), failures.get(str(d.resolve())))
        for d in job_dirs(sweep_dir)
    ]
    expected = expected_jobs(sweep_dir)
    if expected is not None:  # in the sweep's order, with a row for each job that never ran
        found = {frozenset(run.overrides): run for run in runs}
        ordered = [
            ran if (ran := found.pop(frozenset(job), None)) is not None else _never_ran(job)
            for job in expected
        ]
        runs = ordered + list(found.values())  # directories of no expected job, last
    label_runs(runs)
    return runs


def _never_ran(overrides: list[str]) -> Run:
    """The row of a job the sweep was to launch but that has no directory."""
    name = next(
        (o.split("=", 1)[1] for o in overrides if o.startswith("model.architecture=")), None
    )
    return Run(
        job="-",
        overrides=overrides,
        architecture=name if name and name.isidentifier() else None,
        problem="the job never ran (no job directory)",
    )


def label_runs(runs: Sequence[Run]) -> None:
    """Name each row: its architecture when every run has a distinct one, else the overrides
    that differ between jobs (the job's own name when none does)."""
    names = [run.architecture for run in runs]
    if all(names) and len(set(names)) == len(names):
        for run, name in zip(runs, names, strict=True):
            run.label = str(name)
        return
    common = set.intersection(*(set(run.overrides) for run in runs)) if runs else set()
    for run in runs:
        differing = [o for o in run.overrides if o not in common]
        run.label = ",".join(differing) or f"job {run.job}"
