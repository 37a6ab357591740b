"""The composed config checked against a table of key -> rule, before anything is built.

A wrong value (``data.batch_size=0``, a negative learning rate, ``trainer.precision=17``, a
dropout of 1.5) is found here, from the config alone, in milliseconds: it never reaches the data
module, the model or ``Trainer.fit``. A key in :data:`RULES` may hold ``*`` for any one key at
that level (``tasks.*.weight``); a key the config does not have is not checked (each group
brings its own keys). A rule is a small object whose :meth:`Rule.fails` returns what was
expected when a value breaks it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, get_args

from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_mtl.preflight.report import Problem


class Rule:
    """A constraint on one value: ``fails(value)`` is None when it holds, else what was expected."""

    def fails(self, value: Any) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Number(Rule):
    """A number (an int when ``integer``) within ``[low, high]``; ``open_low`` excludes ``low``."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    open_low: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left = "(" if self.open_low else "["
            return f"{kind} in {left}{_plain(self.low)}, {_plain(self.high)}]"
        if self.low is not None:
            return f"{kind} {'>' if self.open_low else '>='} {_plain(self.low)}"
        if self.high is not None:
            return f"{kind} <= {_plain(self.high)}"
        return kind

    def fails(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return self.describe()
        if self.integer and not isinstance(value, int):
            return self.describe()
        if not math.isfinite(value):
            return self.describe()
        too_low = self.low is not None and (
            value <= self.low if self.open_low else value < self.low
        )
        too_high = self.high is not None and value > self.high
        return self.describe() if too_low or too_high else None


@dataclass(frozen=True)
class OneOf(Rule):
    """One of a fixed set of values."""

    values: tuple[Any, ...]

    def fails(self, value: Any) -> str | None:
        if isinstance(value, bool) or value not in self.values:
            return "one of " + ", ".join(dict.fromkeys(str(v) for v in self.values))
        return None


@dataclass(frozen=True)
class Text(Rule):
    """A string matching ``pattern``; ``describe`` says what it is."""

    pattern: str
    describe: str

    def fails(self, value: Any) -> str | None:
        ok = isinstance(value, str) and re.fullmatch(self.pattern, value)
        return None if ok else self.describe


@dataclass(frozen=True)
class Boolean(Rule):
    def fails(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else "true or false"


@dataclass(frozen=True)
class ListOf(Rule):
    """A list whose items each follow ``item`` (and, with ``length``, that many of them)."""

    item: Rule
    length: int | None = None

    def fails(self, value: Any) -> str | None:
        wanted = f"a list of {self.length or ''} values, each {self._item()}".replace("  ", " ")
        if not isinstance(value, list | tuple):
            return wanted
        if self.length is not None and len(value) != self.length:
            return wanted
        return wanted if any(self.item.fails(v) for v in value) else None

    def _item(self) -> str:
        return self.item.describe() if isinstance(self.item, Number) else "valid"


@dataclass(frozen=True)
class AnyOf(Rule):
    """Any of several rules (``None`` passes when ``nullable``)."""

    rules: tuple[Rule, ...]
    nullable: bool = False

    def fails(self, value: Any) -> str | None:
        if value is None and self.nullable:
            return None
        failures = [r.fails(value) for r in self.rules]
        if all(failures):
            alternatives = [f for f in failures if f] + (["null"] if self.nullable else [])
            return " or ".join(alternatives)
        return None


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def optional(*rules: Rule) -> AnyOf:
    return AnyOf(rules, nullable=True)


POSITIVE_INT = Number(low=1, integer=True)
NON_NEGATIVE_INT = Number(low=0, integer=True)
PROBABILITY = Number(low=0, high=1)
POSITIVE = Number(low=0, open_low=True)
NON_NEGATIVE = Number(low=0)
IMAGE_SIZE = AnyOf((POSITIVE_INT, ListOf(POSITIVE_INT, length=2)))
# Lightning's own list of precision inputs (ints, aliases and the full names).
PRECISIONS = tuple(v for part in get_args(_PRECISION_INPUT) for v in get_args(part))
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
# The fraction or number of batches a trainer limit accepts.
BATCH_LIMIT = optional(NON_NEGATIVE_INT, PROBABILITY)

#: key -> rule; ``*`` matches any one key at its level.
RULES: dict[str, Rule] = {
    "seed": optional(Number(integer=True)),
    # data: the Shapes module, the merged one and its sources
    "data.batch_size": POSITIVE_INT,
    "data.num_workers": NON_NEGATIVE_INT,
    "data.train_size": POSITIVE_INT,
    "data.val_size": POSITIVE_INT,
    "data.test_size": POSITIVE_INT,
    "data.image_size": IMAGE_SIZE,
    "data.max_objects": POSITIVE_INT,
    "data.pin_memory": Boolean(),
    "data.persistent_workers": Boolean(),
    "data.sampling.strategy": OneOf(("proportional", "round_robin", "temperature")),
    "data.sampling.mixing": OneOf(("mixed", "homogeneous")),
    "data.sampling.tau": POSITIVE,
    "data.sampling.steps_per_epoch": optional(POSITIVE_INT),
    "data.sampling.drop_last": Boolean(),
    "data.on_bad_sample": OneOf(("raise", "skip")),
    "data.max_bad_fraction": PROBABILITY,
    "data.sources.*.image_size": optional(IMAGE_SIZE, OneOf(("backbone",))),
    "data.sources.*.dataset.image_size": optional(IMAGE_SIZE, OneOf(("backbone",))),
    "data.sources.*.split_fractions": ListOf(PROBABILITY, length=3),
    "data.sources.*.sizes.*": POSITIVE_INT,
    "data.sources.*.num_classes": POSITIVE_INT,
    "data.sources.*.augment": Boolean(),
    # model
    "model.optimizer.lr": POSITIVE,
    "model.optimizer.weight_decay": NON_NEGATIVE,
    "model.backbone_lr_scale": NON_NEGATIVE,
    "model.layer_decay": Number(low=0, high=1, open_low=True),
    "model.scheduler_interval": OneOf(("step", "epoch")),
    "model.scheduler.warmup_fraction": PROBABILITY,
    "model.scheduler.min_lr_ratio": PROBABILITY,
    "model.backbone.drop_path_rate": PROBABILITY,
    "model.backbone.in_chans": POSITIVE_INT,
    "model.optimizer_impl": OneOf(("auto", "fused", "foreach", "single")),
    # tasks
    "tasks.*.weight": NON_NEGATIVE,
    "tasks.*.head.num_classes": POSITIVE_INT,
    "tasks.*.head.num_labels": POSITIVE_INT,
    "tasks.*.head.out_dim": POSITIVE_INT,
    "tasks.*.head.out_channels": POSITIVE_INT,
    "tasks.*.head.dropout": PROBABILITY,
    "tasks.*.loss.label_smoothing": PROBABILITY,
    # weighting
    "weighting.update_every": POSITIVE_INT,
    "weighting.jacobian_budget_mb": NON_NEGATIVE,
    # trainer
    "trainer.max_epochs": optional(Number(low=-1, integer=True)),
    "trainer.min_epochs": optional(NON_NEGATIVE_INT),
    "trainer.max_steps": Number(low=-1, integer=True),
    "trainer.devices": AnyOf(
        (
            Number(low=1, integer=True),
            OneOf((-1, "-1", "auto")),
            ListOf(NON_NEGATIVE_INT),
            Text(r"\d+(,\d+)*,?", "device ids such as '0,1'"),
        )
    ),
    "trainer.num_nodes": POSITIVE_INT,
    "trainer.precision": optional(OneOf(PRECISIONS)),  # null: a precision plugin decides
    "trainer.accelerator": OneOf(ACCELERATORS),
    "trainer.accumulate_grad_batches": POSITIVE_INT,
    "trainer.check_val_every_n_epoch": optional(POSITIVE_INT),
    "trainer.log_every_n_steps": NON_NEGATIVE_INT,
    "trainer.gradient_clip_val": optional(NON_NEGATIVE),
    "trainer.limit_train_batches": BATCH_LIMIT,
    "trainer.limit_val_batches": BATCH_LIMIT,
    "trainer.limit_test_batches": BATCH_LIMIT,
    "trainer.overfit_batches": AnyOf((NON_NEGATIVE_INT, PROBABILITY)),
    "trainer.fast_dev_run": AnyOf((Boolean(), NON_NEGATIVE_INT)),
    "trainer.num_sanity_val_steps": Number(low=-1, integer=True),
    "trainer.deterministic": optional(Boolean(), OneOf(("warn",))),
    # the pre-flight check's own options
    "preflight.mode": OneOf(("fast", "exhaustive", "skip")),
    "preflight.max_samples": POSITIVE_INT,
    "preflight.max_files": POSITIVE_INT,
    "preflight.progress": Boolean(),
}


def expand(cfg: DictConfig, pattern: str) -> Iterator[str]:
    """The keys of ``cfg`` that ``pattern`` names (``*`` takes every key at its level)."""
    head, _, rest = pattern.partition(".")
    if head == "*":
        keys = list(cfg.keys()) if isinstance(cfg, DictConfig) else []
    else:
        keys = [head] if isinstance(cfg, DictConfig) and head in cfg else []
    for key in keys:
        if not rest:
            yield str(key)
            continue
        try:
            child = cfg.get(key)
        except OmegaConfBaseException:  # an unresolvable level: its leaves report it
            continue
        if isinstance(child, DictConfig):
            yield from (f"{key!s}.{sub}" for sub in expand(child, rest))


def schema_problems(cfg: DictConfig, rules: dict[str, Rule] | None = None) -> list[Problem]:
    """Every value of ``cfg`` that breaks its rule in ``rules`` (default :data:`RULES`)."""
    problems = []
    for pattern, rule in (RULES if rules is None else rules).items():
        for key in expand(cfg, pattern):
            try:
                value = OmegaConf.select(cfg, key, throw_on_missing=True)
            except OmegaConfBaseException as error:
                problems.append(Problem(key, f"cannot be read ({error})", "a value"))
                continue
            if isinstance(value, DictConfig | ListConfig):
                value = OmegaConf.to_container(value, resolve=True)
            expected = rule.fails(value)
            if expected:
                problems.append(Problem(key, f"{value!r}", expected))
    return problems
