"""One table from a Hydra multirun: a row per job, its test metrics, size, FLOPs and speed.

Made for ``mtl-train -m experiment=compare_architectures`` (one job per architecture), and
usable for a sweep over any other key. When the multirun ends, :class:`CompareCallback` (a Hydra
callback, registered by the experiment under ``hydra.callbacks``) prints the table and writes it
to the sweep directory as Markdown (``architectures.md``) and CSV (``architectures.csv``). The
same table can be rebuilt from a finished (or interrupted) sweep::

    python -m lightning_mtl.compare logs/compare_architectures/multiruns/<date_time> [--baseline hard]

What it reads, per job directory of the sweep (any folder holding ``.hydra/config.yaml``):

* ``.hydra/config.yaml``: ``model.architecture`` (a name, or a mapping with ``name``) and the
  order of the ``tasks``; ``.hydra/overrides.yaml``: the job's overrides;
* ``csv/metrics.csv`` (the CSV logger): the last non-empty value of every column, of which the
  table keeps ``test/<task>/<metric>`` (not the losses), ``model/params/total``,
  ``model/params/trainable``, ``model/flops_per_image`` (the model report, step 0) and
  ``perf/step_ms``, ``perf/samples_per_s`` (the step timer, last epoch).

``multirun.yaml`` in the sweep directory says which jobs the basic sweeper was to launch, so a
job that never started (the sweep was killed) is listed too. A job without ``metrics.csv`` or
without test metrics is a row marked ``missing: <why>`` (with the job's error when the callback
saw it fail: it writes it to ``<job dir>/job_error.txt``), never dropped: a failed architecture
must not look like a shorter list.

Rows are labelled by architecture name when those are distinct; otherwise (a sweep over another
key, or two variants of one architecture) by the job's overrides that differ between jobs,
e.g. ``model.backbone.name=convnext_atto``. Step time is given in ms and relative to the
baseline row (``hard`` by default; without a ``hard`` row, the first row that has a step time).
The best value of each metric is marked, in the direction of :data:`HIGHER_IS_BETTER`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lightning_mtl.compare.runs import (
    DEFAULT_BASELINE,
    ERROR_FILE,
    Run,
    collect_runs,
    expected_jobs,
    is_test_metric,
    read_metrics,
    read_run,
)
from lightning_mtl.compare.table import (
    DEFAULT_NAME,
    HIGHER_IS_BETTER,
    Table,
    build_table,
    higher_is_better,
    read_table_csv,
    write_table,
)

log = logging.getLogger(__name__)

__all__ = [
    "ERROR_FILE",
    "HIGHER_IS_BETTER",
    "CompareCallback",
    "Run",
    "Table",
    "build_table",
    "collect_runs",
    "compare",
    "expected_jobs",
    "higher_is_better",
    "is_test_metric",
    "main",
    "read_metrics",
    "read_run",
    "read_table_csv",
    "write_table",
]


def compare(
    sweep_dir: Path | str,
    baseline: str | None = DEFAULT_BASELINE,
    name: str = DEFAULT_NAME,
    failures: Mapping[str, str] | None = None,
    strict: bool = False,
) -> Table:
    """Collect the sweep's runs, build the table, write it in the sweep directory, print it."""
    sweep_dir = Path(sweep_dir)
    table = build_table(collect_runs(sweep_dir, failures), baseline, strict=strict)
    markdown, table_csv = write_table(table, sweep_dir, name)
    print(f"\nComparison of {len(table.records)} runs in {sweep_dir}\n\n{table.markdown()}")
    print(f"written: {markdown}\n         {table_csv}", flush=True)
    return table


class CompareCallback(Callback):
    """Build, print and write the comparison table when a Hydra multirun ends.

    Registered in an experiment under ``hydra.callbacks`` (``configs/experiment/
    compare_architectures.yaml``). Hydra's basic sweeper raises after its jobs when one of them
    failed, and then never calls ``on_multirun_end``: so the table is also made at the end of
    the last job the sweep launches (whatever its outcome), with each failed job's error.

    Args:
        name: the files' stem in the sweep directory (``<name>.md``, ``<name>.csv``).
        baseline: the row that step times are relative to (a run label, e.g. ``hard``).
    """

    def __init__(self, name: str = DEFAULT_NAME, baseline: str | None = DEFAULT_BASELINE) -> None:
        self.name = name
        self.baseline = baseline
        #: job directory -> the error it failed with
        self.failures: dict[str, str] = {}
        self._done: set[str] = set()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        log.warning(
            "%s: this is a single run (one job, no table); compare with a multirun: "
            "mtl-train -m experiment=...",
            type(self).__name__,
        )

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        job_dir = str(OmegaConf.select(config, "hydra.runtime.output_dir", default=""))
        if getattr(job_return, "status", None) == JobStatus.FAILED:
            error = getattr(job_return, "_return_value", None)
            message = " ".join(f"{type(error).__name__}: {error}".split())  # one line
            message = message if len(message) <= 300 else message[:299] + "…"
            self.failures[job_dir] = message
            if job_dir and Path(job_dir).is_dir():  # for the CLI's later rebuilds of the table
                with contextlib.suppress(OSError):
                    (Path(job_dir) / ERROR_FILE).write_text(message + "\n")
        sweep_dir = Path(str(config.hydra.sweep.dir))
        expected = expected_jobs(sweep_dir)
        number = OmegaConf.select(config, "hydra.job.num", default=None)
        if expected is not None and number is not None and int(number) == len(expected) - 1:
            self._report(sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if str(sweep_dir) not in self._done:
            self._report(sweep_dir)

    def _report(self, sweep_dir: Path) -> None:
        self._done.add(str(sweep_dir))
        try:
            compare(sweep_dir, self.baseline, self.name, self.failures)
        except Exception:  # the comparison must not hide the sweep's own outcome
            log.exception("could not build the comparison table of %s", sweep_dir)


def _is_multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode", default=None) == RunMode.MULTIRUN


# ------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_mtl.compare",
        description="Rebuild the comparison table of a finished (or interrupted) Hydra multirun.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun's directory (hydra.sweep.dir)")
    parser.add_argument(
        "--baseline",
        default=None,
        help=f"the row step times are relative to (default: {DEFAULT_BASELINE} if present, "
        "else the first run with a step time)",
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help="stem of the .md and .csv files")
    args = parser.parse_args(argv)
    try:
        table = compare(
            args.sweep_dir,
            args.baseline or DEFAULT_BASELINE,
            args.name,
            strict=args.baseline is not None,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if not table.records else 0


if __name__ == "__main__":
    sys.exit(main())
