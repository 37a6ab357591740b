"""Which job folder holds the best trial of an Optuna search (``hparams_search=``).

The Hydra Optuna sweeper writes the best trial's parameters and value to
``<sweep>/optimization_results.yaml`` but not where that trial ran, and in a study continued over
several invocations the best trial may belong to an earlier sweep folder. This Hydra callback,
run by the sweeping process after the last trial (``on_multirun_end``), loads the study, finds
the job folder whose ``.hydra/overrides.yaml`` holds the trial's parameters (in this sweep or a
sibling sweep folder of the same study), writes ``<sweep>/best_trial.yaml`` and logs the folder,
so its checkpoint, metrics and plots are one path away. Neither the sweeper nor Optuna offers
this (the sweeper keeps no trial-to-job record), hence this small callback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lightning_mtl.compare.runs import job_dirs

log = logging.getLogger(__name__)

RESULT_FILE = "best_trial.yaml"


def trial_overrides(params: Mapping[str, Any]) -> set[str]:
    """The command-line overrides the sweeper gave the trial's job (``name=value``, formatted
    as the sweeper formats them)."""
    return {f"{name}={value}" for name, value in params.items()}


def job_folders(sweep_dir: Path) -> Iterable[Path]:
    """The job folders of this sweep, then those of the sibling sweep folders (earlier
    invocations of a continued study), newest first."""
    siblings = [p for p in sweep_dir.parent.iterdir() if p.is_dir() and p != sweep_dir]
    for sweep in [sweep_dir, *sorted(siblings, reverse=True)]:
        yield from job_dirs(sweep)


def find_job(sweep_dir: Path, params: Mapping[str, Any]) -> Path | None:
    """The job folder whose overrides include every one of ``params`` (None if none has)."""
    wanted = trial_overrides(params)
    for folder in job_folders(sweep_dir):
        path = folder / ".hydra" / "overrides.yaml"
        given = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
        if wanted <= {str(item) for item in given}:
            return folder
    return None


class BestTrialFolder(Callback):
    """``hydra.callbacks.best_trial`` of ``hparams_search=optuna``: after the sweep, writes
    ``<sweep>/best_trial.yaml`` (the best trial's number, value, parameters and job folder, one
    entry per Pareto-optimal trial for several objectives) and logs the folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import optuna  # an optional extra (sweep), present whenever this sweeper ran

        sweeper = config.hydra.sweeper
        storage = OmegaConf.select(sweeper, "storage")
        if storage is None:
            log.info("the Optuna study has no storage: no best-trial folder to report")
            return
        study = optuna.load_study(study_name=str(sweeper.study_name), storage=str(storage))
        several = len(study.directions) > 1
        best = study.best_trials if several else [study.best_trial]
        sweep_dir = Path(config.hydra.sweep.dir)
        entries = []
        for trial in best:
            folder = find_job(sweep_dir, trial.params)
            entries.append(
                {
                    "number": trial.number,
                    "values" if several else "value": trial.values if several else trial.value,
                    "params": dict(trial.params),
                    "job_dir": str(folder) if folder is not None else None,
                }
            )
            if folder is None:
                log.warning(
                    "Optuna's best trial %d (%s) ran in no job folder under %s (a sweep folder "
                    "of another layout, or moved)",
                    trial.number,
                    trial.params,
                    sweep_dir.parent,
                )
            else:
                log.info("Optuna's best trial %d ran in %s", trial.number, folder)
        result = {"study": study.study_name, "best": entries if several else entries[0]}
        (sweep_dir / RESULT_FILE).write_text(yaml.safe_dump(result, sort_keys=False))
