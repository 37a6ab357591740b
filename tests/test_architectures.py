"""The architecture seam: every architecture on a CNN and a ViT backbone, with every kind of
balancer, the gradients at nested meeting places against explicit Jacobians, frozen backbones,
refused levels and options, and the switches (checkpointing, channels_last)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from torchjd.aggregation import UPGradWeighting
from torchjd.linalg import QuadprogProjector

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.architectures import ARCHITECTURES
from lightning_mtl.models.architectures.base import mix
from lightning_mtl.models.backbone import Backbone
from lightning_mtl.utils.setup import CONFIG_DIR
from lightning_mtl.weighting import WEIGHTINGS
from tests.conftest import FAST, compose_config, run_ddp_sim
from tests.test_module import batch_of

NAMES = ARCHITECTURES.names()
# a small ViT: 4 blocks of width 192, 8-pixel patches on the 32-pixel test images
VIT = [
    "model.backbone.name=vit_tiny_patch16_224",
    "+model.backbone.model_kwargs.img_size=32",
    "+model.backbone.model_kwargs.patch_size=8",
    "+model.backbone.model_kwargs.depth=4",
    "model.backbone.out_indices=[1,2,3]",
]
BACKBONES = {"cnn": [], "vit": VIT}


def module_for(architecture: str | dict, backbone: str = "cnn", *overrides: str) -> Any:
    """A ``MultiTaskModule`` of the default tasks on the 32-pixel test data."""
    spec = architecture if isinstance(architecture, str) else _inline(architecture)
    cfg = compose_config(
        "train", [*FAST, f"model.architecture={spec}", *BACKBONES[backbone], *overrides], None
    )
    torch.manual_seed(0)
    try:
        return hydra.utils.instantiate(cfg.model)
    except Exception as error:  # hydra wraps errors raised inside _target_ calls: unwrap ours
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        raise cause or error from None


def _inline(spec: dict) -> str:
    """A mapping as a Hydra command-line value."""

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ",".join(f"{k}:{value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list | tuple):
            return "[" + ",".join(value(x) for x in v) + "]"
        return "null" if v is None else str(v)

    return value(spec)


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------- the registry
def test_every_architecture_has_its_config_and_every_option_there_is_accepted() -> None:
    import inspect

    from omegaconf import OmegaConf

    files = {p.stem for p in (CONFIG_DIR / "architecture").glob("*.yaml")}
    assert (
        files
        == set(NAMES)
        >= {"hard", "branched", "mtan", "mmoe", "ple", "cross_stitch", "adapters"}
    )
    for name in NAMES:
        options = OmegaConf.to_container(
            OmegaConf.load(CONFIG_DIR / "architecture" / f"{name}.yaml")
        )
        assert options.pop("name") == name
        accepted = set(inspect.signature(ARCHITECTURES.get(name, "x")).parameters)
        assert set(options) <= accepted - {"backbone", "tasks"}, name
    with pytest.raises(
        ConfigError, match=r"model.architecture='brunched'.*Accepted values: .*branched"
    ):
        module_for("brunched")


@pytest.mark.parametrize("backbone", ["cnn", "vit"])
@pytest.mark.parametrize("name", NAMES)
def test_every_architecture_builds_heads_from_its_features_and_declares_its_parameters(
    name: str, backbone: str
) -> None:
    module = module_for(name, backbone)
    net = module.net.architecture
    images = batch_of(2)["image"]
    out = net(images)
    assert set(out.features) == {t.name for t in module.tasks}
    for task in module.tasks:
        info, features = net.feature_info(task.name), out.features[task.name]
        assert [m.shape[1] for m in features.maps] == list(info.channels)
        assert [32 // m.shape[-1] for m in features.maps] == list(info.reductions)
        assert features.pooled.shape == (2, info.pooled_dim)
    # every backbone-derived parameter in exactly one stage; the stages are the backbone's
    stages = net.stage_parameters()
    ids = [id(p) for stage in stages for p in stage]
    assert len(ids) == len(set(ids))
    derived = {id(p) for m in net.backbone_modules() for p in m.parameters()}
    lora = {id(p) for n, p in net.named_parameters() if ".down." in n or ".up." in n}
    assert set(ids) == derived - lora
    # meeting places: disjoint shared parameters, tasks of the run, levels they define
    seen: set[int] = set()
    for place in net.places:
        assert set(place.tasks) <= {t.name for t in module.tasks} and len(place.tasks) >= 2
        params = {id(p) for p in place.parameters()}
        assert not params & seen, place.name
        seen |= params
    assert [m.place.name for m in out.meetings] == [p.name for p in net.places]
    assert net.levels == {
        "cross_stitch": ("params",),
    }.get(name, ("representation", "params"))


def test_hard_sharing_reads_the_backbones_own_features_and_stages_reproduce_them() -> None:
    images = batch_of(2)["image"]
    for backbone in ("cnn", "vit"):
        module = module_for("hard", backbone).eval()
        net = module.net.architecture
        reference = net.backbone(images)
        out = net(images)
        for features in out.features.values():
            torch.testing.assert_close(features.pooled, reference.pooled)
        _, maps = net.backbone.run(images, 0, net.backbone.num_stages)
        for got, expected in zip(maps, reference.maps, strict=True):
            torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------- training, every kind
METHODS = [("equal", None), ("famo", None), ("upgrad", "representation"), ("upgrad", "params")]


def _cases() -> list:
    cases = []
    for name in NAMES:
        for backbone in BACKBONES:
            marks = [] if backbone == "cnn" else [pytest.mark.slow]
            cases.append(pytest.param(name, backbone, id=f"{name}-{backbone}", marks=marks))
    return cases


@pytest.mark.parametrize(("name", "backbone"), _cases())
def test_every_architecture_trains_with_loss_and_gradient_balancers_at_every_level(
    name: str, backbone: str
) -> None:
    batch = batch_of(4)
    for method, level in METHODS:
        overrides = [f"weighting={method}", *([f"weighting.level={level}"] if level else [])]
        try:
            module = module_for(name, backbone, *overrides)
        except ConfigError as error:  # the one level an architecture here does not define
            assert (name, level) == ("cross_stitch", "representation"), error
            assert "is not defined for model.architecture" in str(error)
            continue
        loss = module.training_step(batch, 0)
        assert torch.isfinite(loss)
        loss.backward()
        missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (method, level, missing[:5])
        heads = [p.grad for p in module.net.heads.parameters()]
        assert all(torch.isfinite(g).all() for g in heads)
        assert sum(float(g.abs().sum()) for g in heads) > 0


# ----------------------------------------------------------------- nested places: the reference
TREE = {
    "name": "branched",
    "at": 2,
    "branches": [
        ["segmentation", "depth"],
        {"at": 3, "branches": [["count"], ["dominant_color", "colors"]]},
    ],
}


@pytest.mark.parametrize("level", ["representation", "params"])
def test_each_meeting_place_of_a_tree_gets_the_rule_applied_to_its_own_tasks_gradients(
    level: str,
) -> None:
    """Trunk (all tasks), branch0 (segmentation, depth), branch1 (count, dominant_color,
    colors) and, nested in it, branch1_1 (dominant_color, colors): each place's parameters
    receive ``Σ wᵢ gᵢ`` with ``w = UPGrad(G)`` of that place's tasks, where gᵢ is the task's
    gradient of the place's tensors (or parameters) through the *uncut* network, and each head
    its own gradient."""
    module = module_for(TREE, "vit", "weighting=upgrad", f"weighting.level={level}").eval()
    net = module.net.architecture
    assert [p.name for p in net.places] == ["trunk", "branch0", "branch1", "branch1_1"]
    batch = batch_of(4)
    batch["mask"]["depth"] = torch.tensor([True, True, False, False])
    module.training_step(batch, 0).backward()
    got = grads(module)

    module.zero_grad()
    out = net(batch["image"])  # uncut: every gradient flows through everything
    outputs = module.net.forward_heads(out.features, batch["image"].shape[-2:])
    losses, _ = module.task_losses(outputs, batch)
    names = {id(p): n for n, p in module.named_parameters()}
    checked = 0
    for meeting in out.meetings:
        place = meeting.place
        tasks = [t for t in place.tasks if t in losses]
        params = place.trainable_parameters()
        inputs = meeting.tensors if level == "representation" else params
        rows = []
        for task in tasks:
            g = torch.autograd.grad(losses[task], inputs, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (x if x is not None else torch.zeros_like(i)).flatten()
                        for x, i in zip(g, inputs, strict=True)
                    ]
                )
            )
        rows = torch.stack(rows)
        exact = UPGradWeighting(projector=QuadprogProjector(reg_eps=1e-10))  # ours: exact
        w = exact((rows @ rows.T).double()).float()
        for p in params:
            per_task = [
                torch.autograd.grad(losses[t], p, retain_graph=True, allow_unused=True)[0]
                for t in tasks
            ]
            expected = sum(
                wi * (g if g is not None else torch.zeros_like(p))
                for wi, g in zip(w, per_task, strict=True)
            )
            torch.testing.assert_close(
                got[names[id(p)]],
                expected,
                rtol=2e-3,
                atol=1e-7,
                msg=f"{place.name}: {names[id(p)]}",
            )
            checked += 1
    assert checked > 20
    for task in module.tasks:  # heads: their own gradient
        head = list(module.net.heads[task.name].parameters())
        own = torch.autograd.grad(losses[task.name], head, retain_graph=True)
        for p, g in zip(head, own, strict=True):
            torch.testing.assert_close(got[names[id(p)]], g, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------- frozen backbones
GRADIENT_METHODS = [n for n in WEIGHTINGS.names() if WEIGHTINGS.get(n, "x").needs_gradients]


# A loss-based, a stateful and three gradient methods (both levels) in the default suite; every
# method, and the branched tree, under the slow marker (each case builds a model: ~3 s).
FROZEN_SAMPLE = ["equal", "uncertainty", "famo", "upgrad", "mgda", "nash_mtl"]


@pytest.mark.parametrize(
    ("name", "methods"),
    [
        ("hard", FROZEN_SAMPLE),
        # every method at every level, on a tree (several places, each skipped alike)
        pytest.param("branched", None, marks=pytest.mark.slow),
    ],
)
def test_a_fully_frozen_backbone_trains_the_heads_with_every_balancer(
    name: str, methods: list[str] | None, caplog: pytest.LogCaptureFixture
) -> None:
    batch = batch_of(4)
    for method in methods or WEIGHTINGS.names():
        levels = WEIGHTINGS.get(method, "x").levels if method in GRADIENT_METHODS else [None]
        for level in levels:
            overrides = [f"weighting={method}", *([f"weighting.level={level}"] if level else [])]
            module = module_for(name, "cnn", *overrides)
            for backbone in module.net.architecture.backbone_modules():
                backbone.requires_grad_(False)
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                for step in range(2):
                    loss = module.training_step(batch, step)
                    assert torch.isfinite(loss), (method, level)
                    loss.backward()
            heads = [p.grad for p in module.net.heads.parameters()]
            assert (
                all(g is not None for g in heads) and sum(float(g.abs().sum()) for g in heads) > 0
            )
            frozen = module.net.architecture.backbone.parameters()
            assert all(p.grad is None for p in frozen), (method, level)
            if method in GRADIENT_METHODS:  # one warning per skipped place, not one per step
                count = caplog.text.count("is skipped")
                assert count == len(module.net.architecture.places), (method, level)


def test_a_partly_frozen_trunk_balances_the_branches_only() -> None:
    module = module_for(TREE, "cnn", "weighting=upgrad")
    net = module.net.architecture
    net.backbone.requires_grad_(False)
    module.training_step(batch_of(4), 0).backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    branches = [p for b in net.branches for p in b.stages.parameters()]
    assert sum(float(p.grad.abs().sum()) for p in branches if p.grad is not None) > 0


# ------------------------------------------------------------------------------ levels and options
def test_levels_an_architecture_does_not_define_are_refused_naming_the_accepted_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"level='representation'.*cross_stitch.*Accepted levels: params"
    ):
        module_for("cross_stitch", "cnn", "weighting=mgda")
    spec = {"name": "adapters", "freeze_base": False}
    with pytest.raises(ConfigError, match=r"level='representation'.*adapters.*adapted.*params"):
        module_for(spec, "cnn", "weighting=upgrad")
    module_for(spec, "cnn", "weighting=upgrad", "weighting.level=params")  # accepted
    with pytest.raises(ConfigError, match=r"not valid for MGDAUB; accepted: representation"):
        module_for("cross_stitch", "cnn", "weighting=mgda_ub", "weighting.level=params")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"name": "branched", "branches": [["segmentation", "depth"], ["count"]]},
            r"tasks in no group \['dominant_color', 'colors'\]",
        ),
        (
            {
                "name": "branched",
                "branches": [
                    ["segmentation", "segmentation", "depth", "count", "dominant_color", "colors"]
                ],
            },
            "several groups",
        ),
        ({"name": "branched", "at": 9}, r"at=9 must be between 1 and 4"),
        (
            {"name": "branched", "branches": [{"at": 2, "branches": [["segmentation"]]}]},
            r"nested at=2 must lie between",
        ),
        (
            {"name": "cross_stitch", "groups": [["segmentation", "dpeth"]]},
            r"unknown tasks \['dpeth'\]",
        ),
        ({"name": "adapters", "rank": {"segmentation": 4}}, r"rank=.*missing \['depth'"),
        (
            {"name": "adapters", "layers": ["attention"]},
            r"layers=\['attention'\]; accepted: linear, conv",
        ),
        ({"name": "ple", "expert": "mlp"}, r"expert='mlp'; accepted: stages, conv"),
        (
            {"name": "ple", "expert": "stages", "levels": 6},
            r"levels=6 need 6 stage\(s\) of experts.*stages 0..4",
        ),
        ({"name": "mtan", "reduction": 0}, r"reduction=0"),
        (
            {"name": "mmoe", "expirts": 3},
            r"model.architecture \(mmoe\): unknown option\(s\) expirts. Accepted options: expert, "
            r"at, experts, hidden. Did you mean 'experts' for 'expirts'\?",
        ),
    ],
)
def test_bad_architecture_options_stop_before_training(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        module_for(spec)


def test_architectures_that_need_stages_refuse_a_backbone_that_has_none() -> None:
    # timm builds this one with feature hooks: hard sharing works, a branch point does not exist
    backbone = [
        "model.backbone.name=efficientnet_b0",
        "+model.backbone.model_kwargs.feature_location=expansion",
    ]
    module_for("hard", "cnn", *backbone)
    with pytest.raises(ConfigError, match=r"branched needs a backbone that runs stage by stage"):
        module_for("branched", "cnn", *backbone)


# --------------------------------------------------------------------------- architecture details
def test_adapters_budget_sets_each_tasks_rank_and_only_adapters_and_heads_train() -> None:
    budget = {  # resnet18's layer3 and layer4 convolutions: 28416 parameters per unit of rank
        "segmentation": 500_000,
        "depth": 200_000,
        "count": 60_000,
        "dominant_color": 60_000,
        "colors": 1_000,
    }
    module = module_for({"name": "adapters", "budget": budget, "rank": None})
    net = module.net.architecture
    size = {t: sum(p.numel() for p in net.adapter_parameters(t)) for t in budget}
    per_rank = size["segmentation"] // net.ranks["segmentation"]  # parameters per unit of rank
    for task, n in budget.items():
        assert net.ranks[task] == max(1, n // per_rank), task
        assert size[task] == net.ranks[task] * per_rank <= max(n, per_rank), task
    assert net.ranks["segmentation"] > net.ranks["depth"] > net.ranks["count"] >= 1
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".down." in n or ".up." in n}
    assert adapters and trainable - adapters == {
        n for n, p in module.named_parameters() if n.startswith("net.heads.")
    }
    # the adapters start at zero: every task's features are the base network's
    module.eval()
    images = batch_of(2)["image"]
    out = net(images)
    x, _ = net.backbone.run(images, 0, net.at)
    _, base = net.backbone.run(images, net.at, net.at + len(net.adapted), x=x, copies=net.adapted)
    for task in budget:
        torch.testing.assert_close(out.features[task].maps[-1], base[-1])


def test_cross_stitch_columns_are_independent_without_stitching_and_mix_with_it() -> None:
    images = batch_of(2)["image"]
    for self_weight in (1.0, 0.9):
        module = module_for({"name": "cross_stitch", "self_weight": self_weight}).eval()
        net = module.net.architecture
        alpha = net.stitches[0].alpha
        assert torch.allclose(alpha.diagonal(), torch.full((5,), self_weight))
        assert torch.allclose(alpha.sum(dim=1), torch.ones(5))
        # count reads column 2; column 0 (the backbone itself) is segmentation's
        count = net(images).features["count"].pooled.sum()
        (grad,) = torch.autograd.grad(count, [net.backbone.stage_parameters(0)[0]])
        mixed = float(grad.abs().sum()) > 0
        assert mixed == (self_weight < 1.0)


def test_mtan_attention_masks_select_from_the_shared_maps() -> None:
    module = module_for("mtan").eval()
    net = module.net.architecture
    images = batch_of(2)["image"]
    shared = net.backbone(images).maps
    out = net(images)
    for task in ("segmentation", "count"):
        for attended, full in zip(out.features[task].maps, shared, strict=True):
            ratio = attended / full.where(full.abs() > 1e-6, torch.ones_like(full))
            inside = full.abs() > 1e-6
            assert float(ratio[inside].min()) >= 0 and float(ratio[inside].max()) <= 1
    assert not torch.equal(out.features["segmentation"].maps[-1], out.features["count"].maps[-1])


def test_ple_levels_chain_and_gates_mix_per_sample() -> None:
    spec = {"name": "ple", "expert": "stages", "levels": 2, "at": 3}
    module = module_for(spec).eval()
    net = module.net.architecture
    assert [p.name for p in net.places] == ["trunk", "level0", "level1"]
    assert net.starts == [3, 4]
    out = net(batch_of(2)["image"])
    assert len(out.features["depth"].maps) == 5  # the trunk's three levels, one per later stage
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    tensors = [torch.ones(2, 3, 4), torch.full((2, 3, 4), 5.0)]
    mixed = mix(weights, tensors)
    assert torch.equal(mixed[0], torch.full((3, 4), 4.0)) and torch.equal(mixed[1], tensors[0][1])


# ------------------------------------------------------------------------------------- switches
@pytest.mark.parametrize("name", NAMES)
def test_gradient_checkpointing_gives_the_same_gradients(name: str) -> None:
    batch = batch_of(4)
    method = "weighting=equal" if name == "cross_stitch" else "weighting=upgrad"
    plain = module_for(name, "cnn", method).eval()
    checkpointed = module_for(name, "cnn", method, "model.backbone.grad_checkpointing=true").eval()
    checkpointed.load_state_dict(plain.state_dict())
    plain.train(), checkpointed.train()
    for module in (plain, checkpointed):
        module.net.architecture.eval()  # same batch-norm behaviour in both
        module.training_step(batch, 0).backward()
    a, b = grads(plain), grads(checkpointed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_compile_gives_the_same_gradients_for_every_architecture(name: str) -> None:
    """``model.compile`` through ``setup("fit")``: dynamo traces each architecture's forward
    (its meeting cuts and stage copies included) and the heads; one training step with a
    gradient method gives eager's loss and gradients. ``aot_eager`` keeps the test to tracing
    and autograd, seconds instead of minutes of C++ code generation on a CPU. MGDA, not a
    dual-cone rule: where two task gradients are nearly dependent, UPGrad's projection moves by
    about 1% under the 1e-7 round-off that separates compiled from eager rows, which would hide
    what this test measures."""
    batch = batch_of(4)
    method = (
        "weighting.level=params" if name == "cross_stitch" else "weighting.level=representation"
    )
    eager = module_for(name, "cnn", "weighting=mgda", method).eval()
    compiled = module_for(
        name, "cnn", "weighting=mgda", method, "model.compile={backend:aot_eager}"
    )
    compiled.load_state_dict(eager.state_dict())
    compiled.setup("fit")
    assert all(getattr(p, "_compiled_call_impl", None) for p in compiled.net.heads.values())
    assert compiled.net.architecture._compiled_call_impl is not None
    losses = []
    for module in (eager, compiled):
        module.train()
        module.net.architecture.eval()  # the same batch-norm behaviour in both
        loss = module.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    a, b = grads(eager), grads(compiled)
    assert a.keys() == b.keys()
    # each tensor within 1e-4 of its norm, or (a tensor whose gradient is near 0: a gate the
    # rule gives almost no weight) within 1e-6 of the whole gradient's norm
    total = float(torch.cat([g.flatten() for g in a.values()]).norm())
    for key in a:
        error, norm = float((b[key] - a[key]).norm()), float(a[key].norm())
        assert error <= 1e-4 * norm or error <= 1e-6 * total, (key, error, norm, total)


def test_channels_last_gives_the_same_outputs_for_every_architecture() -> None:
    images = batch_of(2)["image"]
    for name in NAMES:
        module = module_for(name).eval()
        expected = module(images)
        module.net.to(memory_format=torch.channels_last)
        got = module(images.contiguous(memory_format=torch.channels_last))
        for task, value in expected.items():
            torch.testing.assert_close(got[task], value, rtol=1e-4, atol=1e-4, msg=f"{name} {task}")


def test_a_backbone_copy_runs_the_same_stages(tmp_path: Path) -> None:
    backbone = Backbone("resnet18").eval()
    images = torch.randn(2, 3, 32, 32)
    _, reference = backbone.run(images, 0, 5)
    twin = copy.deepcopy(backbone)
    tail = twin.split(3, "test")
    x, maps = twin.run(images, 0, 3)
    _, rest = twin.run(images, 3, 5, x=x, copies=tail)
    for got, expected in zip([*maps, *rest], reference, strict=True):
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="split off"):
        twin.run_stage(4, x)


# ---------------------------------------------------------------------------- through the Trainer
@pytest.mark.parametrize("name", NAMES)
def test_every_architecture_trains_from_its_command_line_switch(name: str, tmp_path: Path) -> None:
    """``model.architecture=<name>`` through the Trainer with a gradient method: the weights of
    every meeting place, the conflict monitor and the model report are logged, and the run
    validates."""
    from lightning_mtl.train import train

    level = "params" if name in {"cross_stitch", "adapters"} else "representation"
    # adapters: with the base trainable (frozen, there would be nothing to balance or measure)
    spec = "{name:adapters,freeze_base:false}" if name == "adapters" else name
    overrides = [
        f"model.architecture={spec}",
        "weighting=upgrad",
        f"weighting.level={level}",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "callbacks.gradient_conflict.every_n_steps=1",
        "test=false",
    ]
    metrics, objects = train(compose_config("train", [*FAST, *overrides], tmp_path))
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    places = objects["model"].net.architecture.places
    for task in ("segmentation", "colors"):
        assert f"train/weight/{task}" in header
    if len(places) > 1:  # and each place's weights of its own tasks
        for place in places:
            assert all(f"train/weight/{place.name}/{t}" in header for t in place.tasks), place.name
    assert "train/grad_cos/segmentation/depth" in header and "model/params/shared" in header
    assert metrics["val/loss"] == metrics["val/loss"]  # validated, finite


def test_a_checkpoint_rebuilds_its_architecture_for_evaluation(tmp_path: Path) -> None:
    """``mtl-eval`` needs no training override: the architecture and its options are saved in
    the checkpoint's hyperparameters (in full, YAML defaults included)."""
    from lightning_mtl.eval import evaluate
    from lightning_mtl.train import train

    spec = "{name:branched,branches:[[segmentation,depth,count],[dominant_color,colors]]}"
    overrides = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]
    cfg = compose_config("train", [*FAST, f"model.architecture={spec}", *overrides], tmp_path)
    metrics, _ = train(cfg)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["architecture"] == {
        "name": "branched",
        "at": None,
        "branches": [["segmentation", "depth", "count"], ["dominant_color", "colors"]],
    }
    fast = [o for o in FAST if not o.startswith("callbacks.")]  # eval has no callbacks
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    limit = "trainer.limit_val_batches=1"  # the batches validated during training
    eval_cfg = compose_config("eval", [*fast, limit, f"ckpt_path={ckpt}"], tmp_path / "e")
    evaluated = evaluate(eval_cfg)
    for key in ("val/segmentation/miou", "val/colors/map", "val/loss"):
        assert evaluated[key] == pytest.approx(metrics[key], rel=1e-5), key


@pytest.mark.slow
def test_a_branching_tree_trains_under_ddp_sim_with_a_gradient_method(tmp_path: Path) -> None:
    """Two gloo processes through Lightning: every meeting place joins its all-reduces, DDP sees
    a gradient for every parameter (no unused-parameter error) and the run tests."""
    output = run_ddp_sim(
        tmp_path,
        "model.architecture=branched",
        "weighting=nash_mtl",
        "callbacks.gradient_conflict.every_n_steps=1",
    )
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    for key in ("train/weight/trunk/segmentation", "train/weight/branch1/colors", "test/loss"):
        assert key in header, key
    assert "find_unused_parameters" not in output
