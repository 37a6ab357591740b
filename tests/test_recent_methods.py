"""GO4Align and LDC-MTL against hand computations of their formulas, toys, and their corners."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import lightning_mtl.weighting.go4align
import lightning_mtl.weighting.ldc_mtl  # noqa: F401  (importing registers the method)
from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting import StepContext, build_weighting
from lightning_mtl.weighting.go4align import kmeans_1d

TASKS = ["a", "b", "c"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "weighting"


def tensors(values: dict[str, float], grad: bool = False) -> dict[str, torch.Tensor]:
    return {t: torch.tensor(v, dtype=torch.float64, requires_grad=grad) for t, v in values.items()}


def shown(result) -> dict[str, float]:
    return {t: float(w) for t, w in result.weights.items()}


def sgd(params: list[torch.Tensor], lr: float | list[float]) -> None:
    """One plain SGD step (p ← p − lr·∇p), written out: torch.optim's import costs seconds."""
    rates = lr if isinstance(lr, list) else [lr] * len(params)
    with torch.no_grad():
        for p, rate in zip(params, rates, strict=True):
            if p.grad is not None:
                p -= rate * p.grad
                p.grad = None


def sse(values: list[float], labels: list[int]) -> float:
    total = 0.0
    for g in set(labels):
        members = [v for v, lab in zip(values, labels, strict=True) if lab == g]
        mean = sum(members) / len(members)
        total += sum((v - mean) ** 2 for v in members)
    return total


def brute_force_centroids(values: list[float], groups: int) -> list[float]:
    """Each value's cluster mean under the best of all labellings into min(groups, n) clusters."""
    groups = min(groups, len(values))
    best, best_labels = math.inf, None
    for labels in itertools.product(range(groups), repeat=len(values)):
        if len(set(labels)) == groups and sse(values, list(labels)) < best - 1e-12:
            best, best_labels = sse(values, list(labels)), labels
    assert best_labels is not None
    means = {
        g: sum(v for v, lab in zip(values, best_labels, strict=True) if lab == g)
        / best_labels.count(g)
        for g in set(best_labels)
    }
    return [means[lab] for lab in best_labels]


# --------------------------------------------------------------------------------------------
# GO4Align


def test_kmeans_1d_finds_the_optimal_partition() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        values = (torch.rand(6, generator=generator) * 10).tolist()
        for groups in (1, 2, 3):
            labels = kmeans_1d(values, groups)
            assert len(set(labels)) == groups
            optimum = min(
                sse(values, list(lab))
                for lab in itertools.product(range(groups), repeat=6)
                if len(set(lab)) == groups
            )
            assert sse(values, labels) == pytest.approx(optimum, abs=1e-9)
            # clusters are numbered in increasing order of the values
            ordered = [labels[i] for i in sorted(range(6), key=lambda i: values[i])]
            assert ordered == sorted(ordered)
        assert sorted(kmeans_1d(values, 9)) == list(range(6))  # K > n: one value per cluster
    assert kmeans_1d([1.0, 1.0, 1.0], 2) == [0, 1, 1]  # ties: deterministic, non-empty clusters
    assert kmeans_1d([], 3) == []


def test_go4align_weights_match_a_hand_computation() -> None:
    """The official code's form: α ← α·exp(−η L) renormalised, β = ΣL / L, γ = β·α, K-means
    on γ, each task weighted by its cluster's mean γ."""
    tasks, eta, groups = ["a", "b", "c", "d"], 0.3, 2
    bounds = [0.0, 0.5, 0.0, -1.0]
    method = build_weighting(
        "go4align", tasks, num_groups=groups, robust_step_size=eta, min_losses=bounds
    )
    sequence = [[2.0, 0.9, 0.2, 3.0], [1.5, 1.7, 0.25, 2.0], [1.0, 0.6, 0.1, 4.0]]
    alpha = [0.25] * 4
    for step, row in enumerate(sequence):
        values = dict(zip(tasks, row, strict=True))
        inputs = tensors(values, grad=True)
        result = method(inputs, StepContext(step=step))
        distance = [v - m + 1e-8 for v, m in zip(row, bounds, strict=True)]
        alpha = [a * math.exp(-eta * d) for a, d in zip(alpha, distance, strict=True)]
        alpha = [a / sum(alpha) for a in alpha]
        gamma = [sum(distance) / d * a for d, a in zip(distance, alpha, strict=True)]
        expected = brute_force_centroids(gamma, groups)
        got = [shown(result)[t] for t in tasks]
        assert got == pytest.approx(expected, rel=1e-5)
        assert len(set(got)) == groups  # two groups of tasks sharing a weight
        assert float(result.loss.detach()) == pytest.approx(
            sum(w * v for w, v in zip(got, row, strict=True)), rel=1e-5
        )
        result.loss.backward()
        assert [float(inputs[t].grad) for t in tasks] == pytest.approx(expected, rel=1e-5)


def test_go4align_group_count_extremes() -> None:
    values = {"a": 1.0, "b": 4.0, "c": 0.5}
    total = sum(values.values())
    per_task = build_weighting("go4align", TASKS, num_groups=5, robust_step_size=0.0)
    assert shown(per_task(tensors(values))) == pytest.approx(
        {t: total / v / 3 for t, v in values.items()}, rel=1e-5
    )
    single = build_weighting("go4align", TASKS, num_groups=1, robust_step_size=0.0)
    mean = sum(total / v / 3 for v in values.values()) / 3
    assert shown(single(tensors(values))) == pytest.approx(dict.fromkeys(TASKS, mean), rel=1e-5)


PAIRS = [[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [-1.0, 1.0]]  # two pairs of nearby targets
OPPOSED = [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]  # tasks 0 and 1 symmetric about θ's path


def quadratic_toy(
    name: str, scales: list[float], targets: list[list[float]], steps: int, lr: float, **options
) -> dict:
    """Tasks sᵢ‖θ − cᵢ‖² with conflicting targets cᵢ, from θ = (0.3, 4), trained by SGD on
    combined.loss (and the balancer's parameters, at ``router_lr``)."""
    targets = torch.tensor(targets, dtype=torch.float64)
    names = [f"t{i}" for i in range(len(scales))]
    router_lr = options.pop("router_lr", None)
    method = build_weighting(name, names, **options)
    theta = torch.tensor([0.3, 4.0], dtype=torch.float64, requires_grad=True)
    params = [theta, *method.parameters()]
    rates = [lr] + [router_lr or lr] * (len(params) - 1)
    first, path = None, []
    for step in range(steps):
        losses = {
            n: s * ((theta - c) ** 2).sum() for n, s, c in zip(names, scales, targets, strict=True)
        }
        values = [float(v.detach()) for v in losses.values()]
        first = first or values
        result = method(losses, StepContext(step=step))
        result.loss.backward()
        sgd(params, rates)
        path.append(theta.detach().clone())
    return {
        "relative": [v / f for v, f in zip(values, first, strict=True)],
        "weights": [float(result.weights[n]) for n in names],
        "path": torch.stack(path),
        "method": method,
    }


def test_go4align_aligns_the_progress_of_tasks_of_very_different_scales() -> None:
    """Four tasks in two scale pairs (1, 2 and 1000, 2000). Equal weighting trains the large
    ones and leaves the small ones behind; GO4Align's scale balance makes every task lose a
    similar fraction of its initial loss, and K = 2 puts each scale pair in one group. (η = 0:
    with losses ~1e4 the official η = 1e-4 would let the alignment term dominate; it is checked
    by the hand computation above.)"""
    scales = [1.0, 2.0, 1000.0, 2000.0]
    equal = quadratic_toy("equal", scales, PAIRS, 300, 1e-4)
    ours = quadratic_toy("go4align", scales, PAIRS, 300, 1e-6, num_groups=2, robust_step_size=0.0)
    assert max(equal["relative"]) / min(equal["relative"]) > 20
    assert max(ours["relative"]) / min(ours["relative"]) < 3
    assert max(ours["relative"]) < 0.2
    w = ours["weights"]
    assert w[0] == w[1] and w[2] == w[3] and w[0] > 100 * w[2]


# --------------------------------------------------------------------------------------------
# LDC-MTL


def ldc_reference(
    losses: list[float],
    first: list[float],
    logits: list[float],
    penalty: float,
    normalization: str,
    bounds: tuple[float, float] | None = None,
) -> tuple[list[float], list[float]]:
    """dF/dL and dF/dW of F = Σσℓ̃/Σσ + λ Σ|σᵢℓ̃ᵢ − σᵢ₊₁ℓ̃ᵢ₊₁|, by autograd."""
    values = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    start = torch.tensor(first, dtype=torch.float64)
    if normalization == "initial":
        scaled = (values + 1e-8) / (start + 1e-8)
    elif normalization == "log":
        scaled = torch.log((values + 1e-8) / (start + 1e-8))
    else:
        scaled = values
    sigma = torch.softmax(w, dim=0)
    if bounds is not None:
        sigma = sigma.clamp(*bounds)
    a = sigma * scaled
    objective = a.sum() / sigma.sum() + penalty * sum(abs(a[i] - a[i + 1]) for i in range(2))
    by_loss, by_logit = torch.autograd.grad(objective, [values, w])
    return by_loss.tolist(), by_logit.tolist()


@pytest.mark.parametrize(
    ("normalization", "bounds", "logits"),
    [
        ("initial", None, [0.3, -0.2, 0.5]),
        ("log", None, [0.3, -0.2, 0.5]),
        ("none", None, [0.3, -0.2, 0.5]),
        ("initial", (0.2, 0.8), [2.0, 0.0, 0.1]),
    ],
)
def test_ldc_mtl_weights_and_router_gradient_are_those_of_the_penalised_objective(
    normalization: str, bounds: tuple[float, float] | None, logits: list[float]
) -> None:
    penalty = 0.3
    method = build_weighting(
        "ldc_mtl", TASKS, penalty=penalty, normalization=normalization, weight_bounds=bounds
    )
    with torch.no_grad():
        method.logits.copy_(torch.tensor(logits))
    first, now = [2.0, 5.0, 0.5], [1.5, 4.5, 0.2]
    method(tensors(dict(zip(TASKS, first, strict=True))), StepContext(step=0))
    method.logits.grad = None
    inputs = tensors(dict(zip(TASKS, now, strict=True)), grad=True)
    result = method(inputs, StepContext(step=1))
    by_loss, by_logit = ldc_reference(now, first, logits, penalty, normalization, bounds)
    assert [shown(result)[t] for t in TASKS] == pytest.approx(by_loss, rel=1e-5)
    assert float(result.loss.detach()) == pytest.approx(
        sum(w * v for w, v in zip(by_loss, now, strict=True)), rel=1e-5
    )
    result.loss.backward()
    assert [float(inputs[t].grad) for t in TASKS] == pytest.approx(by_loss, rel=1e-5)
    assert method.logits.grad.tolist() == pytest.approx(by_logit, rel=1e-4, abs=1e-7)


def test_ldc_mtl_is_invariant_to_loss_scales_and_balances_their_progress() -> None:
    """With the default pre-normalisation (each loss over its first value) the trajectory does
    not depend on the scale of any loss; equal weighting trains the ×1000 task and leaves the
    ×1 one behind, LDC-MTL trains the two (symmetric) tasks alike."""
    options = {"penalty": 0.05, "router_lr": 0.5}
    scaled = quadratic_toy("ldc_mtl", [1.0, 1000.0, 10.0], OPPOSED, 150, 0.05, **dict(options))
    plain = quadratic_toy("ldc_mtl", [1.0, 1.0, 1.0], OPPOSED, 150, 0.05, **dict(options))
    assert torch.allclose(scaled["path"], plain["path"], atol=1e-3)
    equal = quadratic_toy("equal", [1.0, 1000.0, 10.0], OPPOSED, 150, 1e-4)
    assert equal["relative"][1] < 0.01 * equal["relative"][0]
    first, second = scaled["relative"][:2]
    assert abs(first - second) < 0.05 * first and first < 0.3


def test_ldc_mtl_penalty_controls_the_loss_discrepancy() -> None:
    """The paper's claim: a larger penalty λ leaves a smaller discrepancy Σ|σᵢℓ̃ᵢ − σᵢ₊₁ℓ̃ᵢ₊₁|
    between the weighted normalised losses at the end of training."""

    def discrepancy(penalty: float) -> float:
        run = quadratic_toy(
            "ldc_mtl", [1.0, 1000.0, 10.0], OPPOSED, 150, 0.05, penalty=penalty, router_lr=0.5
        )
        sigma = run["method"].router_weights().detach().double()
        weighted = sigma * torch.tensor(run["relative"], dtype=torch.float64)
        return float((weighted[1:] - weighted[:-1]).abs().sum())

    assert discrepancy(0.5) < 0.1 * discrepancy(0.0)


def test_ldc_mtl_router_learns_through_the_weighting_group_options() -> None:
    assert build_weighting("ldc_mtl", TASKS).optimizer_options == {}
    method = build_weighting("ldc_mtl", TASKS, lr=0.01)
    assert method.optimizer_options == {"lr": 0.01}
    assert [n for n, _ in method.named_parameters()] == ["logits"]
    # First step: every ℓ̃ = 1, so σᵢℓ̃ᵢ = 1/3 for all, no discrepancy, wᵢ = 1/(3 Lᵢ), no router
    # gradient (the weighted losses are already equal).
    result = method(tensors({"a": 1.0, "b": 2.0, "c": 4.0}), StepContext(step=0))
    assert shown(result) == pytest.approx({"a": 1 / 3, "b": 1 / 6, "c": 1 / 12}, rel=1e-6)
    assert float(result.loss.detach()) == pytest.approx(1.0, rel=1e-6)
    result.loss.backward()
    assert method.logits.grad.abs().max() < 1e-7


# --------------------------------------------------------------------------------------------
# Corners, both methods

METHODS = ["go4align", "ldc_mtl"]


def state(method) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


@pytest.mark.parametrize("name", METHODS)
def test_one_task_present(name: str) -> None:
    method = build_weighting(name, TASKS)
    result = method(tensors({"b": 4.0}, grad=True), StepContext(step=0))
    expected = 1.0 if name == "go4align" else 1 / (4.0 + 1e-8)
    assert shown(result) == pytest.approx({"b": expected}, rel=1e-6)
    result.loss.backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in method.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_absent_task_keeps_its_state_and_the_others_are_weighted_without_it(name: str) -> None:
    method = build_weighting(
        name, TASKS, **({"robust_step_size": 0.1} if name == "go4align" else {})
    )
    twin = build_weighting(
        name, ["a", "c"], **({"robust_step_size": 0.1} if name == "go4align" else {})
    )
    method(tensors({"a": 1.0, "b": 2.0, "c": 3.0}), StepContext(step=0))
    twin.load_state_dict({k: v[[0, 2]] for k, v in method.state_dict().items()})
    before = state(method)
    for step in range(1, 5):
        values = {"a": 1.0 / step, "c": 3.0 - 0.5 * step}
        result = method(tensors(values), StepContext(step=step))
        assert shown(result) == pytest.approx(shown(twin(tensors(values), StepContext(step=step))))
        after = state(method)
        for key, value in after.items():
            assert torch.equal(value[1], before[key][1]), key  # task b untouched, bit for bit
    result = method(tensors({"a": 0.5, "b": 1.0, "c": 1.0}), StepContext(step=5))
    assert set(result.weights) == set(TASKS)
    assert all(math.isfinite(w) for w in shown(result).values())


@pytest.mark.parametrize("name", METHODS)
def test_loss_below_its_bound_is_refused_and_state_untouched(name: str) -> None:
    method = build_weighting(name, TASKS)
    method(tensors({"a": 1.0, "b": 2.0, "c": 3.0}), StepContext(step=0))
    before = state(method)
    with pytest.raises(ValueError, match=r"'b'.*-0\.5.*min_losses"):
        method(tensors({"a": 1.0, "b": -0.5, "c": 3.0}), StepContext(step=1))
    assert all(torch.equal(before[k], v) for k, v in state(method).items())
    shifted = build_weighting(name, TASKS, min_losses={"b": -1.0})
    result = shifted(tensors({"a": 1.0, "b": -0.5, "c": 3.0}), StepContext(step=0))
    assert all(math.isfinite(w) and w >= 0 for w in shown(result).values())


@pytest.mark.parametrize("name", METHODS)
def test_zero_loss_at_the_bound_gives_finite_weights(name: str) -> None:
    method = build_weighting(name, TASKS)
    for step, values in enumerate([{"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 0.0, "b": 2.0, "c": 0.0}]):
        result = method(tensors(values, grad=True), StepContext(step=step))
        assert all(math.isfinite(w) and w >= 0 for w in shown(result).values())
        assert math.isfinite(float(result.loss.detach()))
    assert all(bool(torch.isfinite(v).all()) for v in state(method).values())


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_is_skipped_without_poisoning_the_state(name: str, bad: float) -> None:
    method = build_weighting(name, TASKS)
    twin = build_weighting(name, TASKS)
    start = {"a": 1.0, "b": 2.0, "c": 3.0}
    method(tensors(start), StepContext(step=0))
    twin(tensors(start), StepContext(step=0))
    before = state(method)
    result = method(tensors({"a": 0.5, "b": bad, "c": 2.0}), StepContext(step=1))
    reference = twin(tensors({"a": 0.5, "c": 2.0}), StepContext(step=1))
    assert shown(result) == pytest.approx({**shown(reference), "b": 0.0})
    assert not math.isfinite(float(result.loss.detach()))
    for key, value in state(method).items():
        assert torch.equal(value[1], before[key][1]), key
        assert bool(torch.isfinite(value[~torch.isnan(before[key])]).all()), key
    after = method(tensors({"a": 0.4, "b": 1.5, "c": 1.0}), StepContext(step=2))
    assert all(math.isfinite(w) for w in shown(after).values())


@pytest.mark.parametrize("name", METHODS)
def test_ddp_global_losses_give_every_rank_the_same_weights_and_router_gradient(name: str) -> None:
    """Under DDP the weights (and LDC-MTL's router term) come from the global losses, also for
    tasks this rank did not label; Σ wᵢLᵢ runs over the local losses only."""
    values = {"a": 1.0, "b": 2.0, "c": 4.0}
    glob = torch.tensor([1.0, 2.0, 4.0])
    ranks = [build_weighting(name, TASKS, **({"penalty": 0.3} if name == "ldc_mtl" else {}))]
    ranks.append(build_weighting(name, TASKS, **({"penalty": 0.3} if name == "ldc_mtl" else {})))
    reference = build_weighting(name, TASKS, **({"penalty": 0.3} if name == "ldc_mtl" else {}))
    for method in [*ranks, reference]:
        with torch.no_grad():
            for p in method.parameters():
                p.copy_(torch.tensor([0.3, -0.2, 0.5]))
    for step, scale in enumerate([1.0, 0.5]):
        local = [{"a": values["a"] * scale}, {"b": values["b"] * scale, "c": values["c"] * scale}]
        context = StepContext(step=step, global_losses=glob * scale)
        expected = reference(tensors({t: v * scale for t, v in values.items()}, True), context)
        for method, mine in zip(ranks, local, strict=True):
            result = method(tensors(mine, grad=True), context)
            assert shown(result) == pytest.approx(shown(expected), rel=1e-6)
            mine_total = sum(shown(result)[t] * v for t, v in mine.items())
            assert float(result.loss.detach()) == pytest.approx(mine_total, rel=1e-6)
            result.loss.backward()
        expected.loss.backward()
    for method in ranks:
        for p, q in zip(method.parameters(), reference.parameters(), strict=True):
            assert torch.allclose(p.grad, q.grad)


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip(name: str) -> None:
    method = build_weighting(name, TASKS, min_losses=-1.0)
    with torch.no_grad():
        for p in method.parameters():
            p.copy_(torch.tensor([0.2, -0.1, 0.4]))
    for step in range(3):
        method(tensors({"a": 1.0 + step, "b": 2.0 / (step + 1), "c": 0.5}), StepContext(step=step))
    saved = method.state_dict()
    assert "min_losses" not in saved  # configuration, not state
    restored = build_weighting(name, TASKS, min_losses=-1.0)
    restored.load_state_dict(saved)
    values = {"a": 0.7, "b": 0.3, "c": 0.9}
    assert shown(restored(tensors(values), StepContext(step=3))) == shown(
        method(tensors(values), StepContext(step=3))
    )


@pytest.mark.parametrize("name", METHODS)
def test_shipped_config_builds(name: str) -> None:
    options = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    assert options.pop("name") == name
    method = build_weighting(name, TASKS, **options)
    result = method(tensors({"a": 1.0, "b": 2.0, "c": 3.0}), StepContext(step=0))
    assert set(result.weights) == set(TASKS)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("go4align", {"num_groups": 0}, "num_groups"),
        ("go4align", {"num_groups": 1.5}, "num_groups"),
        ("go4align", {"robust_step_size": -1.0}, "robust_step_size"),
        ("go4align", {"min_losses": [0.0, 1.0]}, "min_losses"),
        ("ldc_mtl", {"penalty": -0.1}, "penalty"),
        ("ldc_mtl", {"normalization": "rescaled"}, "normalization"),
        ("ldc_mtl", {"lr": 0.0}, "lr"),
        ("ldc_mtl", {"weight_bounds": [0.8, 0.2]}, "weight_bounds"),
        ("ldc_mtl", {"min_losses": {"z": 0.0}}, "min_losses"),
    ],
)
def test_bad_options_are_config_errors(name: str, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_weighting(name, TASKS, **options)
