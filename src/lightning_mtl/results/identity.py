"""What a finished run was: its identity in the results store, read from its composed config.

A run is compared with others through four fingerprints of its config, each a hash of a part of
the *unresolved* composed config (as Hydra saves it in ``.hydra/config.yaml``: ``${seed}`` stays
``${seed}``, so seeds never leak into the other fingerprints):

* ``config_hash``: the whole recipe (what trains and how). Left out: where files go and what is
  only watched or printed (``paths``, ``hydra``, ``logger``, ``callbacks``, ``extras``,
  ``preflight``, ``run_name``, ``tags``, ``ckpt_path``, ``train``/``test``,
  ``optimized_metric``, the data loaders' worker settings, the trainer's logging cadence),
  except what of those changes the results: ``paths.data_dir``, the metric the best checkpoint
  is chosen by (the test reads that checkpoint) and an early stop (:data:`KEPT_PATHS`);
* ``recipe_hash``: the same without ``seed``: the runs of one method that differ only by seed;
* ``setup_hash``: what a single-task baseline must share with a multi-task run to be its
  baseline: the data (its scenes and splits, not the sampling order), the backbone, the
  optimizer and schedule, the budget (epochs, steps, batches, accumulation, devices, precision),
  what is validated and tested, and the layer-wise training plan. Not the tasks, the architecture or the weighting;
* ``task_specs``: each task's own definition (target, head, loss, metrics; not its ``weight``):
  a baseline of ``depth`` must be the same ``depth`` task.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from lightning_mtl.compare.runs import architecture_name

#: top-level keys that say where outputs go or what is watched, not what trains
IGNORED_KEYS = (
    "paths",
    "hydra",
    "logger",
    "callbacks",
    "extras",
    "preflight",
    "results",
    "run_name",
    "tags",
    "ckpt_path",
    "train",
    "test",
    "optimized_metric",
)
#: what the ignored keys hold that does change the results: where the data is read from, which
#: checkpoint the test reads (the monitored metric) and an early stop
KEPT_PATHS = (
    "paths.data_dir",
    "callbacks.model_checkpoint.monitor",
    "callbacks.model_checkpoint.mode",
    "callbacks.early_stopping",
)
#: settings of how data is loaded (not which data) and of how often the trainer logs
IGNORED_PATHS = (
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.sampling_seed",
    "trainer.default_root_dir",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)
#: the parts of the recipe a baseline shares with the multi-task run it is compared with
SETUP_PATHS = (
    "data",
    "model.backbone",
    "model.optimizer",
    "model.scheduler",
    "model.scheduler_interval",
    "model.backbone_lr_scale",
    "model.layer_decay",
    "model.no_decay_norm_bias",
    "trainer.max_epochs",
    "trainer.min_epochs",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.limit_train_batches",
    "trainer.limit_val_batches",
    "trainer.limit_test_batches",
    "trainer.check_val_every_n_epoch",
    "trainer.accumulate_grad_batches",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.precision",
    "trainer.gradient_clip_val",
    "finetune",
    *KEPT_PATHS,
)
#: the budget, as shown when two setups differ in it
BUDGET_PATHS = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.limit_train_batches",
    "trainer.accumulate_grad_batches",
    "trainer.devices",
    "trainer.num_nodes",
    "data.batch_size",
    "data.train_size",
    "data.sampling.steps_per_epoch",
)
TASK_IGNORED = ("weight",)
#: the level of a method that reads only the losses
LOSS_LEVEL = "loss"


@dataclass
class RunRecord:
    """One finished run in the results store: its identity and its final metric values.

    ``values``: the last value of each metric the run logged, e.g. ``test/depth/abs_rel`` and
    ``perf/step_ms`` (the median training-step time of its last epoch).
    """

    run_dir: str
    experiment: str
    tasks: list[str]
    architecture: str
    weighting: str
    level: str
    seed: int | None
    git_commit: str
    config_hash: str
    recipe_hash: str
    setup_hash: str
    setup: dict[str, Any]
    task_specs: dict[str, str]
    recipe: dict[str, Any]
    values: dict[str, float] = field(default_factory=dict)
    recorded_at: str = ""

    @property
    def is_single_task(self) -> bool:
        return len(self.tasks) == 1

    @property
    def budget(self) -> dict[str, Any]:
        return {k: v for k, v in self.setup.items() if k in BUDGET_PATHS}


def record_from_config(
    cfg: DictConfig | Mapping[str, Any],
    run_dir: str | Path,
    values: Mapping[str, float],
    git_commit: str,
) -> RunRecord:
    """The :class:`RunRecord` of a run with the composed config ``cfg`` (unresolved, as Hydra
    saves it) and final ``values``."""
    container = _container(cfg)
    recipe = {
        k: v
        for k, v in flatten(container).items()
        if (k.split(".")[0] not in IGNORED_KEYS or _under(k, KEPT_PATHS))
        and not _under(k, IGNORED_PATHS)
    }
    without_seed = {k: v for k, v in recipe.items() if k != "seed"}
    setup = {k: v for k, v in without_seed.items() if _under(k, SETUP_PATHS)}
    tasks_block = container.get("tasks") or {}
    if not isinstance(tasks_block, Mapping) or not tasks_block:
        raise ValueError(f"{run_dir}: the config has no `tasks:` block")
    task_specs = {
        str(name): fingerprint({k: v for k, v in dict(spec).items() if k not in TASK_IGNORED})
        for name, spec in tasks_block.items()
    }
    model = container.get("model") or {}
    weighting = container.get("weighting") or {}
    seed = container.get("seed")
    return RunRecord(
        run_dir=str(run_dir),
        experiment=str(container.get("run_name") or ""),
        tasks=list(task_specs),
        architecture=architecture_name(model.get("architecture")) or "hard",
        weighting=str(weighting.get("name", "")),
        level=str(weighting.get("level") or LOSS_LEVEL),
        seed=int(seed) if isinstance(seed, int) else None,
        git_commit=git_commit,
        config_hash=fingerprint(recipe),
        recipe_hash=fingerprint(without_seed),
        setup_hash=fingerprint(setup),
        setup=setup,
        task_specs=task_specs,
        recipe=without_seed,
        values={k: float(v) for k, v in values.items()},
    )


def fingerprint(value: Any) -> str:
    """A short stable hash of a JSON-able value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: value}


UNSET = "(unset)"


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The flattened keys where ``a`` and ``b`` differ (a key only one of them has included),
    sorted."""
    return sorted(k for k in set(a) | set(b) if a.get(k, UNSET) != b.get(k, UNSET))


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """``key: a-value vs b-value`` for every flattened key where ``a`` and ``b`` differ."""
    return [
        f"{key}: {_show(a.get(key, UNSET))} vs {_show(b.get(key, UNSET))}"
        for key in differing_keys(a, b)
    ]


def git_commit(directory: str | Path) -> str:
    """The commit checked out in ``directory`` (``+dirty`` when tracked files changed);
    ``unknown`` outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def _container(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(cfg, resolve=False)
        assert isinstance(container, dict)
        return cast("dict[str, Any]", container)  # a run's config: string keys
    return dict(cfg)


def _under(key: str, paths: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in paths)


def _show(value: Any) -> str:
    return json.dumps(value, default=str) if not isinstance(value, str) else value
