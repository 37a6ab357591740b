"""Layer-wise training (``finetune=frozen|gradual``, Lightning's ``BackboneFinetuning``): which
parameters train at which step, seen from the optimizer's groups and from the weights
themselves, and a resumed run that ends like an uninterrupted one.

The runs use timm's ``test_resnet`` (5 stages, batch norm, 0.4 M parameters) and two
image-level tasks, 2 steps per epoch, so each takes seconds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from omegaconf import DictConfig
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_mtl.callbacks.layerwise import LayerwiseTraining
from lightning_mtl.callbacks.unfreeze_plan import UnfreezePlan
from lightning_mtl.errors import ConfigError
from lightning_mtl.optim import group_rules, optimizer_groups
from lightning_mtl.schedules import WarmupCosine, schedule_length, warmup_cosine_factor
from lightning_mtl.train import train
from tests.conftest import FAST, compose_config, run_ddp_sim

LR = 0.002  # model.optimizer.lr in configs/model/default.yaml
TINY = [
    "model.backbone.name=test_resnet",
    "task=[count,dominant_color]",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "+trainer.num_sanity_val_steps=0",
    "callbacks.gradient_conflict=null",
    "test=false",
    "model.no_decay_norm_bias=true",  # the groups come in pairs: with and without weight decay
]
PROBE = "+callbacks.probe._target_=tests.test_layerwise.Probe"
# 3 epochs of 2 steps; two stages unfrozen per epoch from epoch 1 with a 2-step LR ramp
GRADUAL = [
    *FAST,
    *TINY,
    PROBE,
    "trainer.max_epochs=3",
    "finetune=gradual",
    "finetune.stages_per_unfreeze=2",
    "finetune.warmup_steps=2",
    "model.backbone_lr_scale=0.1",
    "model.layer_decay=0.5",
    "callbacks.model_checkpoint.save_top_k=-1",
]


class Probe(L.Callback):
    """Per optimizer step (keyed by the global step): the optimizer's groups as used by that
    step, the trainable parameters, the batch-norm modes, and which parameters and batch-norm
    statistics the step changed (compared bit for bit)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, Any]] = {}
        self._before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = {k: v.detach().clone() for k, v in _tensors(pl_module).items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        groups = [
            {
                "name": g.get("name"),
                "lr": g["lr"],
                "initial_lr": g.get("initial_lr"),
                "warmup_start": g.get("warmup_start"),
                "warmup_steps": g.get("warmup_steps"),
                "params": [names[id(p)] for p in g["params"]],
            }
            for g in optimizer.param_groups
        ]
        architecture = pl_module.net.architecture
        self.steps[trainer.global_step] = {
            "groups": groups,
            "trainable": {n for n, p in pl_module.named_parameters() if p.requires_grad},
            "bn_train": {
                n: m.training for n, m in architecture.named_modules() if isinstance(m, _BatchNorm)
            },
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = _tensors(pl_module)
        changed = {k for k, v in after.items() if not torch.equal(self._before[k], v)}
        self.steps[trainer.global_step - 1]["changed"] = changed


def _tensors(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Every parameter and every batch-norm running statistic of the network, by name."""
    tensors = {n: p for n, p in pl_module.named_parameters() if n.startswith("net.")}
    for name, module in pl_module.named_modules():
        if isinstance(module, _BatchNorm):
            tensors[f"{name}.running_mean"] = module.running_mean
            tensors[f"{name}.running_var"] = module.running_var
    return tensors


def stage_names(model: L.LightningModule) -> list[set[str]]:
    """The parameter names of each backbone stage, and its batch-norm statistics."""
    names = {id(p): n for n, p in model.named_parameters()}
    stages = [{names[id(p)] for p in stage} for stage in model.net.architecture.stage_parameters()]
    for stage in stages:
        modules = {n.rsplit(".", 1)[0] for n in stage}
        for name, module in model.named_modules():
            if name in modules and isinstance(module, _BatchNorm):
                stage |= {f"{name}.running_mean", f"{name}.running_var"}
    return stages


def heads(model: L.LightningModule) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith("net.heads.")}


def probe_of(objects: dict[str, Any]) -> Probe:
    return next(cb for cb in objects["trainer"].callbacks if isinstance(cb, Probe))


def groups_of(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["name"]: g for g in record["groups"]}


def stage_lr(stage: int, scale: float = 0.1, decay: float = 0.5) -> float:
    """The formula: lr · backbone_lr_scale · layer_decay^(S-1-s), S = 5 stages."""
    return LR * scale * decay ** (4 - stage)


def stage_groups_named(*stages: int) -> set[str]:
    return {f"stage{s}{suffix}" for s in stages for suffix in ("", "/no_decay")}


def bn_modes(record: dict[str, Any], stage_params: set[str]) -> set[bool]:
    return {
        mode
        for name, mode in record["bn_train"].items()
        if f"net.architecture.{name}.weight" in stage_params
    }


# ------------------------------------------------------------------------- gradual, by epoch
@pytest.fixture(scope="module")
def gradual_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """3 epochs of 2 steps; two stages unfrozen per epoch from epoch 1 with a 2-step LR ramp:
    epoch 0 trains the heads, epoch 1 adds stages 4 and 3, epoch 2 stages 2 and 1; the stem
    (stage 0) stays frozen. A checkpoint after every epoch."""
    out = tmp_path_factory.mktemp("gradual")
    _, objects = train(compose_config("train", GRADUAL, out))
    return {"out": out, "objects": objects}


def test_gradual_by_epoch_groups_and_learning_rates(gradual_run: dict[str, Any]) -> None:
    model, probe = gradual_run["objects"]["model"], probe_of(gradual_run["objects"])
    assert sorted(probe.steps) == [0, 1, 2, 3, 4, 5]
    assert {n for s in (0, 1) for n in groups_of(probe.steps[s])} == {"heads", "heads/no_decay"}
    assert set(groups_of(probe.steps[2])) == {"heads", "heads/no_decay"} | stage_groups_named(4, 3)
    assert set(groups_of(probe.steps[4])) == set(groups_of(probe.steps[2])) | stage_groups_named(
        2, 1
    )
    # the groups hold exactly the stage's parameters
    stages = stage_names(model)
    for s in (4, 3, 2, 1):
        held = set(groups_of(probe.steps[5])[f"stage{s}"]["params"])
        held |= set(groups_of(probe.steps[5])[f"stage{s}/no_decay"]["params"])
        assert held == {n for n in stages[s] if not n.endswith(("running_mean", "running_var"))}
    # LR = lr · scale · decay^(S-1-s) · cosine factor · entry ramp (1/2, then 1)
    total = 6
    for step, entered, ramp in [(2, 2, 0.5), (3, 2, 1.0), (4, 4, 0.5), (5, 4, 1.0), (5, 2, 1.0)]:
        factor = warmup_cosine_factor(step, total, 0.05, 0.01)
        for s in (4, 3) if entered == 2 else (2, 1):
            for name in (f"stage{s}", f"stage{s}/no_decay"):
                group = groups_of(probe.steps[step])[name]
                assert group["initial_lr"] == pytest.approx(stage_lr(s), rel=1e-12)
                assert group["warmup_start"] == entered and group["warmup_steps"] == 2
                assert group["lr"] == pytest.approx(stage_lr(s) * factor * ramp, rel=1e-9)
        heads_group = groups_of(probe.steps[step])["heads"]
        assert heads_group["lr"] == pytest.approx(LR * factor, rel=1e-9)
    no_decay = groups_of(probe.steps[5])["stage4/no_decay"]
    assert no_decay["params"] and all(model.get_parameter(n).ndim == 1 for n in no_decay["params"])


def test_gradual_by_epoch_weights_change_exactly_when_trainable(
    gradual_run: dict[str, Any],
) -> None:
    model, probe = gradual_run["objects"]["model"], probe_of(gradual_run["objects"])
    stages = stage_names(model)
    trainable_from = {4: 2, 3: 2, 2: 4, 1: 4, 0: None}  # the step each stage starts training
    for step, record in probe.steps.items():
        assert heads(model) <= record["changed"], step
        for s, first in trainable_from.items():
            moved = stages[s] & record["changed"]
            if first is None or step < first:
                assert not moved, (step, s, sorted(moved)[:3])  # bit-identical, BN stats too
                assert not stages[s] & record["trainable"]
                assert bn_modes(record, stages[s]) == {False}
            else:
                assert moved & record["trainable"], (step, s)
                statistics = {n for n in stages[s] if n.endswith("running_mean")}
                assert statistics and statistics <= moved  # batch norm back in train mode
                assert bn_modes(record, stages[s]) == {True}
    # running statistics of the stem never moved (eval mode while frozen)
    assert any(n.endswith("running_mean") for n in stages[0])


def test_resume_after_an_epoch_matches_the_uninterrupted_run(
    gradual_run: dict[str, Any], tmp_path: Path
) -> None:
    """Kill after epoch 1 (stages 4 and 3 unfrozen), resume: the same groups, LRs, warm-up and
    requires_grad flags at every later step and at the end."""
    first = gradual_run["out"] / "checkpoints" / "epoch_001.ckpt"
    state = torch.load(first, weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if "LayerwiseTraining" in k)
    assert [e["stages"] for e in saved["events"]] == [[4, 3]]
    cfg = compose_config("train", [*GRADUAL, f"ckpt_path={first}"], tmp_path)
    _, objects = train(cfg)
    resumed, whole = probe_of(objects), probe_of(gradual_run["objects"])
    assert sorted(resumed.steps) == [4, 5]
    for step in (4, 5):
        assert resumed.steps[step]["groups"] == whole.steps[step]["groups"]
        assert resumed.steps[step]["trainable"] == whole.steps[step]["trainable"]
        assert resumed.steps[step]["bn_train"] == whole.steps[step]["bn_train"]
    ends = [o["trainer"].optimizers[0].param_groups for o in (objects, gradual_run["objects"])]
    keys = ("name", "lr", "initial_lr", "warmup_start", "warmup_steps", "weight_decay")
    assert [[g.get(k) for k in keys] for g in ends[0]] == [
        [g.get(k) for k in keys] for g in ends[1]
    ]
    flags = [
        {n: p.requires_grad for n, p in o["model"].named_parameters()}
        for o in (objects, gradual_run["objects"])
    ]
    assert flags[0] == flags[1]


# --------------------------------------------------------------------------- gradual, by step
def test_gradual_by_step_with_partial_freeze_and_kept_stem(
    make_cfg: Callable[..., DictConfig],
) -> None:
    """freeze=3 (stages 0-2), keep_frozen=1 (the stem): stage 2 joins at step 1, stage 1 at
    step 3, the stem never; stages 3 and 4 train from the start."""
    cfg = make_cfg(
        *TINY,
        PROBE,
        "trainer.limit_train_batches=4",
        "finetune=gradual",
        "finetune.interval=step",
        "finetune.freeze=3",
        "finetune.keep_frozen=1",
        "finetune.start=1",
        "finetune.every=2",
        "finetune.warmup_steps=2",
        "callbacks.model_checkpoint=null",
    )
    _, objects = train(cfg)
    model, probe = objects["model"], probe_of(objects)
    stages = stage_names(model)
    base = {"heads", "heads/no_decay"} | stage_groups_named(3, 4)
    assert set(groups_of(probe.steps[0])) == base
    assert (
        set(groups_of(probe.steps[1]))
        == set(groups_of(probe.steps[2]))
        == base | stage_groups_named(2)
    )
    assert set(groups_of(probe.steps[3])) == base | stage_groups_named(2, 1)
    assert [g["name"] for g in probe.steps[3]["groups"]][-4:] == [
        "stage2",
        "stage2/no_decay",
        "stage1",
        "stage1/no_decay",
    ]
    for step, ramp in [(1, 0.5), (2, 1.0)]:
        group = groups_of(probe.steps[step])["stage2"]
        factor = warmup_cosine_factor(step, 4, 0.05, 0.01)
        assert group["warmup_start"] == 1
        assert group["lr"] == pytest.approx(LR * factor * ramp, rel=1e-9)  # scale 1, decay 1
    changed = {s: probe.steps[s]["changed"] for s in range(4)}
    assert all(stages[3] & changed[s] and stages[4] & changed[s] for s in range(4))
    assert not stages[2] & changed[0] and all(stages[2] & changed[s] for s in (1, 2, 3))
    assert not stages[1] & (changed[0] | changed[1] | changed[2]) and stages[1] & changed[3]
    assert not stages[0] & set().union(*changed.values())


def test_warmup_counts_scheduler_steps_with_an_epoch_scheduler(
    make_cfg: Callable[..., DictConfig],
) -> None:
    """With model.scheduler_interval=epoch the scheduler steps once per epoch, after 2 epochs
    of 10 optimizer steps: the stage entering at epoch 2 gets warmup_start=2 (the scheduler's
    counter, not the global step 20), half its LR in epoch 2 and all of it in epoch 3."""
    model = hydra.utils.instantiate(make_cfg(*TINY).model)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    callback = LayerwiseTraining(unfreeze=True, start=2, warmup_steps=2)
    callback.setup(trainer, model, "fit")
    optimizer = model.make_optimizer(optimizer_groups(model, group_rules(model)))
    scheduler = WarmupCosine(optimizer, total_steps=10, warmup_fraction=0.0, min_lr_ratio=0.1)
    fake = SimpleNamespace(
        optimizers=[optimizer],
        lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)],
        global_step=20,
    )
    for epoch in range(2):
        callback._advance(fake, model, epoch)
        assert {g["name"] for g in optimizer.param_groups} == {"heads", "heads/no_decay"}
        scheduler.step()
    callback._advance(fake, model, 2)
    entered = optimizer.param_groups[-2:]
    assert [g["name"] for g in entered] == ["stage4", "stage4/no_decay"]
    for step, ramp in [(2, 0.5), (3, 1.0)]:
        factor = warmup_cosine_factor(step, 10, 0.0, 0.1)
        for group in entered:
            assert group["warmup_start"] == 2
            assert group["lr"] == pytest.approx(LR * factor * ramp, rel=1e-9)
        scheduler.step()
    assert all(p.requires_grad for p in model.net.architecture.stage_parameters()[4])
    assert not any(p.requires_grad for p in model.net.architecture.stage_parameters()[3])


# ------------------------------------------------------------------------ a frozen backbone
@pytest.mark.parametrize("weighting", ["upgrad", "famo"])
def test_frozen_backbone_trains_the_heads_only(
    weighting: str, make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """finetune=frozen with a gradient method (upgrad: its meeting place gets no gradient) and
    a loss-based one (famo); the famo run also goes without the callbacks group."""
    overrides = [*TINY, PROBE, f"weighting={weighting}", "finetune=frozen"]
    if weighting == "famo":
        base = [o for o in FAST if not o.startswith("callbacks.")]
        tiny = [o for o in overrides if not o.startswith("callbacks.")]
        cfg = compose_config("train", [*base, *tiny, "callbacks=none"], tmp_path)
    else:
        cfg = make_cfg(*overrides)
    _, objects = train(cfg)
    model, probe = objects["model"], probe_of(objects)
    backbone = set().union(*stage_names(model))
    for record in probe.steps.values():
        assert {g["name"] for g in record["groups"]} == {"heads", "heads/no_decay"}
        assert not backbone & record["changed"]  # weights and BN statistics bit-identical
        assert heads(model) <= record["changed"]
        assert set(record["bn_train"].values()) == {False}
    assert len(probe.steps) == 2
    assert not any(p.requires_grad for p in model.backbone.parameters())


# ------------------------------------------------------------------- Lightning's callback
def test_lightning_backbone_finetuning_adds_the_backbone_at_its_epoch(
    make_cfg: Callable[..., DictConfig],
) -> None:
    """``MultiTaskModule.backbone`` makes BackboneFinetuning work: epoch 0 trains the heads
    (and, with its default train_bn=True, the batch-norm weights), epoch 1 adds one group with
    the rest of the backbone."""
    cfg = make_cfg(
        *TINY,
        PROBE,
        "trainer.max_epochs=2",
        "+callbacks.backbone._target_=lightning.pytorch.callbacks.BackboneFinetuning",
        "+callbacks.backbone.unfreeze_backbone_at_epoch=1",
        "callbacks.model_checkpoint=null",
    )
    _, objects = train(cfg)
    model, probe = objects["model"], probe_of(objects)
    assert any(isinstance(cb, BackboneFinetuning) for cb in objects["trainer"].callbacks)
    backbone = {n for n, _ in model.named_parameters() if n.startswith("net.architecture.")}
    norms = {
        f"{name}.{p}"
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        for p, _ in module.named_parameters()
    }
    convs = backbone - norms
    assert norms and convs
    for step in (0, 1):
        held = {n for g in probe.steps[step]["groups"] for n in g["params"]}
        assert not convs & held and not convs & probe.steps[step]["changed"]
        assert heads(model) <= probe.steps[step]["changed"]
    for step in (2, 3):
        assert set(probe.steps[step]["groups"][-1]["params"]) == convs
        assert convs <= probe.steps[step]["changed"]
    assert len(probe.steps[2]["groups"]) == len(probe.steps[0]["groups"]) + 1


# --------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    ("options", "staged", "words"),
    [
        ({"freeze": 6}, True, ["finetune.freeze=6", "5 stages", "from 0 to 5"]),
        ({"freeze": -1}, True, ["finetune.freeze=-1", "all", "from 0 to 5"]),
        ({"freeze": "most"}, True, ["finetune.freeze='most'", "all"]),
        ({"interval": "hour"}, True, ["finetune.interval='hour'", "epoch, step"]),
        ({"every": 0, "unfreeze": True}, True, ["finetune.every=0", ">= 1"]),
        ({"keep_frozen": 3, "freeze": 2}, True, ["finetune.keep_frozen=3", "0 to 2"]),
        ({"freeze": 2}, False, ["finetune.freeze=2", "stage by stage", "all"]),
    ],
)
def test_bad_options_name_the_key_and_the_accepted_values(
    options: dict[str, Any], staged: bool, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as error:
        UnfreezePlan(**options).check(5 if staged else 1, staged)
    for word in words:
        assert word in str(error.value)
    if not staged:
        assert UnfreezePlan(freeze="all").check(1, False) == 1


def test_too_many_stages_stop_in_setup_before_training(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg(*TINY, PROBE, "finetune=frozen", "finetune.freeze=7")
    with pytest.raises(ConfigError, match=r"finetune.freeze=7: .* 5 stages"):
        train(cfg)


def test_a_backbone_that_is_one_block_refuses_stage_freezing(
    make_cfg: Callable[..., DictConfig],
) -> None:
    cfg = make_cfg(
        "model.backbone.name=test_vit_relpos",
        "+model.backbone.model_kwargs.img_size=32",
        "task=[count]",
    )
    model = hydra.utils.instantiate(cfg.model)
    assert not model.net.architecture.backbone.staged
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match="does not run stage by stage"):
        LayerwiseTraining(freeze=2).setup(trainer, model, "fit")
    LayerwiseTraining(freeze="all").setup(trainer, model, "fit")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert any(p.requires_grad for p in model.net.heads.parameters())


def test_gradual_unfreezing_refuses_the_base_weights_adapters_keep_frozen(
    make_cfg: Callable[..., DictConfig],
) -> None:
    model = hydra.utils.instantiate(make_cfg(*TINY, "model.architecture=adapters").model)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match=r"finetune=gradual .*\(adapters\).*freeze_base: true"):
        LayerwiseTraining(unfreeze=True).setup(trainer, model, "fit")
    LayerwiseTraining(freeze=1).setup(trainer, model, "fit")  # frozen for good: accepted


def test_the_schedule_counts_what_the_scheduler_steps_on() -> None:
    trainer = SimpleNamespace(estimated_stepping_batches=512, max_epochs=4)
    assert schedule_length(trainer, "step") == 512
    assert schedule_length(trainer, "epoch") == 4  # not 512 epochs of warm-up and decay
    with pytest.raises(ConfigError, match=r"scheduler_interval=epoch needs trainer.max_epochs"):
        schedule_length(SimpleNamespace(estimated_stepping_batches=512, max_epochs=-1), "epoch")


def test_the_finetune_group_composes_with_and_without_callbacks() -> None:
    base = [o for o in FAST if not o.startswith("callbacks.")]
    for extra in ([], ["callbacks=none"]):
        cfg = compose_config("train", [*base, *extra, "finetune=frozen", "finetune.freeze=2"])
        callback = hydra.utils.instantiate(cfg.finetune)
        assert isinstance(callback, LayerwiseTraining) and callback.plan.freeze == 2
    cfg = compose_config("train", [*base, "finetune=gradual", "finetune.interval=step"])
    assert cfg.finetune.unfreeze is True and cfg.finetune.interval == "step"
    assert compose_config("train", base).get("finetune") is None


# ---------------------------------------------------------------------------------- DDP
class RankDigest(L.Callback):
    """Writes each rank's parameters at the end of training to ``<path>/rank<r>.pt``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        state["trainable"] = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        torch.save(state, self.path / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_agree_after_unfreezing(tmp_path: Path) -> None:
    """DDP synchronises only the parameters trainable when it wrapped the model; the stages
    unfrozen later are averaged by the callback, so both ranks keep identical weights."""
    run_ddp_sim(
        tmp_path,
        *TINY,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "finetune=gradual",
        "finetune.interval=step",
        "finetune.start=1",
        "finetune.stages_per_unfreeze=5",
        "callbacks.model_checkpoint=null",
        "+callbacks.digest._target_=tests.test_layerwise.RankDigest",
        f"+callbacks.digest.path={tmp_path}",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["trainable"] == ranks[1]["trainable"]
    assert any(".layer1." in n for n in ranks[0]["trainable"])  # the whole backbone unfroze
    for name, value in ranks[0].items():
        if name != "trainable":
            assert torch.equal(value, ranks[1][name]), name
