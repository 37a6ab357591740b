"""The template's CSV logger: Lightning's, except that a run resumed in its folder continues
its ``metrics.csv`` instead of deleting it.

Lightning's ``CSVLogger`` (2.6) removes an existing ``metrics.csv`` when it opens its folder
("Previous log files in this directory will be deleted"). A run resumed in its own folder
(``ckpt_path=last``, or a run folder) then lost everything logged before the checkpoint: the
curves, the gradient-cosine and affinity measurements, and the plots and results drawn from
them. This writer keeps the file: it takes over the file's columns, appends its rows, and when
new columns appear rewrites the file under the wider header (Lightning's own path for that).
The steps between the last checkpoint and a kill then appear twice; the readers keep the last
value of a step (:mod:`lightning_mtl.diagnostics.history`) or of a column
(:func:`lightning_mtl.compare.runs.read_metrics`).
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer that continues an existing ``metrics.csv``."""

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
            header = next(csv.reader(handle), [])
        self.metrics_keys = list(header)  # rows are appended under the file's own columns


class CSVLogger(LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` with :class:`AppendingExperimentWriter`."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        assert isinstance(self._experiment, ExperimentWriter)  # the writer made above
        return self._experiment
