"""The pre-flight check: everything that can be wrong before training, found in seconds.

``train.py`` calls it twice:

1. :func:`check_config` on the composed config, before anything is built: the values against
   the schema (``schema.py``) and the task files' ``# @package tasks`` headers (``headers.py``).
   When it finds a problem it still builds the data and the model to find theirs, so that one
   error lists them all.
2. :func:`run_preflight` once the data module and the model exist: label keys, class counts
   across sources and against the heads (``labels.py``), the heads' output shapes on one real
   batch, then (unless ``preflight.mode=skip``) the scan of files and label values (``scan.py``).

Every problem names the key, file or sample, the value and what was expected; all of them are
raised together as one :class:`~lightning_mtl.errors.ConfigError` (or
:class:`~lightning_mtl.errors.DataError` when data on disk is at fault).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import hydra
from omegaconf import DictConfig

from lightning_mtl.preflight.headers import task_header_problems
from lightning_mtl.preflight.labels import declared_problems
from lightning_mtl.preflight.report import (
    MAX_LISTED,
    Problem,
    problem_from_error,
    raise_problems,
)
from lightning_mtl.preflight.scan import PreflightOptions, ScanStats, scan_data
from lightning_mtl.preflight.schema import schema_problems
from lightning_mtl.preflight.sources import split_sources
from lightning_mtl.tasks import check_against_batches

__all__ = [
    "PreflightOptions",
    "Problem",
    "ScanStats",
    "check_config",
    "config_problems",
    "run_preflight",
]

log = logging.getLogger(__name__)


def config_problems(cfg: DictConfig) -> list[Problem]:
    """The composed config's problems: schema and task file headers (nothing is built)."""
    return schema_problems(cfg) + task_header_problems(cfg)


def check_config(cfg: DictConfig) -> None:
    """Stop before anything is built when the config is wrong, listing the problems of the data
    and the model too (they are built here only when the config has a problem)."""
    problems = config_problems(cfg)
    if problems:
        named = [p.where for p in problems]
        # what building finds beyond the config's problems (not them again, as a builder words it)
        problems += [p for p in _build_and_check(cfg) if not any(k in p.value for k in named)]
    raise_problems(problems)


def run_preflight(cfg: DictConfig | None, datamodule: Any, model: Any) -> ScanStats | None:
    """Check the data against the model's tasks; raise one error listing every problem.

    Returns what the scan read (None with ``preflight.mode=skip``).
    """
    problems, stats = _data_problems(PreflightOptions.from_config(cfg), datamodule, model)
    raise_problems(_left_to_the_bad_sample_policy(problems, datamodule))
    if stats is not None:
        log.info(
            "pre-flight check passed in %.2f s (%d files verified, %d samples read, %d label "
            "tables)",
            stats.seconds,
            stats.files_verified,
            stats.samples_read,
            stats.tables_read,
        )
    return stats


def _left_to_the_bad_sample_policy(problems: list[Problem], datamodule: Any) -> list[Problem]:
    """Under ``data.on_bad_sample=skip`` bad samples are a warning (training leaves them out and
    stops past ``data.max_bad_fraction``); every other problem, and all under ``raise``."""
    if getattr(datamodule, "on_bad_sample", "raise") != "skip":
        return problems
    bad = [p for p in problems if p.sample]
    if bad:
        lines = "\n".join(f"  {p}" for p in bad[:MAX_LISTED])
        log.warning(
            "pre-flight: %d bad sample(s), left out during training (data.on_bad_sample=skip):\n%s",
            len(bad),
            lines,
        )
    return [p for p in problems if not p.sample]


def _data_problems(
    options: PreflightOptions, datamodule: Any, model: Any
) -> tuple[list[Problem], ScanStats | None]:
    tasks = list(getattr(model, "tasks", None) or [])
    problems = declared_problems(datamodule, tasks)
    if any(p.where.endswith(".target") for p in problems):
        return problems, None  # without every label key, the rest would repeat that problem
    problems += _batch_problems(datamodule, model, ranges=options.mode == "skip")
    if options.mode == "skip":
        return problems, None
    try:
        parts = list(split_sources(datamodule))
    except Exception as error:  # a source that cannot be built is a problem
        return [
            *problems,
            problem_from_error("data", error, "data sources that can be built"),
        ], None
    found, stats = scan_data(parts, tasks, options)
    return problems + found, stats


def _batch_problems(datamodule: Any, model: Any, ranges: bool) -> list[Problem]:
    """The heads' outputs against the labels of one real batch per source (shapes)."""
    from lightning_mtl.utils.setup import example_batch

    try:
        check_against_batches(model, list(model.tasks), example_batch(datamodule), ranges)
    except Exception as error:
        where = "the heads on one batch per source"
        return [problem_from_error(where, error, "head outputs that match the labels")]
    return []


def _build_and_check(cfg: DictConfig) -> list[Problem]:
    """The problems of building the data and the model from a config already found wrong."""
    from lightning_mtl.data.inputs import share_backbone_inputs, share_task_targets

    built = {}
    problems: list[Problem] = []
    for key, what in (("data", "a data module"), ("model", "a model")):
        try:
            built[key] = hydra.utils.instantiate(cfg[key])
        except Exception as error:
            problems.append(problem_from_error(key, root_error(error), f"{what} that can be built"))
    if len(built) < 2:
        return problems
    try:
        share_backbone_inputs(built["data"], built["model"])
        share_task_targets(built["data"], built["model"])
        found, _ = _data_problems(PreflightOptions.from_config(cfg), built["data"], built["model"])
    except Exception as error:
        return [*problems, problem_from_error("data", root_error(error), "data that can be read")]
    return problems + _unique(_left_to_the_bad_sample_policy(found, built["data"]))


def root_error(error: BaseException) -> BaseException:
    """The template's own error inside Hydra's instantiation wrappers, else ``error``."""
    from lightning_mtl.errors import config_error_in

    return config_error_in(error) or error


def _unique(problems: Sequence[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))
