"""Weights & Biases for the template: Lightning's ``WandbLogger`` plus what a multi-task run needs.

``logger=wandb`` (``configs/logger/wandb.yaml``) builds :class:`WandbLogger` (beside the CSV
logger) and the :class:`WandbRun` callback. What they add to Lightning's logger:

* **One W&B run per training, across resumes.** The run id is chosen before ``wandb.init`` and
  kept with the run: in ``<run dir>/wandb_run.json`` (written when the W&B run starts) and in
  every checkpoint (the callback's state). A training resumed from a checkpoint
  (``ckpt_path=<run>``, ``<run>/checkpoints/last.ckpt``, ``last``) passes that id to W&B with
  ``resume="allow"``, online and offline alike; an explicit ``logger.wandb.id`` (or
  ``$WANDB_RUN_ID``) wins. :func:`resumed_run_id` says where an id comes from.
* **Never a hang, never a crash for want of a network.** With no API key and a mode that is not
  offline the run goes offline at once; an online start that fails (no network, an unreachable
  server, a bad key) is given ``init_timeout`` seconds and then retried offline, with the same
  id, and a warning that says how to upload later (``wandb sync``). Checkpoint artifacts
  (``log_model``) are turned off with a warning in offline runs (Lightning raises instead).
* **What the run is.** The run's config gets ``run_info``: the git commit and whether the
  checkout was dirty, the host, the run folder, where the id came from, and (from the callback)
  the world size, devices, nodes, accelerator, strategy and precision. The whole resolved
  config comes from ``log_hyperparameters`` as before; the tags are the config's ``tags``.
* **A panel section per task.** W&B groups panels by the part of a key before its first ``/``.
  :func:`wandb_key` renames the template's keys for W&B only (the CSV logger and
  ``trainer.callback_metrics`` keep theirs): ``val/<task>/<metric>`` -> ``<task>/val/<metric>``,
  ``train/weight/<task>`` -> ``weights/<task>``, ``train/grad_cos/<a>/<b>`` ->
  ``gradients/cos/<a>/<b>``, ... (``group_by_task=false`` keeps the keys). Step-level keys are
  drawn against ``trainer/global_step`` (Lightning's default); every ``val/`` and ``test/`` key
  against ``epoch`` (``define_metric``).
* **Charts of the whole run.** The task weights as one line chart (``weights/all_tasks``, all
  tasks in it; one more per meeting place of a per-place method), drawn from a history that the
  checkpoints carry, so a resumed run's chart starts at step 0; the final per-task test metrics
  as a table (``test/metrics``: task, source, metric, value).

The modules: :mod:`~lightning_mtl.wandb_tracking.keys` (the W&B names of the keys),
:mod:`~lightning_mtl.wandb_tracking.run_id` (the run id across resumes),
:mod:`~lightning_mtl.wandb_tracking.connection` (mode, API key, init timeout),
:mod:`~lightning_mtl.wandb_tracking.charts` (the weights' history, the charts and the table),
:mod:`~lightning_mtl.wandb_tracking.logger` (the logger) and
:mod:`~lightning_mtl.wandb_tracking.callback` (the callback). The package is not called
``wandb``: run as a script (``python src/lightning_mtl/train.py``), Python would find it in
place of the W&B library.
"""

from __future__ import annotations

from lightning_mtl.wandb_tracking.callback import WandbRun
from lightning_mtl.wandb_tracking.charts import SeriesHistory
from lightning_mtl.wandb_tracking.connection import has_credentials, requested_mode
from lightning_mtl.wandb_tracking.keys import metrics_table_rows, wandb_key
from lightning_mtl.wandb_tracking.logger import WandbLogger, wandb_loggers
from lightning_mtl.wandb_tracking.run_id import (
    RUN_FILE,
    STATE_KEY,
    new_run_id,
    read_run_file,
    resumed_checkpoint,
    resumed_run_id,
    run_id_in_checkpoint,
)

__all__ = [
    "RUN_FILE",
    "STATE_KEY",
    "SeriesHistory",
    "WandbLogger",
    "WandbRun",
    "has_credentials",
    "metrics_table_rows",
    "new_run_id",
    "read_run_file",
    "requested_mode",
    "resumed_checkpoint",
    "resumed_run_id",
    "run_id_in_checkpoint",
    "wandb_key",
    "wandb_loggers",
]
