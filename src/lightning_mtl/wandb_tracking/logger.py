"""The template's W&B logger: Lightning's ``WandbLogger`` with a run id kept across resumes, an
offline fallback, run information, a panel section per task, epoch axes for validation and test,
and the task weights chart and test table (:mod:`lightning_mtl.wandb_tracking`)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, cast

import lightning as L
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from lightning_mtl.errors import ConfigError
from lightning_mtl.wandb_tracking.charts import RunCharts
from lightning_mtl.wandb_tracking.connection import (
    OFFLINE_MODES,
    Mode,
    has_credentials,
    refuse_artifacts,
    requested_mode,
    settings_with_timeout,
)
from lightning_mtl.wandb_tracking.keys import EPOCH_SPLITS, TEST_TABLE, wandb_key
from lightning_mtl.wandb_tracking.run_id import (
    new_run_id,
    resumed_checkpoint,
    run_id_from,
    write_run_file,
)

log = logging.getLogger(__name__)


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` with a run id kept across resumes, an offline fallback, run
    information, a panel section per task, epoch axes for validation and test, and the task
    weights chart and test table (see :mod:`lightning_mtl.wandb_tracking`).

    Args (beyond Lightning's, which keep their meaning; ``**kwargs`` go to ``wandb.init``):
        tasks: the task names (``${oc.dict.keys:tasks}``); learnt from the logged config and the
            module too.
        group_by_task: rename keys for W&B so that each task has its panel section
            (:func:`wandb_key`); false: the template's own keys.
        ckpt_path: the entry point's ``ckpt_path``; with ``training`` it decides whether this
            run continues an earlier W&B run (:func:`resumed_run_id`).
        training: whether the entry point trains (``train``); evaluations never resume.
        init_timeout: seconds ``wandb.init`` may take online before the run goes offline.
        offline_fallback: go offline (with a warning) rather than fail when W&B cannot start
            online; false: W&B's error stops the run.
        git_dir: the checkout whose commit goes into ``run_info`` (``paths.root_dir``).
    """

    #: the ids of the runs that loggers of this class started in this process (to finish them)
    _started: set[str] = set()

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | Path = ".",
        version: str | None = None,
        offline: bool = False,
        id: str | None = None,
        project: str | None = None,
        log_model: Literal["all"] | bool = False,
        *,
        tasks: Iterable[str] | None = None,
        group_by_task: bool = True,
        ckpt_path: Any = None,
        training: bool = False,
        init_timeout: float = 20.0,
        offline_fallback: bool = True,
        git_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        if init_timeout is None or not float(init_timeout) > 0:
            raise ConfigError(
                f"logger.wandb.init_timeout={init_timeout!r}: expected a number of seconds > 0"
            )
        mode = requested_mode(offline, kwargs.get("mode"))
        if log_model and mode in OFFLINE_MODES:
            refuse_artifacts(log_model, f"W&B runs offline (mode {mode})")
            log_model = False
        resumed = resumed_checkpoint(ckpt_path, save_dir) if training else None
        explicit = version or id or os.environ.get("WANDB_RUN_ID")
        if explicit:
            run_id, source = str(explicit), "given (logger.wandb.id or $WANDB_RUN_ID)"
        else:
            found, source = run_id_from(resumed, save_dir)
            run_id = found or new_run_id()
        super().__init__(
            name=name,
            save_dir=save_dir,
            offline=False,  # the mode goes to wandb.init (Lightning would set $WANDB_MODE)
            id=run_id,
            project=project or os.environ.get("WANDB_PROJECT", "lightning-mtl"),
            log_model=log_model,
            **kwargs,
        )
        self._mode = mode
        self._id_source = source
        self._resumed_from = None if resumed is None else str(resumed)
        self._init_timeout = float(init_timeout)
        self._offline_fallback = bool(offline_fallback)
        self._git_dir = git_dir
        self._group_by_task = bool(group_by_task)
        self.tasks: list[str] = []
        self.add_tasks(tasks or [])
        self.run_info: dict[str, Any] = {}
        self._axes: set[str] = set()
        self.charts = RunCharts()

    # ---------------------------------------------------------------------------- the run
    @property
    def run_id(self) -> str | None:
        """The W&B run id (the one chosen, before the run starts)."""
        return self._experiment.id if self._experiment is not None else self._id

    @property
    def mode(self) -> str:
        """The mode the run has (``online``, ``offline``, ``disabled``; after a fallback
        ``offline``), or the one asked for before it starts."""
        return self._mode

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The W&B run, started on first use (see :meth:`_start`)."""
        if self._experiment is None:
            self._experiment = self._start()
        return self._experiment

    def _start(self) -> Any:
        """``wandb.init`` in the mode asked for, offline when that cannot work (no key, no
        network), then the axes, the run information and the run file."""
        import wandb

        attach_id = getattr(self, "_attach_id", None)
        if attach_id is not None and hasattr(wandb, "_attach"):
            # a worker that ``ddp_spawn`` started: the main process's run (Lightning's pickling)
            return wandb._attach(attach_id)
        previous = wandb.run
        if previous is not None and previous.id in WandbLogger._started:
            log.info("W&B: finishing the run %s of an earlier training", previous.id)
            previous.finish()
            previous = None
        if previous is not None:
            log.warning(
                "W&B: a run started outside the template is in progress: logging to it (%s), "
                "not to %s. Call wandb.finish() before training to get a run of its own.",
                previous.id,
                self._id,
            )
            run = previous
        else:
            run = self._init()
        WandbLogger._started.add(run.id)
        if getattr(run, "define_metric", None) is not None:
            run.define_metric("trainer/global_step")
            run.define_metric("epoch")
            run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        self._describe_run(run)
        write_run_file(self._save_dir, run, self._mode)
        log.info(
            "W&B run %s (%s, id: %s) in %s",
            run.id,
            self._mode,
            self._id_source,
            Path(run.dir).parent if self._mode != "disabled" else "-",
        )
        return run

    def _init(self) -> Any:
        import wandb

        arguments = dict(self._wandb_init)
        arguments.pop("mode", None)
        if arguments.get("anonymous") is None:  # W&B warns about the setting even when None
            arguments.pop("anonymous", None)
        settings = settings_with_timeout(arguments.pop("settings", None), self._init_timeout)
        mode = self._mode
        if mode not in (*OFFLINE_MODES, "disabled") and not has_credentials():
            log.warning(
                "W&B: no API key (set WANDB_API_KEY or run `wandb login`): this run logs "
                "offline to %s; upload it later with `wandb sync %s`",
                self._offline_dirs_hint(),
                self._offline_dirs_hint(),
            )
            mode = self._go_offline("no API key")
        try:
            return wandb.init(**arguments, mode=cast(Mode, mode), settings=settings)
        except (wandb.errors.Error, TimeoutError, OSError) as error:
            if mode in OFFLINE_MODES or mode == "disabled" or not self._offline_fallback:
                raise
            first_line = (str(error).splitlines() or [repr(error)])[0]
            log.warning(
                "W&B: could not start the run online (%s: %s); logging offline to %s instead "
                "(same run id %s). Upload it later with `wandb sync %s`; "
                "logger.wandb.init_timeout (now %g s) sets how long the start may take.",
                type(error).__name__,
                first_line,
                self._offline_dirs_hint(),
                self._id,
                self._offline_dirs_hint(),
                self._init_timeout,
            )
            mode = self._go_offline("online start failed")
            # W&B's service still holds the failed run's id ("run ID ... is in use"): a fresh
            # service (no run of ours is active: wandb.run was None) takes the same id offline
            wandb.teardown()
            return wandb.init(**arguments, mode=cast(Mode, mode), settings=settings)

    def _go_offline(self, why: str) -> str:
        if self._log_model:
            refuse_artifacts(self._log_model, f"W&B went offline ({why})")
            self._log_model = False
        self._mode = "offline"
        return "offline"

    def _offline_dirs_hint(self) -> str:
        return str(Path(self._save_dir or ".") / "wandb" / "offline-run-*")

    def _describe_run(self, run: Any) -> None:
        """``run_info`` in the run's config: commit, host, folder, where the id came from."""
        from lightning_mtl.results.identity import git_commit

        commit = git_commit(self._git_dir or os.getcwd())
        self.run_info.update(
            {
                "git_commit": commit.removesuffix("+dirty"),
                "git_dirty": commit.endswith("+dirty"),
                "host": socket.gethostname(),
                "run_dir": str(Path(self._save_dir or ".").resolve()),
                "run_id_from": self._id_source,
                "resumed_from": self._resumed_from,  # the checkpoint file, when resuming
                "mode": self._mode,
            }
        )
        run.config.update({"run_info": dict(self.run_info)}, allow_val_change=True)

    @rank_zero_only
    def describe_trainer(self, trainer: L.Trainer) -> None:
        """Add the trainer's world size, devices, nodes, accelerator, strategy and precision to
        ``run_info`` (the :class:`WandbRun` callback calls this when a stage starts)."""
        self.run_info.update(
            {
                "world_size": trainer.world_size,
                "devices": trainer.num_devices,
                "num_nodes": trainer.num_nodes,
                "accelerator": type(trainer.accelerator).__name__,
                "strategy": type(trainer.strategy).__name__,
                "precision": str(trainer.precision),
            }
        )
        self.experiment.config.update({"run_info": dict(self.run_info)}, allow_val_change=True)

    def finish(self) -> None:
        """Finish the W&B run now (uploads what is left); a later use starts a new one."""
        if self._experiment is not None and hasattr(self._experiment, "finish"):
            self._experiment.finish()
        self._experiment = None

    # ------------------------------------------------------------------------- the tasks
    def add_tasks(self, names: Iterable[str]) -> None:
        """Names to treat as tasks in :func:`wandb_key` (added to those known)."""
        for name in names:
            if str(name) not in self.tasks:
                self.tasks.append(str(name))

    def key(self, key: str) -> str:
        """The W&B name of ``key`` (:func:`wandb_key`; unchanged with ``group_by_task=false``)."""
        return wandb_key(key, self.tasks or None) if self._group_by_task else key

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        super().log_hyperparams(params)
        tasks = params.get("tasks") if isinstance(params, Mapping) else None
        if isinstance(tasks, Mapping):
            self.add_tasks(tasks)

    # ----------------------------------------------------------------------- the metrics
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.charts.observe(metrics, step)
        renamed = {self.key(k): v for k, v in metrics.items()}
        self._define_axes(metrics)
        super().log_metrics(renamed, step)

    def _define_axes(self, metrics: Mapping[str, Any]) -> None:
        """``define_metric(step_metric="epoch")`` for each new ``val/`` and ``test/`` key (the
        rest keep Lightning's ``trainer/global_step``)."""
        new = [k for k in metrics if k.split("/")[0] in EPOCH_SPLITS and k not in self._axes]
        if not new:
            return
        run = self.experiment
        for key in new:
            self._axes.add(key)
            name = self._prefixed(self.key(key))
            if getattr(run, "define_metric", None) is not None:
                run.define_metric(name, step_metric="epoch", step_sync=True)

    def _prefixed(self, key: str) -> str:
        """``key`` under the logger's ``prefix`` (Lightning's rule), as W&B receives it."""
        return f"{self._prefix}{self.LOGGER_JOIN_CHAR}{key}" if self._prefix else key

    @rank_zero_only
    def log_weight_charts(self) -> None:
        """The task weights as line charts, all tasks in one: ``weights/all_tasks`` (and
        ``weights/<place>/all_tasks`` for a method that weighs each meeting place); drawn again
        only when new weights came since the last drawing."""
        for name, chart in self.charts.new_weight_charts():
            self.experiment.log({self._prefixed(name): chart})
        self.charts.weights_drawn()

    @rank_zero_only
    def log_test_table(self) -> None:
        """The test metrics logged since the last table as a W&B Table ``test/metrics`` with
        the columns task, source (``all``, or a source of merged data), metric and value."""
        table = self.charts.new_test_table(self.tasks or None)
        if table is not None:
            self.experiment.log({self._prefixed(TEST_TABLE): table})

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """End of a stage (Lightning calls this after fit and after test): the checkpoint
        artifacts (Lightning's), then the weight charts and the test table."""
        super().finalize(status)
        if self._experiment is None:
            return
        try:
            self.log_weight_charts()
            self.log_test_table()
        except Exception as error:  # a chart must not fail a finished stage
            log.warning("W&B: logging the charts failed: %r", error)

    # ------------------------------------------------------------------ checkpoint state
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the run id and the task weights' history."""
        return {"run_id": self.run_id, "weights": self.charts.state()}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take the weights' history of a checkpoint when resuming (:meth:`RunCharts.restore`)."""
        if not state:
            return
        stored_id = state.get("run_id")
        if stored_id and self._experiment is not None and stored_id != self._experiment.id:
            log.info(
                "W&B: the checkpoint was written by run %s; logging to %s (%s)",
                stored_id,
                self._experiment.id,
                self._id_source,
            )
        self.charts.restore(state.get("weights") or {})


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    """The trainer's loggers of this module's class."""
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
