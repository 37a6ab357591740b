"""Results you can compare: every finished run in one store, and the table across methods and
seeds with Δm against single-task baselines.

* :mod:`~lightning_mtl.results.identity`: what a run was (its fingerprints: recipe, setup, tasks);
* :mod:`~lightning_mtl.results.store`: the SQLite store (``logs/results.sqlite``);
* :mod:`~lightning_mtl.results.record`: adding a run, at the end of training or from its folder;
* :mod:`~lightning_mtl.results.delta_m`: Δm (Maninis et al. 2019, as Nash-MTL and FAMO report it);
* :mod:`~lightning_mtl.results.report`: the comparisons, as Markdown and CSV;
* :mod:`~lightning_mtl.results.cli`: ``mtl-report`` (table, add, plot).
"""

from lightning_mtl.results.delta_m import DeltaM, delta_m
from lightning_mtl.results.identity import RunRecord, record_from_config
from lightning_mtl.results.output import markdown, write_csv
from lightning_mtl.results.record import read_run_folder, record_run
from lightning_mtl.results.report import Comparison, build_report
from lightning_mtl.results.store import ResultsStore

__all__ = [
    "Comparison",
    "DeltaM",
    "ResultsStore",
    "RunRecord",
    "build_report",
    "delta_m",
    "markdown",
    "read_run_folder",
    "record_from_config",
    "record_run",
    "write_csv",
]
