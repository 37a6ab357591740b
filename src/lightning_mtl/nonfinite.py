"""NaN or inf in training: one policy for every balancer (``model.nonfinite_loss``).

A task's loss that is NaN or ±inf (a NaN label, an overflowing head, a log of zero) is found in
``MultiTaskModule.training_step`` **before the balancer runs**, so no balancer ever sees one:

* ``skip_step`` (default): the step is skipped for every parameter. The balancer is not called;
  ``training_step`` returns a zero whose (zero) gradient reaches every parameter from the
  parameters themselves, never through a NaN activation (returning ``None``, Lightning's way to
  skip a backward, is refused under DDP, and DDP needs every parameter's gradient); then
  ``MultiTaskModule.optimizer_step`` calls neither the optimizer nor the fp16 GradScaler (no
  update, weight decay, momentum/Adam state or scale change), and
  :class:`~lightning_mtl.callbacks.nonfinite.NonFiniteGuard` drops the gradients and restores
  the balancer's state and the network's buffers (batch-norm statistics) as they were at the
  start of the optimizer step's window.
* ``drop_task``: the offending tasks are left out of that step as tasks with no labelled sample
  are; the others train. Their outputs are not touched (``0 · NaN`` is NaN): a zero term over
  the parameters themselves gives every parameter its (zero) gradient for DDP.

Under DDP one all-reduce of 2k numbers per step (only when ``world_size > 1``) makes every rank
take the same decision (skip, or drop the same tasks), so the ranks' weights stay identical. With gradient
accumulation the whole window of micro-batches is skipped. A non-finite gradient from finite
losses (an overflow in fp32/bf16) skips the step the same way; under the fp16 GradScaler the
scaler skips it and :class:`~lightning_mtl.callbacks.balancer_rollback.BalancerRollback` restores
the balancer. Each event is logged (a warning naming the tasks and the step, the counter
``train/nonfinite_steps``), and ``max_consecutive`` bad steps in a row stop the run with
:class:`NonFiniteError`; so does any non-finite parameter at the end of training or before a test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_mtl.errors import ConfigError, TrainingError

POLICIES = ("skip_step", "drop_task")
KEY = "model.nonfinite_loss"


class NonFiniteError(TrainingError):
    """Training stopped: non-finite losses or gradients ``max_consecutive`` steps in a row, or
    non-finite weights where a run would otherwise save or test them."""


@dataclass(frozen=True)
class NonFinitePolicy:
    """``model.nonfinite_loss``: what a step with a NaN/inf loss does, and when to give up."""

    policy: str = "skip_step"
    max_consecutive: int = 5

    @classmethod
    def parse(cls, value: Mapping[str, Any] | None) -> NonFinitePolicy:
        """The policy of a config mapping (None: the defaults); a bad key or value raises
        :class:`~lightning_mtl.errors.ConfigError` naming it and what is accepted."""
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{KEY}={value!r}; expected a mapping {{policy: skip_step|drop_task, "
                "max_consecutive: <int >= 1>}"
            )
        unknown = sorted(set(map(str, value)) - {"policy", "max_consecutive"})
        if unknown:
            raise ConfigError(f"{KEY} has unknown keys {unknown}; known: policy, max_consecutive")
        policy = value.get("policy", cls.policy)
        if policy not in POLICIES:
            raise ConfigError(f"{KEY}.policy={policy!r}; accepted values: {', '.join(POLICIES)}")
        count = value.get("max_consecutive", cls.max_consecutive)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(
                f"{KEY}.max_consecutive={count!r}; expected an integer >= 1 (the number of bad "
                "steps in a row that stops training)"
            )
        return cls(str(policy), int(count))


@dataclass(frozen=True)
class LossCheck:
    """The tasks whose loss is non-finite (on this rank, or under DDP on any rank), and whether
    some task is left to train when they are dropped (on any rank)."""

    bad: tuple[str, ...] = ()
    trainable: bool = True


def check_losses(
    losses: Mapping[str, torch.Tensor],
    tasks: list[str],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> LossCheck:
    """Which tasks of ``losses`` are NaN/±inf: one host sync, and under DDP (``all_reduce``
    given) one all-reduce of 2k numbers so that every rank gets the same answer."""
    names = [task for task in tasks if task in losses]
    if all_reduce is None:
        if not names:
            return LossCheck()
        finite = torch.isfinite(torch.stack([losses[n].detach().float() for n in names]))
        bad = tuple(n for n, ok in zip(names, finite.tolist(), strict=True) if not ok)
        return LossCheck(bad, trainable=len(bad) < len(names))
    stats = torch.zeros(2, len(tasks), device=device)
    if names:
        index = torch.tensor([tasks.index(n) for n in names], device=stats.device)
        values = torch.stack([losses[n].detach().float() for n in names]).to(stats.device)
        stats[0, index] = (~torch.isfinite(values)).float()
        stats[1, index] = 1.0
    bad_any, labelled = (row > 0 for row in all_reduce(stats))
    bad = tuple(t for t, flag in zip(tasks, bad_any.tolist(), strict=True) if flag)
    return LossCheck(bad, trainable=bool((labelled & ~bad_any).any()) if bad else True)


def parameter_zero_term(module: nn.Module) -> torch.Tensor:
    """Zero, with a zero gradient for every trainable parameter of ``module``, read from the
    parameters themselves and not from any activation (an activation of a dropped task may be
    NaN, and ``0 · NaN`` is NaN): DDP gets a gradient for every parameter."""
    params = [p for p in module.parameters() if p.requires_grad]
    total = torch.zeros((), device=params[0].device if params else None)
    for parameter in params:
        total = total + parameter.sum().float() * 0.0
    return total


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int, int]]:
    """``(name, non-finite count, size)`` of each floating-point tensor holding NaN or ±inf
    (one host sync for all of them)."""
    chosen = [(name, t.detach()) for name, t in named if t.is_floating_point() and t.numel()]
    if not chosen:
        return []
    counts = torch.stack([(~torch.isfinite(t)).sum() for _, t in chosen]).tolist()
    return [(n, c, t.numel()) for (n, t), c in zip(chosen, counts, strict=True) if c]


def check_weights(
    module: nn.Module, when: str, buffers: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Raise :class:`NonFiniteError` naming every parameter of ``module`` (and every tensor of
    ``buffers``) holding NaN or inf, so a run never saves or tests such weights as a result."""
    found = nonfinite_tensors([*module.named_parameters(), *buffers])
    if not found:
        return
    listed = ", ".join(f"{name} ({count} of {size} values)" for name, count, size in found[:10])
    more = f" and {len(found) - 10} more" if len(found) > 10 else ""
    raise NonFiniteError(
        f"non-finite (NaN/inf) weights {when}: {listed}{more}. The run is stopped rather than "
        f"tested or reported with them; see {KEY} (policy, max_consecutive), the learning rate "
        "and the data of the tasks logged as non-finite."
    )
