"""Layer-wise training: freeze the backbone (or its first stages) and unfreeze it gradually.

Selected from the command line with ``finetune=frozen`` or ``finetune=gradual``
(``configs/finetune/``); ``train.py`` adds the callback to the others.

**Stages.** A stage is an entry of ``architecture.stage_parameters()``: the backbone-derived
parameters stage by stage, bottom-up (stage 0 is the stem or patch embedding), the copies of a
stage in branches, experts or columns included. Freezing ``N`` stages freezes stages
``0 .. N-1`` everywhere they occur; the architecture's new layers and the heads always train.

**When.** Freezing happens in ``setup``, before ``configure_optimizers``: the optimizer is built
over the trainable parameters only. Gradual unfreezing then makes the *top* frozen stage
trainable first (the trainable depth grows downwards), ``stages_per_unfreeze`` stages at each
event, at ``start``, ``start + every``, ... epochs (``interval: epoch``, at the start of the
epoch) or optimizer steps (``interval: step``, before the first micro-batch of that step).

**The optimizer.** A stage that becomes trainable enters the one optimizer as new parameter
group(s) built by :func:`lightning_mtl.optim.stage_groups`, so it trains with the rules of the
groups present from the start (``lr · backbone_lr_scale · layer_decay^(S-1-s)``, and no weight
decay on biases and norms with ``model.no_decay_norm_bias``). With ``warmup_steps > 0`` the new groups carry ``warmup_start``
(the LR scheduler's step counter when they enter) and ``warmup_steps``:
:class:`lightning_mtl.schedules.WarmupCosine` ramps their LR linearly from 0 over that many
*scheduler* steps, which are optimizer steps with ``model.scheduler_interval=step`` (the
default) and epochs with ``model.scheduler_interval=epoch``.

**Resume.** Lightning restores the optimizer's state dict after ``configure_optimizers`` and
``on_fit_start``, and it needs the same parameter groups. The callback's state (in every
checkpoint) lists the stages it unfroze and the groups it added, by parameter name; a resumed
run makes those stages trainable again and re-adds the same groups in ``on_fit_start``, so it
continues exactly like an uninterrupted run (requires_grad flags, groups, their LRs and
warm-up). Lightning's ``BaseFinetuning`` restores the groups but not ``requires_grad`` (the
unfrozen modules silently stay frozen after a resume), and it matches parameters to the
optimizer's by value (``torch.equal``) where identity is meant; hence a callback of its own.

**Batch norm.** A batch-norm layer whose parameters are all frozen runs in eval mode while the
rest trains (a frozen pretrained stage keeps its running statistics: ``Architecture.train``,
applied by the module when training starts); it goes back to train mode when its stage is
unfrozen. Lightning restores each module's mode after validation, so these modes hold.

**DDP.** ``DistributedDataParallel`` synchronises only the parameters that required grad when
it wrapped the model. The gradients of stages unfrozen later are averaged across ranks here,
after every backward pass (before AMP's unscaling, so an overflow reaches every rank).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_mtl.callbacks.unfreeze_plan import KEY, UnfreezePlan
from lightning_mtl.errors import ConfigError
from lightning_mtl.optim import group_rules, parameters_in, stage_groups
from lightning_mtl.schedules import WarmupCosine

if TYPE_CHECKING:  # the module imports the callbacks
    from lightning_mtl.module import MultiTaskModule

log = logging.getLogger(__name__)


class LayerwiseTraining(L.Callback):
    """Freeze backbone stages before training and, optionally, unfreeze them on a schedule.

    Args:
        freeze: ``"all"`` (the whole backbone) or the number of bottom stages to freeze.
        unfreeze: unfreeze the frozen stages gradually (``finetune=gradual``); False keeps them
            frozen for the whole run (``finetune=frozen``).
        interval: ``"epoch"`` or ``"step"``: what ``start`` and ``every`` count.
        start: the epoch (or optimizer step) of the first unfreezing.
        every: epochs (or steps) between two unfreezings.
        stages_per_unfreeze: stages made trainable at each unfreezing.
        keep_frozen: bottom stages that stay frozen for the whole run (e.g. 1: the stem).
        warmup_steps: a newly trainable stage's LR ramps from 0 over this many scheduler steps
            (needs ``WarmupCosine``, the default scheduler); 0: it enters at its full LR.
    """

    def __init__(
        self,
        freeze: int | str = "all",
        unfreeze: bool = False,
        interval: str = "epoch",
        start: int = 1,
        every: int = 1,
        stages_per_unfreeze: int = 1,
        keep_frozen: int = 0,
        warmup_steps: int = 0,
    ) -> None:
        # Checked in `setup` (against the architecture), where a ConfigError stops the run
        # before training; Hydra would wrap an exception raised here in its own type.
        self.plan = UnfreezePlan(
            freeze=freeze,
            unfreeze=unfreeze,
            interval=interval,
            start=start,
            every=every,
            stages_per_unfreeze=stages_per_unfreeze,
            keep_frozen=keep_frozen,
            warmup_steps=warmup_steps,
        )
        #: each unfreezing so far: {"stages", "groups": [{"name", "params": [names]}], "at"}
        self.events: list[dict[str, Any]] = []
        self._restored: dict[str, Any] | None = None
        self._late: list[nn.Parameter] = []  # unfrozen after DDP wrapped the model
        self._ddp = False

    # ------------------------------------------------------------------------------- the plan
    @property
    def unfrozen(self) -> list[int]:
        """The stages unfrozen so far, in order."""
        return [s for event in self.events for s in event["stages"]]

    # ---------------------------------------------------------------------------- the hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Validate, then freeze (before ``configure_optimizers`` builds the groups)."""
        if stage != "fit":
            return
        architecture = _architecture(pl_module)
        stages = architecture.stage_parameters()
        backbone = getattr(architecture, "backbone", None)
        staged = bool(getattr(backbone, "staged", True))
        name = f"model.backbone.name={getattr(backbone, 'name', '?')!r}"
        count = self.plan.check(len(stages), staged, name)
        if self.plan.unfreeze and getattr(architecture, "freeze_base", False):
            raise ConfigError(
                f"{KEY}=gradual would unfreeze the base weights that model.architecture "
                f"({architecture.name}) keeps frozen (freeze_base: true), and no meeting place "
                "would balance them. Use finetune=frozen, or freeze_base: false (the base weights "
                "then meet at level=params)"
            )
        if self.plan.unfreeze and count > self.plan.keep_frozen:
            _check_strategy(trainer)
        self.events = []
        for s in self.plan.frozen:
            for param in stages[s]:
                param.requires_grad_(False)
        frozen = sum(p.numel() for s in self.plan.frozen for p in stages[s])
        log.info(
            "%s: froze %d of %d backbone stage(s) (%s parameters)%s",
            KEY,
            count,
            len(stages),
            f"{frozen:,}",
            self.plan.describe() if self.plan.unfreeze else "",
        )
        if self.plan.unfreeze and not self.plan.candidates():
            log.warning("%s: nothing to unfreeze (%s.freeze=%s)", KEY, KEY, self.plan.freeze)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the optimizer and scheduler; on a resumed run, re-add the groups of the stages
        unfrozen before the checkpoint (Lightning loads the optimizer's state right after)."""
        restored, self._restored = self._restored, None
        plan = self.plan
        if restored is not None and list(restored.get("frozen", [])) != plan.frozen:
            raise ConfigError(
                f"{KEY}: the checkpoint was written with stages {restored.get('frozen')} frozen "
                f"at the start, this run freezes {plan.frozen} ({KEY}.freeze={plan.freeze}); "
                f"resume with the {KEY} options of the run that wrote it"
            )
        if not plan.candidates():
            return
        optimizer, scheduler = _optimizer_and_scheduler(trainer)
        if plan.warmup_steps and not isinstance(scheduler, WarmupCosine):
            raise ConfigError(
                f"{KEY}.warmup_steps={plan.warmup_steps} needs a scheduler that follows parameter "
                "groups added during training (lightning_mtl.schedules.warmup_cosine, the default "
                f"model.scheduler), not {type(scheduler).__name__}; set {KEY}.warmup_steps=0"
            )
        if scheduler is not None and not isinstance(scheduler, WarmupCosine):
            log.warning(
                "%s: %s does not schedule parameter groups added during training: unfrozen "
                "stages keep their initial LR (lightning_mtl.schedules.warmup_cosine follows them)",
                KEY,
                type(scheduler).__name__,
            )
        self._ddp = isinstance(trainer.strategy.model, DistributedDataParallel)
        self._late = []
        for event in (restored or {}).get("events", []):
            self._unfreeze(pl_module, optimizer, scheduler, list(event["stages"]), event)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.plan.interval == "epoch":
            self._advance(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # global_step changes only after an optimizer step, so the first micro-batch that sees
        # a new value starts an accumulation window: a stage never joins mid-window
        if self.plan.interval == "step":
            self._advance(trainer, pl_module, trainer.global_step)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Average the gradients DDP does not know about (stages unfrozen after it wrapped the
        model) across ranks. Averaging is linear, so doing it after every micro-batch of an
        accumulation window gives the same sum as once at its end."""
        if not (self._ddp and self._late):
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._late]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = trainer.strategy.reduce(flat, reduce_op="mean")
        offset = 0
        for param in self._late:
            size = param.numel()
            param.grad = flat[offset : offset + size].view_as(param).clone()
            offset += size

    def state_dict(self) -> dict[str, Any]:
        """Plain containers (checkpoints load with ``weights_only=True``)."""
        return {"frozen": list(self.plan.frozen), "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning calls this after `setup` and before `on_fit_start`, where it is applied.
        self._restored = dict(state_dict)

    # ------------------------------------------------------------------------------ helpers
    def _advance(self, trainer: L.Trainer, pl_module: L.LightningModule, progress: int) -> None:
        done = len(self.unfrozen)
        todo = self.plan.candidates()[done : self.plan.target(progress)]
        if not todo:
            return
        optimizer, scheduler = _optimizer_and_scheduler(trainer)
        self._unfreeze(pl_module, optimizer, scheduler, todo, None, progress)

    def _unfreeze(
        self,
        pl_module: L.LightningModule,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        stages: Sequence[int],
        replay: dict[str, Any] | None,
        progress: int | None = None,
    ) -> None:
        """Make ``stages`` trainable and add their groups; ``replay``: the event of a checkpoint
        being resumed (its groups must come out the same)."""
        expected = self.plan.candidates()[len(self.unfrozen) : len(self.unfrozen) + len(stages)]
        if list(stages) != expected:
            raise ConfigError(
                f"{KEY}: the checkpoint unfroze stages {list(stages)} where this run's options "
                f"unfreeze {expected}; resume with the {KEY} options of the run that wrote it"
            )
        params = _architecture(pl_module).stage_parameters()
        for s in stages:
            for param in params[s]:
                param.requires_grad_(True)
        held = parameters_in(optimizer)
        # a MultiTaskModule: _architecture() above refuses any other module
        module = cast("MultiTaskModule", pl_module)
        rules = group_rules(module)
        groups: list[dict[str, Any]] = []
        for s in stages:
            for group in stage_groups(module, s, rules, exclude=held):
                held.update(id(p) for p in group["params"])
                groups.append(group)
        names = {id(p): n for n, p in pl_module.named_parameters()}
        described = [
            {"name": g["name"], "params": [names[id(p)] for p in g["params"]]} for g in groups
        ]
        if replay is not None and described != list(replay["groups"]):
            raise RuntimeError(
                f"{KEY}: unfreezing stages {list(stages)} gives the groups "
                f"{[g['name'] for g in described]}, but the checkpoint holds "
                f"{[g['name'] for g in replay['groups']]} (or other parameters): was it written "
                "by another model?"
            )
        step = getattr(scheduler, "last_epoch", 0)
        for group in groups:
            if self.plan.warmup_steps:
                group["warmup_start"] = int(step)
                group["warmup_steps"] = self.plan.warmup_steps
            optimizer.add_param_group(group)
        if isinstance(scheduler, WarmupCosine):
            # the scheduler sets LRs when it steps: give the new groups theirs for this step
            lrs = scheduler.get_lr()
            for index in range(len(optimizer.param_groups) - len(groups), len(lrs)):
                optimizer.param_groups[index]["lr"] = lrs[index]
        self._late.extend(p for g in groups for p in g["params"])
        at = progress if replay is None else replay.get("at")
        self.events.append({"stages": list(stages), "groups": described, "at": at})
        if replay is None:  # (a replay happens before training: on_train_start sets the modes)
            # batch norm of the unfrozen stages back to train mode (Architecture.train's rule)
            _architecture(pl_module).train(pl_module.training)
            added = optimizer.param_groups[len(optimizer.param_groups) - len(groups) :]
            log.info(
                "%s: unfroze stage(s) %s at %s %s: groups %s",
                KEY,
                list(stages),
                self.plan.interval,
                progress,
                ", ".join(f"{g['name']} (lr {g['lr']:.3g})" for g in added),
            )


def _architecture(pl_module: L.LightningModule) -> Any:
    net = getattr(pl_module, "net", None)
    architecture = getattr(net, "architecture", None)
    if architecture is None or not hasattr(architecture, "stage_parameters"):
        raise ConfigError(
            f"{KEY} (LayerwiseTraining) needs a lightning_mtl MultiTaskModule, got "
            f"{type(pl_module).__name__}"
        )
    return architecture


def _optimizer_and_scheduler(trainer: L.Trainer) -> tuple[torch.optim.Optimizer, Any]:
    if len(trainer.optimizers) != 1:
        raise ConfigError(
            f"{KEY}: gradual unfreezing adds groups to the one optimizer; the module configured "
            f"{len(trainer.optimizers)}"
        )
    optimizer = trainer.optimizers[0]
    schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler is not None]
    return optimizer, (schedulers[0] if schedulers else None)


def _check_strategy(trainer: L.Trainer) -> None:
    """Gradual unfreezing changes the trainable set after the strategy wrapped the model:
    supported on one device and with DDP (see the module docstring), not with sharding."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    strategy = trainer.strategy
    sharded = isinstance(strategy, DeepSpeedStrategy)
    if sharded or (trainer.world_size > 1 and not isinstance(strategy, DDPStrategy)):
        raise ConfigError(
            f"{KEY}: gradual unfreezing works on one device or with DDP "
            f"(trainer.strategy=ddp, ddp_spawn); not with {type(strategy).__name__}. Use "
            f"{KEY}=frozen (frozen for the whole run) with it"
        )
