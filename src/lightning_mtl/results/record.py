"""Adding runs to the results store: at the end of every training (``train.py``), and later from
run folders (``mtl-report add``, for runs made before the store existed or on another machine).

Both read the same things: the composed config (``.hydra/config.yaml`` for a folder) and the
final values, i.e. every ``test/`` and ``val/`` metric and the step time ``perf/step_ms``. A
folder's values come from its ``csv/metrics.csv`` (the last value of each column); its commit is
``unknown`` (it was not recorded when the run trained).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_mtl.compare.runs import read_metrics
from lightning_mtl.results.identity import RunRecord, git_commit, record_from_config
from lightning_mtl.results.store import ResultsStore

log = logging.getLogger(__name__)

#: the environment variable that overrides ``results.store`` (the tests point it elsewhere)
STORE_ENV = "MTL_RESULTS_STORE"
#: final values kept: metrics of these splits, and these performance figures
KEPT_PREFIXES = ("test/", "val/")
KEPT_VALUES = ("perf/step_ms", "perf/samples_per_s")
WANDB_KEY = "results/record"


def kept(values: Mapping[str, Any]) -> dict[str, float]:
    """The values the store keeps (see the module docstring), as floats."""
    return {
        str(k): float(v)
        for k, v in values.items()
        if str(k).startswith(KEPT_PREFIXES) or k in KEPT_VALUES
    }


def unrecordable(cfg: DictConfig | Mapping[str, Any], values: Mapping[str, float]) -> str | None:
    """Why a run does not belong in the store (None: it does). One rule for the end of a
    training and for ``mtl-report add``: a training (``train: true``; not an evaluation of a
    checkpoint, ``train=false``) that has its final metrics: test metrics, or val metrics under
    ``test=false`` (a run still training has val metrics but no test ones yet)."""
    if cfg.get("train") is not True:
        return "not a training (train is not true: an evaluation of a checkpoint)"
    split = "test/" if cfg.get("test", True) else "val/"  # a run that tests ends with its test
    if not any(name.startswith(split) for name in values):
        return f"no final {split} metrics (unfinished, or failed)"
    return None


def record_run(cfg: DictConfig, metrics: Mapping[str, float], trainer: Any) -> RunRecord | None:
    """Add the finished run to the store named by ``results.store`` (global rank 0 only), and,
    under a W&B logger, put the same record in the W&B run's summary (``results/record``) so
    that ``mtl-report --wandb`` finds it there. ``results.store=null`` records nothing, in
    either place; neither does a run that :func:`unrecordable` refuses."""
    store = OmegaConf.select(cfg, "results.store", default=None)
    if not store or not trainer.is_global_zero:
        return None
    values = kept(metrics)
    for callback in trainer.callbacks:  # the step timer logs straight to the loggers
        values.update(kept(getattr(callback, "logged", {}) or {}))
    why = unrecordable(cfg, values)
    if why:
        log.info("Not recorded in the results store: %s", why)
        return None
    root = OmegaConf.select(cfg, "paths.root_dir", default=".")
    run_dir = OmegaConf.select(cfg, "paths.output_dir", default=os.getcwd())
    record = record_from_config(cfg, Path(run_dir).resolve(), values, git_commit(root))
    ResultsStore(store).add(record)
    log.info("Recorded in the results store %s (mtl-report builds the tables)", store)
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary[WANDB_KEY] = json.dumps(asdict(record), default=str)
    return record


def records_from_wandb(project: str, api: Any = None) -> list[RunRecord]:
    """The records that runs of the W&B ``project`` (``entity/project``) put in their summaries
    (runs without one are left out, with a count in the log)."""
    if api is None:
        import wandb

        api = wandb.Api()
    records, without = [], 0
    for run in api.runs(project):
        text = run.summary.get(WANDB_KEY)
        if not text:
            without += 1
            continue
        records.append(RunRecord(**json.loads(text)))
    if without:
        log.info("%d runs of %s have no %s (unfinished, or older)", without, project, WANDB_KEY)
    return records


def read_run_folder(run_dir: Path) -> RunRecord:
    """The record of a finished run folder (``.hydra/config.yaml`` and ``csv/metrics.csv``)."""
    config, metrics = run_dir / ".hydra" / "config.yaml", run_dir / "csv" / "metrics.csv"
    for path, what in ((config, "Hydra's saved config"), (metrics, "the CSV logger's metrics")):
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: no {path.relative_to(run_dir)} ({what})")
    values = kept(read_metrics(metrics))
    return record_from_config(load_run_config(config), run_dir.resolve(), values, "unknown")


def load_run_config(path: Path) -> DictConfig:
    """A run's saved config (``.hydra/config.yaml``): a mapping, else a ValueError naming it."""
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path}: expected a mapping of config keys, got a list")
    return cfg


def run_folders(paths: Iterable[Path]) -> list[Path]:
    """The run folders at or under ``paths`` (a run, a multirun's folder, or ``logs/``)."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such folder")
        configs = [path / ".hydra" / "config.yaml"] if (path / ".hydra").is_dir() else []
        configs += sorted(path.glob("**/.hydra/config.yaml"))
        for config in configs:
            folder = config.parent.parent
            if (folder / "csv" / "metrics.csv").is_file() and folder not in found:
                found.append(folder)
    return found
