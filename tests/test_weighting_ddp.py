"""Every weighting method under DDP (2 CPU processes, gloo) against one process on the union batch.

The Lightning module's step is emulated in plain torch (no Trainer, to stay fast): a tiny shared
backbone ``z = tanh(Linear(6, 8)(x))`` and three linear heads whose MSE losses live on different
scales (×1, ×10, ×0.1). Each rank fills the :class:`StepContext` as ``MultiTaskModule`` does
(``training_step`` and ``_global_losses``): gradient methods get the representation detached
into a leaf, the attached features, the backbone's parameters and a summing ``all_reduce``;
loss-reading methods get each task's loss averaged over the ranks that labelled it. After
``combined.loss.backward()`` every parameter's gradient is all-reduced and divided by the world
size, as DDP does, then one SGD step is taken (three steps, so stateful methods carry state).

Checked, per method (gradient methods at every level they accept):

* both ranks compute identical weights and end with identical balancer state;
* weights, every parameter's averaged gradient (backbone, heads, balancer) and the final balancer
  state equal those of a single process stepping on the union of the two ranks' batches;
* with a task absent from rank 1 (its loss missing from rank 1's dict), both ranks still agree on
  the weights and the balancer state, and nothing hangs.

All methods run in one spawn of two processes (start-up is the slow part); the processes write
their results to files and the asserts run here, in the pytest process.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lightning_mtl.models.meeting import LEVELS, cut_meeting
from lightning_mtl.weighting import WEIGHTINGS, StepContext, build_weighting
from lightning_mtl.weighting.base import global_loss_values

TASKS = ["a", "b", "c"]
SCALES = {"a": 1.0, "b": 10.0, "c": 0.1}  # losses on different scales
WORLD = 2
PER_RANK = 4  # rank r holds samples [4r, 4r + 4) of the union batch of 8
STEPS = 3
LR = 0.05
RTOL, ATOL = 1e-4, 1e-6
TIMEOUT_S = 300  # the whole spawn; a hang fails the test instead of blocking the suite

# Arguments beyond the configs' defaults: STCH leaves its warm-up after one step (so its
# weights are exercised), static weights that are not all equal.
EXTRA: dict[str, dict[str, Any]] = {
    "stch": {"warmup_steps": 1},
    "static": {"weights": {"a": 2.0, "b": 1.0, "c": 0.5}},
}
# GradDrop draws its sign mask per element of the representation, and each rank masks only its
# own samples' elements (from a (seed, step, rank) generator): the DDP direction is the same
# random function of the global batch, not the same draw as one process on the union batch, so
# the backbone gradient cannot match by construction. Its weights (all 1) must still agree, and
# the heads, which get their own task's gradient unmasked, must match on the first step (later
# steps start from different backbones).
PER_ELEMENT_RANDOM = {"graddrop"}
# Nash-MTL's weights come from an iterative convex solver (torchjd's, cvxpy/ECOS) that stops at
# a residual of 1e-3: rounding-level changes of the Gram matrix move its weights by up to ~5e-5
# (relative; one process on the same union batch with the samples permuted deviates as much as
# DDP does), and the combined gradient by up to ~3e-5 where the tasks' gradients cancel.
TOLERANCES: dict[str, tuple[float, float]] = {"nash_mtl": (1e-3, 1e-4)}
# Known library bugs, one entry per absent-task case that fails because of one (strict: the
# entry must go once the bug is fixed). Loss-based methods take the set of tasks from the rank's
# own losses, not from the tasks some rank labelled (``context.global_losses`` not NaN), so
# with a task missing on one rank, the ranks normalise over different sets of tasks (and
# stateful ones update different entries of their state): their weights differ.
ABSENT_BUGS: dict[str, str] = {}  # methods known to disagree across ranks (none)
ABSENT_TASK = "c"  # missing from rank 1's losses in the absent-task cases


def _cases() -> list[tuple[str, str, dict[str, Any]]]:
    """(case id, method name, arguments): every method, gradient ones at each accepted level."""
    cases = []
    for name in WEIGHTINGS.names():
        factory = WEIGHTINGS.get(name, "weighting.name")
        kwargs = dict(EXTRA.get(name, {}))
        if getattr(factory, "needs_gradients", False):
            for level in LEVELS:
                if level in factory.levels:
                    cases.append((f"{name}-{level}", name, {**kwargs, "level": level}))
        else:
            cases.append((name, name, kwargs))
    # weights computed every second step and reused in between: no all-reduce on those steps
    for level in LEVELS:
        cases.append((f"mgda-every2-{level}", "mgda", {"level": level, "update_every": 2}))
    return cases


CASES = _cases()
CASE_IDS = [case[0] for case in CASES]
# the absent-task cases: every method at its default level
ABSENT_CASES = [
    (f"absent-{name}", name, kwargs)
    for case_id, name, kwargs in CASES
    if not case_id.endswith("-params") and "-every" not in case_id
]
ABSENT_PARAMS = [
    pytest.param(
        *case,
        id=case[0],
        marks=[pytest.mark.xfail(strict=True, reason=f"library bug: {ABSENT_BUGS[case[1]]}")]
        if case[1] in ABSENT_BUGS
        else [],
    )
    for case in ABSENT_CASES
]


# ------------------------------------------------------------------------------- the emulated step
def _data() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The union batch: 8 inputs and a target per task, from a fixed seed."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(WORLD * PER_RANK, 6, generator=generator)
    targets = {
        t: torch.randn(WORLD * PER_RANK, 1, generator=generator) + i for i, t in enumerate(TASKS)
    }
    return x, targets


def _model() -> tuple[nn.Module, nn.ModuleDict]:
    """Backbone and heads with a deterministic initialisation (independent of the global RNG)."""
    generator = torch.Generator().manual_seed(0)
    backbone = nn.Linear(6, 8)
    heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})
    with torch.no_grad():
        for p in [*backbone.parameters(), *heads.parameters()]:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return backbone, heads


def _step(
    weighting: Any,
    losses: dict[str, torch.Tensor],
    context: StepContext,
    named: list[tuple[str, torch.Tensor]],
    lrs: dict[str, float],
    result: dict[str, Any],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
    world_size: int,
) -> None:
    """The rest of a step, as Lightning and DDP take it: the balancer (with the global losses
    under DDP), one backward, gradients averaged over the ranks, an SGD step; the weights
    (each place's too) and the averaged gradients go to ``result``."""
    if all_reduce is not None:
        context.world_size, context.all_reduce = world_size, all_reduce
        context.rank = torch.distributed.get_rank()
        if weighting.reads_loss_values:
            context.global_losses = global_loss_values(losses, weighting.tasks, all_reduce)
    combined = weighting(losses, context)
    combined.loss.backward()
    grads = {}
    for n, p in named:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if all_reduce is not None:  # DDP: gradients averaged over the ranks
            grad = all_reduce(grad.clone()) / world_size
            p.grad = grad.clone()
        grads[n] = grad.detach().clone()
    result["grads"].append(grads)
    shown = {t: w.detach().double().clone() for t, w in combined.weights.items()}
    for place, weights in combined.places.items():
        shown.update({f"{place}/{t}": w.detach().double().clone() for t, w in weights.items()})
    result["weights"].append(shown)
    with torch.no_grad():
        for n, p in named:
            if p.grad is not None:
                p -= lrs[n] * p.grad


def _sgd_parameters(
    modules: dict[str, torch.nn.Module], weighting: torch.nn.Module
) -> tuple[list[tuple[str, torch.nn.Parameter]], dict[str, float]]:
    """The named parameters ``_step`` updates and their learning rates: plain SGD by hand
    (torch.optim's first step imports torch._dynamo: seconds per process), with the balancer's
    own learning rate where it has one (as ``MultiTaskModule.configure_optimizers``)."""
    named = [(f"{prefix}.{n}", p) for prefix, m in modules.items() for n, p in m.named_parameters()]
    named += [("weighting." + n, p) for n, p in weighting.named_parameters() if p.requires_grad]
    balancer_lr = dict(weighting.optimizer_options).get("lr", LR)
    return named, {n: balancer_lr if n.startswith("weighting.") else LR for n, _ in named}


def _train(
    name: str,
    kwargs: dict[str, Any],
    samples: slice,
    absent: tuple[str, ...] = (),
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    world_size: int = 1,
) -> dict[str, Any]:
    """STEPS steps of one method on ``samples`` of the union batch; DDP when ``all_reduce``.

    Returns each step's weights and (DDP-averaged) gradients, and the final balancer state.
    """
    x, targets = _data()
    x, targets = x[samples], {t: y[samples] for t, y in targets.items()}
    backbone, heads = _model()
    weighting = build_weighting(name, TASKS, **kwargs)
    named, lrs = _sgd_parameters({"backbone": backbone, "heads": heads}, weighting)
    result: dict[str, Any] = {"weights": [], "grads": []}
    for step in range(STEPS):
        for _, p in named:
            p.grad = None
        z = torch.tanh(backbone(x))
        # epoch = step: DWA closes an epoch each step, so its weights leave 1 on the third step
        context = StepContext(step=step, epoch=step)
        head_input = z
        if weighting.needs_gradients:  # as MultiTaskModule.training_step: the heads read a cut
            meeting = cut_meeting([z], [backbone], TASKS)
            context.meetings = [meeting]
            head_input = meeting.leaves[0]
        losses = {
            t: SCALES[t] * F.mse_loss(heads[t](head_input), targets[t])
            for t in TASKS
            if t not in absent
        }
        _step(weighting, losses, context, named, lrs, result, all_reduce, world_size)
    result["state"] = {k: v.detach().clone() for k, v in weighting.state_dict().items()}
    return result


# --------------------------------------------------------- a branching tree of meeting places
# The same agreement for a non-hard architecture: a ``branched`` tree over a tiny ViT (LayerNorm
# only: per-sample, so DDP equals one process on the union batch) with three meeting places, two
# of them nested (trunk: all tasks; branch0: seg and depth; branch1: cls and reg, which split
# again). Real architecture, heads, losses and balancer (one rule per place), in eval mode: the
# heads' BatchNorm would otherwise normalise each rank's half batch on its own.
TREE_TASKS = {
    "seg": {
        "head": {"name": "segmentation", "num_classes": 3, "decoder_channels": 8},
        "loss": "cross_entropy",
        "metrics": ["miou"],
    },
    "depth": {
        "head": {"name": "dense_regression", "decoder_channels": 8},
        "loss": "l1",
        "metrics": ["mae"],
    },
    "cls": {
        "head": {"name": "classification", "num_classes": 4},
        "loss": "cross_entropy",
        "metrics": ["accuracy"],
    },
    "reg": {"head": {"name": "regression", "out_dim": 2}, "loss": "mse", "metrics": ["mae"]},
}
TREE = {
    "name": "branched",
    "at": 2,
    "branches": [["seg", "depth"], {"at": 3, "branches": [["cls"], ["reg"]]}],
}
TREE_CASES = [
    ("tree-upgrad", "upgrad", {}),
    ("tree-upgrad-params", "upgrad", {"level": "params"}),
    ("tree-gradnorm", "gradnorm", {}),
    ("tree-nash_mtl", "nash_mtl", {}),
    ("tree-famo", "famo", {}),
]


def _tree_train(
    name: str,
    kwargs: dict[str, Any],
    samples: slice,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    world_size: int = 1,
) -> dict[str, Any]:
    """STEPS steps of ``name`` on the tree, as ``MultiTaskModule.training_step`` takes them."""
    from lightning_mtl.models.architectures import build_architecture
    from lightning_mtl.models.backbone import Backbone
    from lightning_mtl.models.net import MultiTaskNet
    from lightning_mtl.tasks import build_tasks, task_reads

    generator = torch.Generator().manual_seed(7)
    images = torch.randn(WORLD * PER_RANK, 3, 16, 16, generator=generator)[samples]
    labels = {
        "seg": torch.randint(0, 3, (WORLD * PER_RANK, 16, 16), generator=generator),
        "depth": torch.rand(WORLD * PER_RANK, 1, 16, 16, generator=generator) * 3,
        "cls": torch.randint(0, 4, (WORLD * PER_RANK,), generator=generator),
        "reg": torch.randn(WORLD * PER_RANK, 2, generator=generator) * 5,
    }
    labels = {t: y[samples] for t, y in labels.items()}
    torch.manual_seed(0)
    vit = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 4, "num_heads": 2}
    backbone = Backbone("vit_tiny_patch16_224", model_kwargs=vit)
    reads = task_reads(TREE_TASKS)
    architecture = build_architecture(TREE, backbone, reads)
    tasks = build_tasks(TREE_TASKS, {t: architecture.feature_info(t) for t in reads})
    net = MultiTaskNet(architecture, {t.name: t.head for t in tasks}).eval()
    names = [t.name for t in tasks]
    weighting = build_weighting(name, names, places=architecture.places, **kwargs)
    named, lrs = _sgd_parameters({"net": net}, weighting)
    result: dict[str, Any] = {"weights": [], "grads": []}
    for step in range(STEPS):
        for _, p in named:
            p.grad = None
        weighting.prepare(architecture.places, world_size)
        out = net.forward_features(images, cut=weighting.needs_gradients)
        outputs = net.forward_heads(out.features, images.shape[-2:])
        losses = {t.name: t.loss(outputs[t.name], labels[t.name]) for t in tasks}
        context = StepContext(step=step, epoch=step, meetings=out.meetings)
        _step(weighting, losses, context, named, lrs, result, all_reduce, world_size)
    weighting.prepare(None)
    result["state"] = {k: v.detach().clone() for k, v in weighting.state_dict().items()}
    return result


# ----------------------------------------------------------------------------- the spawned ranks
def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place, as Lightning's ``strategy.reduce(tensor, reduce_op="sum")``."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    samples = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results: dict[str, Any] = {}
    jobs = [(cid, name, kwargs, ()) for cid, name, kwargs in CASES]
    jobs += [(cid, name, kwargs, (ABSENT_TASK,)) for cid, name, kwargs in ABSENT_CASES]
    jobs += [(cid, name, kwargs, None) for cid, name, kwargs in TREE_CASES]
    try:
        for case_id, name, kwargs, absent in jobs:
            started = time.perf_counter()
            try:
                if absent is None:  # the tree
                    results[case_id] = _tree_train(
                        name, kwargs, samples, all_reduce=_all_reduce_sum, world_size=WORLD
                    )
                    continue
                results[case_id] = _train(
                    name,
                    kwargs,
                    samples,
                    absent=absent if rank == 1 else (),
                    all_reduce=_all_reduce_sum,
                    world_size=WORLD,
                )
            except Exception:
                results[case_id] = {"error": traceback.format_exc()}
            results[case_id]["seconds"] = time.perf_counter() - started
            dist.barrier()  # a case that failed on one rank only would desynchronise the rest
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both ranks' results (one spawn for all cases) and the single-process references."""
    out = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(
        _worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    started = time.perf_counter()
    # the references, while the ranks start up
    union = slice(0, WORLD * PER_RANK)
    single = {}
    for case_id, name, kwargs in CASES:
        try:
            single[case_id] = _train(name, kwargs, union)
        except Exception:
            single[case_id] = {"error": traceback.format_exc()}
    for case_id, name, kwargs in TREE_CASES:
        try:
            single[case_id] = _tree_train(name, kwargs, union)
        except Exception:
            single[case_id] = {"error": traceback.format_exc()}
    try:
        while not context.join(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - started))):
            if time.perf_counter() - started > TIMEOUT_S:
                pytest.fail(f"the DDP processes did not finish in {TIMEOUT_S} s (a hang?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"ranks": ranks, "single": single}


# ------------------------------------------------------------------------------------- the asserts
def _ok(result: dict[str, Any], who: str) -> dict[str, Any]:
    assert "error" not in result, f"{who} failed:\n{result['error']}"
    return result


def _vector(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    return {t: float(w) for t, w in weights.items()}


def _assert_states(
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    msg: str,
    tolerance: tuple[float, float] | None = None,
) -> None:
    """Balancer states equal: exactly, or floats within ``(rtol, atol)``."""
    assert a.keys() == b.keys(), msg
    for key in a:
        if tolerance is None or not a[key].is_floating_point():  # exactly (NaN: an unset entry)
            torch.testing.assert_close(
                a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=f"{msg}: state {key}"
            )
        else:
            rtol, atol = tolerance
            torch.testing.assert_close(
                a[key], b[key], rtol=rtol, atol=atol, equal_nan=True, msg=f"{msg}: state {key}"
            )


def _assert_step_matches(
    ddp: dict[str, Any],
    single: dict[str, Any],
    step: int,
    keys: Sequence[str],
    tolerance: tuple[float, float],
    compared: Callable[[int, str], bool] = lambda step, key: True,
) -> None:
    """At ``step``, rank 0's weights (``keys``) and averaged gradients equal the single
    process's; a gradient not ``compared`` is only checked to be finite."""
    rtol, atol = tolerance
    w0, ws = ddp["weights"][step], single["weights"][step]
    head = f"step {step}: weights DDP {_vector(w0)} vs one process {_vector(ws)}"
    torch.testing.assert_close(
        torch.stack([w0[k] for k in keys]),
        torch.stack([ws[k] for k in keys]),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{head}\n{m}",
    )
    for key, grad in single["grads"][step].items():
        got = ddp["grads"][step][key]
        if not compared(step, key):
            assert torch.isfinite(got).all(), f"step {step}: {key}"
            continue
        torch.testing.assert_close(
            got,
            grad,
            rtol=rtol,
            atol=atol,
            msg=lambda m, key=key: f"step {step}: gradient of {key}\n{m}",
        )


@pytest.mark.parametrize(("case_id", "name", "kwargs"), CASES, ids=CASE_IDS)
def test_ddp_weights_and_gradient_match_one_process_on_the_union_batch(
    runs: dict[str, Any], case_id: str, name: str, kwargs: dict[str, Any]
) -> None:
    rank0, rank1 = (_ok(r[case_id], f"rank {i}") for i, r in enumerate(runs["ranks"]))
    single = _ok(runs["single"][case_id], "the single process")
    rtol, atol = TOLERANCES.get(name, (RTOL, ATOL))

    def compared(step: int, key: str) -> bool:
        """Methods that draw per-element randomness agree with one process on the heads only,
        at the first step; elsewhere their gradients are only checked to be finite."""
        return name not in PER_ELEMENT_RANDOM or (step == 0 and key.startswith("heads."))

    for step in range(STEPS):
        w0, w1, ws = (r["weights"][step] for r in (rank0, rank1, single))
        assert _vector(w0) == _vector(w1), f"step {step}: the ranks disagree on the weights"
        assert w0.keys() == ws.keys() == set(TASKS), f"step {step}"
        _assert_step_matches(rank0, single, step, TASKS, (rtol, atol), compared)
    _assert_states(rank0["state"], rank1["state"], "rank 0 vs rank 1")
    if name not in PER_ELEMENT_RANDOM:
        _assert_states(rank0["state"], single["state"], "DDP vs one process", (rtol, atol))


@pytest.mark.parametrize(("case_id", "name", "kwargs"), ABSENT_PARAMS)
def test_task_absent_on_one_rank_keeps_the_ranks_in_agreement(
    runs: dict[str, Any], case_id: str, name: str, kwargs: dict[str, Any]
) -> None:
    rank0, rank1 = (_ok(r[case_id], f"rank {i}") for i, r in enumerate(runs["ranks"]))
    for step in range(STEPS):
        w0, w1 = rank0["weights"][step], rank1["weights"][step]
        assert w0.keys() == set(TASKS), f"step {step}"
        # a gradient method weights every task some rank labelled; a loss-based one only the
        # rank's own tasks, but those weights must be the same as on the other rank
        shared = w0.keys() & w1.keys()
        assert shared >= set(TASKS) - {ABSENT_TASK}, f"step {step}"
        assert {t: float(w0[t]) for t in shared} == {t: float(w1[t]) for t in shared}, (
            f"step {step}: the ranks disagree on the weights: rank 0 {_vector(w0)}, "
            f"rank 1 (without {ABSENT_TASK!r}) {_vector(w1)}"
        )
        for key, grad in rank0["grads"][step].items():
            assert torch.isfinite(grad).all(), f"step {step}: gradient of {key}"
    _assert_states(rank0["state"], rank1["state"], "rank 0 vs rank 1")


@pytest.mark.parametrize(("case_id", "name", "kwargs"), TREE_CASES, ids=[c[0] for c in TREE_CASES])
def test_a_branching_tree_under_ddp_matches_one_process_at_every_meeting_place(
    runs: dict[str, Any], case_id: str, name: str, kwargs: dict[str, Any]
) -> None:
    rank0, rank1 = (_ok(r[case_id], f"rank {i}") for i, r in enumerate(runs["ranks"]))
    single = _ok(runs["single"][case_id], "the single process")
    rtol, atol = TOLERANCES.get(name, (RTOL, ATOL))
    for step in range(STEPS):
        w0, w1, ws = (r["weights"][step] for r in (rank0, rank1, single))
        assert _vector(w0) == _vector(w1), f"step {step}: the ranks disagree on the weights"
        assert w0.keys() == ws.keys() >= set(TREE_TASKS), f"step {step}"
        if name != "famo":  # one rule per meeting place: trunk, branch0 and branch1
            assert {k.split("/")[0] for k in w0 if "/" in k} == {"trunk", "branch0", "branch1"}
        _assert_step_matches(rank0, single, step, sorted(w0), (rtol, atol))
    _assert_states(rank0["state"], rank1["state"], "rank 0 vs rank 1")
    _assert_states(rank0["state"], single["state"], "DDP vs one process", (rtol, atol))
