"""Inter-task affinity by look-ahead (Fifty et al. 2021): the formula, its NaN cases, the
grouping search, and the monitor during training (it measures, and perturbs nothing)."""

from __future__ import annotations

import copy
import csv
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import hydra
import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from torch import nn

from lightning_mtl.callbacks.task_affinity import TaskAffinityMonitor, mean_over_ranks, same_rng
from lightning_mtl.diagnostics.affinity import (
    best_groupings,
    format_affinity,
    lookahead_affinity,
    suggest_groups,
)
from tests.test_module import batch_of

# the default callbacks have it; the fast test config turns it off, this turns it back on
MONITOR = [
    "callbacks.task_affinity={_target_: lightning_mtl.callbacks.task_affinity.TaskAffinityMonitor,"
    " every_n_steps: 1}",
]
# the smallest run through the Trainer: 2 steps, no validation, nothing else measured or saved
QUICK = [
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=0",
    "callbacks.model_checkpoint=null",
    "callbacks.last_checkpoint=null",
    "callbacks.gradient_conflict=null",
    "callbacks.model_report=null",
    "callbacks.step_timer=null",
    "model.train_metrics=false",
    "preflight.mode=skip",
    "test=false",
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: these models are tiny, and on a busy machine with few cores the
    threads' spin-waiting costs more than the work (tens of times over)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the formula
def quadratic_losses(targets: dict[str, torch.Tensor]) -> Callable:
    """``L_t(θ) = ||θ − target_t||²`` for a shared θ, as ``losses_at`` wants it."""
    theta = torch.zeros(2)

    def losses_at(values: Sequence[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        point = theta if values is None else values[0]
        return {name: ((point - target) ** 2).sum() for name, target in targets.items()}

    return losses_at, theta


def test_lookahead_affinity_equals_the_hand_computed_quadratic() -> None:
    """θ = 0, targets a = b = (1, 1), c = (−1, −1): g_a = 2(θ − t_a) = (−2, −2), so
    θ − η g_a = (2η, 2η) and L_b = 2(1 − 2η)², L_c = 2(1 + 2η)², both from L = 2."""
    one = torch.ones(2)
    losses_at, theta = quadratic_losses({"a": one, "b": one, "c": -one})
    gradients = [[2 * (theta - t)] for t in (one, one, -one)]
    eta = 0.1
    z = lookahead_affinity(losses_at, ["a", "b", "c"], [theta], gradients, eta)
    helps, hurts = 1 - (1 - 2 * eta) ** 2, 1 - (1 + 2 * eta) ** 2  # 0.36 and −0.44
    expected = torch.tensor(
        [[helps, helps, hurts], [helps, helps, hurts], [hurts, hurts, helps]], dtype=torch.float64
    )
    torch.testing.assert_close(z, expected)
    assert z.dtype == torch.float64


def test_the_nan_cases_are_nan_not_errors_and_not_inf() -> None:
    theta = torch.zeros(1)

    def losses_at(values: Sequence[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        point = theta if values is None else values[0]
        return {
            "a": ((point - 1) ** 2).sum(),
            "zero": (point * 0).sum(),  # a base loss of 0: nothing to lower
            "boom": torch.tensor(math.inf) if values is not None else torch.tensor(1.0),
            # "gone" has no loss at all
        }

    names = ["a", "zero", "boom", "gone"]
    gradients = [[torch.full((1,), -2.0)], [torch.zeros(1)], [torch.ones(1)], None]
    z = lookahead_affinity(losses_at, names, [theta], gradients, 0.1)
    assert not torch.isinf(z).any()
    assert z[3].isnan().all()  # no gradient: its row
    assert z[:, 1].isnan().all() and z[:, 3].isnan().all()  # base loss 0, no loss: columns
    assert z[:3, 2].isnan().all()  # a look-ahead loss that blew up: those entries
    assert z[0, 0] == pytest.approx(1 - 0.8**2) and z[1, 0] == 0.0 and z[2, 0] < 0
    with pytest.raises(ValueError, match="lr"):
        lookahead_affinity(losses_at, names, [theta], gradients, 0.0)


class SharedNet(nn.Module):
    """A shared linear layer and one linear head per task, the heads identical at the start."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(4, 8)
        head = nn.Linear(8, 1)
        self.heads = nn.ModuleDict({t: copy.deepcopy(head) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.relu(self.shared(x))
        return {t: head(z).squeeze(-1) for t, head in self.heads.items()}


def test_tasks_built_to_help_each_other_have_positive_affinity_and_a_conflict_negative() -> None:
    """helper_a and helper_b regress targets that agree (the same signal, a little noise apart);
    rival regresses the opposite one. Z > 0 within the helping pair, < 0 with the rival, both
    ways; the best two groups are the pair and the rival alone."""
    names = ["helper_a", "rival", "helper_b"]
    net = SharedNet(names)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=generator)
    signal = x @ torch.tensor([1.0, -2.0, 0.5, 1.5]) + 3.0
    targets = {
        "helper_a": signal,
        "helper_b": signal + 0.1 * torch.randn(256, generator=generator),
        "rival": -signal,
    }
    shared = list(net.shared.parameters())
    keys = ["shared.weight", "shared.bias"]

    def losses_at(values: Sequence[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        state = {} if values is None else dict(zip(keys, values, strict=True))
        with torch.no_grad():
            outputs = torch.func.functional_call(net, state, (x,))
        return {t: nn.functional.mse_loss(outputs[t], targets[t]) for t in names}

    outputs = net(x)
    gradients = [
        torch.autograd.grad(
            nn.functional.mse_loss(outputs[t], targets[t]), shared, retain_graph=True
        )
        for t in names
    ]
    z = lookahead_affinity(losses_at, names, shared, gradients, lr=0.01)
    a, rival, b = 0, 1, 2
    assert z[a, b] > 0 and z[b, a] > 0
    assert z[a, rival] < 0 and z[rival, a] < 0 and z[b, rival] < 0 and z[rival, b] < 0
    assert (z.diagonal() > 0).all()  # a step on a task lowers its own loss
    groups, score = suggest_groups(names, z, 2)
    assert groups == [["helper_a", "helper_b"], ["rival"]]
    assert score == pytest.approx(float(z[a, b] + z[b, a]) / 3)


# --------------------------------------------------------------------------- the grouping
def partitions(items: list[int]) -> Iterator[list[list[int]]]:
    """Every set partition of ``items`` (independent of the dynamic programme under test)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in partitions(rest):
        yield [[first], *smaller]
        for i in range(len(smaller)):
            yield [*smaller[:i], [first, *smaller[i]], *smaller[i + 1 :]]


def brute_force(z: np.ndarray, n_groups: int) -> float:
    k = len(z)
    z = np.nan_to_num(z)
    best = -math.inf
    for partition in partitions(list(range(k))):
        if len(partition) != n_groups:
            continue
        total = 0.0
        for group in partition:
            for j in group:
                others = [i for i in group if i != j]
                total += sum(z[i, j] for i in others) / len(others) if others else 0.0
        best = max(best, total / k)
    return best


# rows: the task stepped on; columns: the task whose loss changes
FIXED = np.array(
    [
        [0.9, 0.3, -0.2, 0.0],
        [0.1, 0.8, -0.1, 0.2],
        [-0.4, 0.0, 0.7, 0.5],
        [0.0, 0.1, 0.3, 0.6],
    ]
)


def test_suggest_groups_matches_hand_computed_scores() -> None:
    names = ["a", "b", "c", "d"]
    # {a,b}{c,d}: a gets Z[b,a] = .1, b gets Z[a,b] = .3, c gets Z[d,c] = .3, d gets Z[c,d] = .5
    groups, score = suggest_groups(names, FIXED, 2)
    assert groups == [["a", "b"], ["c", "d"]] and score == pytest.approx(1.2 / 4)
    # one group: each task the mean over the three others, e.g. a: (.1 − .4 + 0)/3
    groups, score = suggest_groups(names, FIXED, 1)
    by_task = [(0.1 - 0.4 + 0.0) / 3, (0.3 + 0.0 + 0.1) / 3, (-0.2 - 0.1 + 0.3) / 3, 0.7 / 3]
    assert groups == [names] and score == pytest.approx(sum(by_task) / 4)
    # every task alone: 0
    assert suggest_groups(names, FIXED, 4) == ([["a"], ["b"], ["c"], ["d"]], 0.0)
    # three groups: {c,d} with a and b alone (.8/4) beats {a,b} with c, d alone (.4/4)
    assert suggest_groups(names, FIXED, 3) == ([["a"], ["b"], ["c", "d"]], pytest.approx(0.2))
    table = best_groupings(names, FIXED)
    assert [n for n, _, _ in table] == [1, 2, 3, 4]
    assert table[1] == (2, [["a", "b"], ["c", "d"]], pytest.approx(0.3))


def test_suggest_groups_is_the_best_partition_and_treats_nan_as_zero() -> None:
    rng = np.random.default_rng(0)
    for k in (3, 5, 6):
        z = rng.normal(size=(k, k))
        z[rng.random((k, k)) < 0.2] = np.nan
        names = [f"t{i}" for i in range(k)]
        for n in range(1, k + 1):
            groups, score = suggest_groups(names, z, n)
            assert score == pytest.approx(brute_force(z, n))
            assert len(groups) == n and sorted(t for g in groups for t in g) == sorted(names)
            assert suggest_groups(names, np.nan_to_num(z), n) == (groups, score)
    with pytest.raises(ValueError, match="too many"):
        suggest_groups([f"t{i}" for i in range(13)], np.zeros((13, 13)), 2)
    with pytest.raises(ValueError, match="number of groups"):
        suggest_groups(["a", "b"], np.zeros((2, 2)), 3)
    with pytest.raises(ValueError, match="2×2"):
        suggest_groups(["a", "b"], np.zeros((3, 3)), 1)


def test_format_affinity_is_a_markdown_table_with_the_groupings() -> None:
    matrix = FIXED.copy()
    matrix[0, 1] = np.nan
    text = format_affinity(["a", "b", "c", "d"], matrix, measurements=7)
    assert "| i → j | a | b | c | d |" in text and "| a → | +0.9 | n/a | -0.2 | +0 |" in text
    assert "- 2 groups: {a, b} | {c, d}" in text and "- 3 groups:" in text
    assert "7 measuring steps" in text
    assert "groups" not in format_affinity(["a"], np.ones((1, 1)))


# --------------------------------------------------------------------------- the callback
def test_arguments_are_checked() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="every_n_steps"):
            TaskAffinityMonitor(every_n_steps=bad)  # type: ignore[arg-type]
    for bad in (0.0, -1e-3, math.nan, math.inf, "0.1"):
        with pytest.raises(ValueError, match="lr"):
            TaskAffinityMonitor(lr=bad)  # type: ignore[arg-type]
    assert TaskAffinityMonitor(every_n_steps=0, lr=1).lr == 1.0


def test_the_running_mean_survives_a_state_dict_round_trip(tmp_path: Path) -> None:
    names = ["a", "b"]
    first = torch.tensor([[0.2, math.nan], [-0.1, 0.4]], dtype=torch.float64)
    second = torch.tensor([[0.4, 0.3], [0.1, 0.0]], dtype=torch.float64)
    monitor = TaskAffinityMonitor()
    assert monitor.state_dict() == {} and monitor.mean() is None
    monitor._accumulate(names, first)
    torch.save(monitor.state_dict(), tmp_path / "state.pt")
    resumed = TaskAffinityMonitor()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for m in (monitor, resumed):
        m._accumulate(names, second)
    expected = torch.tensor([[0.3, 0.3], [0.0, 0.2]], dtype=torch.float64)  # NaN: not counted
    for m in (monitor, resumed):
        got_names, mean = m.mean()
        assert got_names == names
        torch.testing.assert_close(mean, expected)


def test_same_rng_repeats_the_dropout_masks_and_leaves_the_stream_alone() -> None:
    torch.manual_seed(3)
    before = torch.get_rng_state()
    masks = []
    for _ in range(2):
        with same_rng(torch.device("cpu")):
            masks.append(nn.functional.dropout(torch.ones(64), 0.5))
    assert torch.equal(masks[0], masks[1]) and torch.equal(torch.get_rng_state(), before)


def measured(module: nn.Module, batch: dict) -> tuple[list[str], torch.Tensor]:
    module.training_step(batch, 0)
    result = TaskAffinityMonitor().measure(module, module.step_record, batch, lr=0.01)
    assert result is not None
    return result


def test_a_measurement_changes_nothing_and_both_gradient_paths_agree(
    make_cfg: Callable[..., DictConfig],
) -> None:
    """On a real module: batch-norm running statistics, parameters, gradients and the RNG are as
    before a measurement; the cut meeting (a gradient method: the chain through the detached
    leaves) gives the same matrix as the uncut one (a loss-based method)."""
    plain = hydra.utils.instantiate(make_cfg("weighting=equal").model)
    cut = hydra.utils.instantiate(make_cfg("weighting=pcgrad").model)
    cut.net.load_state_dict(plain.net.state_dict())
    batch = batch_of(4)
    plain.training_step(batch, 0)
    state = {k: v.clone() for k, v in plain.net.state_dict().items()}  # after the step's forward
    rng = torch.get_rng_state()
    names, uncut_matrix = TaskAffinityMonitor().measure(plain, plain.step_record, batch, lr=0.01)
    for key, value in plain.net.state_dict().items():
        assert torch.equal(value, state[key]), key  # running_mean/var, num_batches_tracked too
    assert any("running_mean" in key for key in state)
    assert all(p.grad is None for p in plain.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    cut_names, cut_matrix = measured(cut, batch)
    assert names == cut_names == ["segmentation", "depth", "count", "dominant_color", "colors"]
    assert uncut_matrix.isfinite().all()
    torch.testing.assert_close(cut_matrix, uncut_matrix, rtol=1e-3, atol=1e-6)
    # a task without labels in the batch: NaN in its row and its column
    batch["mask"]["depth"] = torch.zeros(4, dtype=torch.bool)
    _, matrix = measured(plain, batch)
    assert matrix[1].isnan().all() and matrix[:, 1].isnan().all()
    assert matrix[[0, 2, 3, 4]][:, [0, 2, 3, 4]].isfinite().all()
    # under DDP the absent task still gets its forward pass (SyncBatchNorm), and its NaNs
    plain.training_step(batch, 0)
    _, ranked = TaskAffinityMonitor().measure(plain, plain.step_record, batch, 0.01, world_size=2)
    torch.testing.assert_close(ranked, matrix, equal_nan=True)


def test_the_mean_over_ranks_counts_only_the_ranks_that_measured_an_entry() -> None:
    nan = math.nan
    mine = torch.tensor([[0.4, 0.1], [nan, 0.3]], dtype=torch.float64)
    theirs = torch.tensor([[0.2, nan], [nan, -0.1]], dtype=torch.float64)

    def reduce(tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        seen = ~theirs.isnan()
        return tensor + torch.stack([torch.where(seen, theirs, 0.0), seen.double()])

    trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=reduce))
    mean = mean_over_ranks(trainer, mine, torch.device("cpu"))
    expected = torch.tensor([[0.3, 0.1], [nan, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(mean, expected, equal_nan=True)


def test_a_frozen_trunk_or_a_single_task_is_skipped(make_cfg: Callable[..., DictConfig]) -> None:
    module = hydra.utils.instantiate(make_cfg().model)
    batch = batch_of(4)
    for key in batch["mask"]:
        if key != "depth":
            batch["mask"][key] = torch.zeros(4, dtype=torch.bool)
    module.training_step(batch, 0)
    assert TaskAffinityMonitor().measure(module, module.step_record, batch, 0.01) is None
    module.net.architecture.requires_grad_(False)
    batch = batch_of(4)
    module.training_step(batch, 0)
    assert TaskAffinityMonitor().measure(module, module.step_record, batch, 0.01) is None


def read_metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "csv" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("weighting", ["equal", "pcgrad"])
def test_the_monitor_logs_through_training_and_does_not_perturb_it(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, weighting: str
) -> None:
    """Two training steps measured (uncut meeting with equal, cut with pcgrad): every pair's
    column with finite values, the timing, task_affinity.md; and the trained weights are the
    same bit for bit as without the monitor (equal; pcgrad shares the code path after the
    gradients)."""
    from lightning_mtl.train import train

    out = tmp_path / "with"
    _, objects = train(make_cfg(f"weighting={weighting}", *QUICK, *MONITOR, out=out))
    rows = read_metrics(out)
    names = ["segmentation", "depth", "count", "dominant_color", "colors"]
    for a, b in itertools.product(names, names):
        values = [float(r[f"train/affinity/{a}/{b}"]) for r in rows if r[f"train/affinity/{a}/{b}"]]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (a, b)
    assert len([r for r in rows if r["perf/affinity_ms"]]) == 2
    report = (out / "task_affinity.md").read_text()
    assert "| segmentation → |" in report and "- 3 groups:" in report
    monitor = next(c for c in objects["trainer"].callbacks if isinstance(c, TaskAffinityMonitor))
    assert int(monitor.count.min()) == 2
    if weighting != "equal":
        return
    _, without = train(make_cfg(f"weighting={weighting}", *QUICK, out=tmp_path / "without"))
    trained, reference = objects["model"].state_dict(), without["model"].state_dict()
    assert trained.keys() == reference.keys()
    for key, value in trained.items():
        assert torch.equal(value, reference[key]), key


def test_each_shared_parameter_steps_at_its_optimizer_groups_learning_rate() -> None:
    """Under layer decay the backbone stages train at different rates: the look-ahead uses each
    parameter's own, and a step with any zero rate (warm-up) is not measured."""
    from types import SimpleNamespace

    first, second = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([{"params": [first], "lr": 0.1}, {"params": [second], "lr": 0.4}])
    rates = TaskAffinityMonitor()._step_size(SimpleNamespace(optimizers=[optimizer], global_step=3))
    assert rates == {id(first): 0.1, id(second): 0.4}
    optimizer.param_groups[1]["lr"] = 0.0
    assert (
        TaskAffinityMonitor()._step_size(SimpleNamespace(optimizers=[optimizer], global_step=0))
        is None
    )
    assert TaskAffinityMonitor(lr=0.3)._step_size(SimpleNamespace(optimizers=[optimizer])) == 0.3

    # L_a = |θ₁|² + |θ₂|²: the step on a with rates (0.1, 0.4) gives (0.8² + 0.2²)·2 / 4
    def losses_at(values: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        a, b = values if values is not None else (first, second)
        return {"a": (a**2).sum() + (b**2).sum()}

    gradients = [[2 * first.detach(), 2 * second.detach()]]
    z = lookahead_affinity(losses_at, ["a"], [first, second], gradients, [0.1, 0.4])
    assert float(z[0, 0]) == pytest.approx(1 - (0.8**2 + 0.2**2) * 2 / 4)
    with pytest.raises(ValueError, match="one finite number > 0 per shared parameter"):
        lookahead_affinity(losses_at, ["a"], [first, second], gradients, [0.1])
