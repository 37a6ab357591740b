"""Per-step cost of every weighting method relative to ``equal``, side by side in one run.

Each method (and, for the gradient-based ones, each ``level``) gets its own real
:class:`~lightning_mtl.module.MultiTaskModule`: the same timm backbone and task heads, built
from the same seed, its weighting with the defaults of ``configs/weighting/<name>.yaml``, its
own optimizer (``configs/model/default.yaml``'s AdamW in the implementation
``model.optimizer_impl`` picks, by default fused; ``--optimizer-impl`` forces one; the line
above the table names it) and no scheduler; the gradient monitor is a Trainer callback, so it
plays no part here. A step is what Lightning's automatic optimization does, written out
without a Trainer::

    loss = module.training_step(batch, i); loss.backward(); optimizer.step(); optimizer.zero_grad()

on a few Shapes batches held in memory (data generation is not measured). The only change to
the module is a step counter in place of the Trainer's ``global_step`` (methods that read the
step, such as FAMO and the seeded random rules, see it advance); ``self.log`` without a Trainer
only warns, and those warnings are silenced.

Tasks: at 3 tasks segmentation, depth and dominant_color (``configs/task/``); at 40 tasks
CelebA's setting, 40 binary attributes, each a 2-class linear head on the pooled vector (as in
MGDA's CelebA experiment), on labels derived from each Shapes scene's own (the colour bits, the
dominant colour's one-hot bits, count thresholds and pairwise ANDs / XORs of the colour bits;
:func:`attribute_labels`); at any other k > 3 segmentation, depth, count and k - 3
classification heads ``cls0, cls1, ...`` that all read the dominant_color label (10 tasks:
``cls0..cls6``).

Rows: every registered method (new ones appear on their own) at each level its class defines
(MGDA-UB and GradDrop: representation only; a method whose config sets ``level: params``:
params only); loss-based methods, which take no ``level``, have one row, level ``-``. With
``--update-every N`` each gradient method that can reuse its weights (not GradDrop, whose
direction is a new random function of each step's gradients) gets one more row per level, e.g.
``representation/4``: ``weighting.update_every=N`` (the weights recomputed every N steps and
reused in between); its blocks hold a multiple of N steps and count their mean, not their
median (which would hide the one step in N that recomputes), and its memory step is one that
recomputes. A variant that its method refuses (a ``ConfigError`` when it is built)
shows ``n/a``; one not measured at a task count shows ``—``.

Targets (the column ``target`` and the lines under the table): the params level at most 2.5×
equal at 3 tasks, the representation level at most 1.3× equal at 40 tasks, each read where
the run measured it. Where the params level is measured, the row ``k full backward`` is the
floor of the explicit Jacobian on the machine at hand (:class:`FloorRunner`: one forward and k
plain backward passes, nothing else), and the line under the table gives each params-level row
over it. The ghost engine (``weighting/ghost_gram.py``, taken where its plan says it is cheaper,
e.g. 32 px) skips the weight gradients of the layers it reads in those k passes, so its rows
can go below that row.

The measuring machinery (the step, the paired rounds, the clocks, the CPU peak memory) lives in
``benchmarks/measure.py``, shared with ``benchmarks/architectures.py``.

Time: every module first runs ``--warmup`` steps and the memory step below. Then, in each of
``--rounds`` rounds, every method runs a block of ``--steps`` steps, with one step of ``equal``
just before the block and one just after it (the order of the methods is reversed every other
round). A block's ratio is the median of its step times over the mean of the two ``equal``
steps around it: the load of the machine drifts over seconds, so it hits both sides of every
ratio alike. The table shows the median of a method's ratios over the rounds.
On CPU, torch runs on one thread (``--threads 1``) and a step's time is the CPU time of the
process (``--clock process``: user + system) rather than wall time: the table
reports ratios, and both choices keep them steady when other programs load the machine. With
one thread the CPU time of a step is its wall time on an idle machine, but it does not count
the time the process waits for a core. Two OpenMP threads on a 2-core machine that also runs
other work stall at their barriers (single steps then take 10 to 50 times their usual time).
With more threads, or ``--device cuda``, the time is wall time (on CUDA between
``torch.cuda.synchronize()`` calls). Process time also counts other libraries' threads: the
rules' NumPy/SciPy calls ran on OpenBLAS's two threads, whose idle worker kept spinning through
the rest of the step, so UPGrad, DualProj and CAGrad at 40 tasks read 1.38-1.45× here while
their wall time was 1.04×; the rules now hold BLAS to one thread (``single_threaded_blas``).

Peak memory: the bytes of tensors alive at the worst moment of one step, i.e. what is alive at
the step's start (the module's parameters and buffers, the optimizer state, the batch) plus
the highest point the step's own allocations reach above that. On CUDA the latter is
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus what was
allocated before the step. On CPU no allocator keeps a peak, and neither the process RSS
(allocator caching, noise) nor ``tracemalloc`` (blind to torch's allocator) measures it, so
one step (after the warm-up) runs under ``torch.profiler.profile(profile_memory=True)``: every
allocation and free of the CPU allocator is recorded with its size and time, and the peak is
the maximum of their running sum. That sees exactly the tensors that gradient methods add:
the k×|z| task gradients of the representation and, at ``level=params``, the k×D Jacobian
(where it is formed), the ghost engine's k output gradients of the layers it reads, or the
k×|θ_m| block of one module at a time (torchjd's autogram engine, above the Jacobian budget).
Memory is deterministic, so one step per method suffices. The representation gradients are
freed before the backward pass, which (with the optimizer step) sets the peak, so at the
representation level they barely move it.

    uv run python benchmarks/weighting_cost.py [--quick] [--tasks 3 10 40] [--methods mgda pcgrad]
        [--levels representation params] [--update-every 4] [--optimizer-impl auto]
        [--rounds 4] [--steps 4] [--device cpu] [--threads 1] [--backbone resnet18]
        [--image-size 32] [--batch-size 16]

Prints a Markdown table (progress goes to stderr). Defaults are sized for a 2-core CPU: 32×32
images (not the experiments' 64), 3 and 10 tasks, 4 rounds of 4 steps. ``--quick`` is the
preset that reads the targets: equal, famo, mgda, nash_mtl, pcgrad and upgrad, both levels at
3 tasks and the representation level at 40, 3 rounds of 2 steps (options given on the command
line win over the preset); it took 4.5 minutes on the 2-core CPU while other jobs loaded it
(2.5 minutes of CPU time, 1.5 of the wall minutes in imports). The full default run (every
registered method at both levels, 3 and 10 tasks; about 200 MB of RAM per variant, all of one
task count held at once) was last timed at 14 minutes with 37 variants, most of it in the
``level=params`` variants at 10 tasks; with the methods added since, expect about 20 (an
estimate, not re-timed). ``--tasks 3 10 40`` adds the 40-task block, whose params level runs
40 task gradients through the backbone per step: budget an hour for it, or give ``--levels
representation``. ``--device cuda`` measures on a GPU. Ratios of loss-based methods, which
cost nothing measurable, show the noise: within about ±0.07.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import itertools
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # measure.py
from lightning_mtl.errors import ConfigError
from lightning_mtl.optim import IMPLEMENTATIONS
from lightning_mtl.weighting import WEIGHTINGS
from measure import (
    CLOCKS,
    Runner,
    add_measure_arguments,
    bench_module,
    compose_train,
    configure,
    load_task,
    log,
    make_batches,
    optimizer_line,
    paired_rounds,
    setting,
    weighting_config,
)

LEVELS = ("representation", "params")
REFERENCE = "equal"
#: the explicit Jacobian's floor row: one forward, then each task's loss back-propagated through
#: the whole network on its own (k backward passes), the optimizer step; no G, no rule, no Jᵀw
FLOOR = "k full backward"
NO_LEVEL = "-"
NOT_RUN = "—"
#: at this many tasks, CelebA's setting: one binary head per attribute (see attribute_labels)
ATTRIBUTES = 40


@dataclass(frozen=True)
class Target:
    """A cost the issue sets: ``level``'s time at most ``limit`` × equal's at ``tasks`` tasks."""

    level: str
    tasks: int
    limit: float

    def __str__(self) -> str:
        return f"{self.level} level ≤ {self.limit:g}× equal at {self.tasks} tasks"


TARGETS = (Target("params", 3, 2.5), Target("representation", ATTRIBUTES, 1.3))


@dataclass(frozen=True)
class Quick:
    """``--quick``: enough to read the targets in under 5 minutes on a 2-core CPU."""

    methods: tuple[str, ...] = ("equal", "famo", "mgda", "nash_mtl", "pcgrad", "upgrad")
    tasks: tuple[int, ...] = (3, ATTRIBUTES)
    # the params level only where a target reads it (at 40 tasks it alone would take minutes)
    levels: tuple[tuple[int, tuple[str, ...]], ...] = ((3, LEVELS), (ATTRIBUTES, LEVELS[:1]))
    rounds: int = 3
    steps: int = 2


@dataclass(frozen=True)
class Variant:
    """One row: a method, its level (None: a loss-based method) and its ``update_every``."""

    method: str
    level: str | None = None
    update_every: int | None = None

    @property
    def label(self) -> str:
        level = self.level or NO_LEVEL
        return f"{level}/{self.update_every}" if self.update_every else level

    def weighting(self, defaults: dict[str, Any]) -> dict[str, Any]:
        config = dict(defaults)
        if self.level is not None:
            config["level"] = self.level
        if self.update_every is not None:
            config["update_every"] = self.update_every
        return config


Result = tuple[float, float] | str  # (time ratio, memory ratio), or n/a / error


# ------------------------------------------------------------------------------------- configs
def task_block(count: int) -> dict[str, Any]:
    """The ``tasks:`` block for ``count`` tasks, from the task configs in ``configs/task/``."""
    if count <= 3:
        return {
            name: load_task(name) for name in ("segmentation", "depth", "dominant_color")[:count]
        }
    if count == ATTRIBUTES:  # 2-class linear heads on the pooled vector, as in MGDA's CelebA
        attribute = load_task("dominant_color")
        attribute["head"] = {"name": "classification", "num_classes": 2, "hidden": 0}
        attribute["metrics"] = ["accuracy"]
        return {f"attr{i}": {**attribute, "target": f"attr{i}"} for i in range(count)}
    tasks = {name: load_task(name) for name in ("segmentation", "depth", "count")}
    classification = load_task("dominant_color")  # its target: key stays dominant_color
    tasks.update({f"cls{i}": dict(classification) for i in range(count - 3)})
    return tasks


def attribute_labels(targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """B×40 binary labels, each a fixed function of a Shapes scene's labels (distinct and
    correlated, like CelebA's attributes): the 6 colour bits, the 6 one-hot bits of the
    dominant colour, count > 1..4, the 15 pairwise ANDs of the colour bits and the first 9
    pairwise XORs."""
    colors = targets["colors"] > 0.5
    dominant = torch.nn.functional.one_hot(targets["dominant_color"], colors.shape[1]).bool()
    count = targets["count"][:, 0]
    more = torch.stack([count > t for t in (1, 2, 3, 4)], dim=1)
    pairs = list(itertools.combinations(range(colors.shape[1]), 2))
    both = torch.stack([colors[:, a] & colors[:, b] for a, b in pairs], dim=1)
    one = torch.stack([colors[:, a] ^ colors[:, b] for a, b in pairs[:9]], dim=1)
    labels = torch.cat([colors, dominant, more, both, one], dim=1).long()
    assert labels.shape[1] == ATTRIBUTES
    return labels


def add_attribute_labels(batches: list[dict[str, Any]]) -> None:
    """Give every batch the targets ``attr0..attr39`` (and their masks) of the 40-task block."""
    for batch in batches:
        labels = attribute_labels(batch["targets"])
        for i in range(ATTRIBUTES):
            batch["targets"][f"attr{i}"] = labels[:, i].contiguous()
            batch["mask"][f"attr{i}"] = torch.ones_like(labels[:, i], dtype=torch.bool)


def method_levels(name: str, defaults: dict[str, Any]) -> tuple[str, ...] | None:
    """The levels a method has rows at: None for a loss-based method; the class's ``levels``
    (e.g. MGDA-UB: representation only); only ``params`` where its config fixes that level."""
    factory = WEIGHTINGS.get(name, "weighting.name")
    if "level" not in inspect.signature(factory).parameters:
        return None
    if defaults.get("level") == "params":
        return ("params",)
    return tuple(level for level in LEVELS if level in getattr(factory, "levels", LEVELS))


def make_variants(
    methods: list[str],
    weightings: dict[str, dict[str, Any]],
    levels: list[str],
    update_every: int | None,
) -> list[Variant]:
    """Every row: each method at each of its levels in ``levels``, plus for the gradient
    methods that can reuse their weights one row per level with ``update_every`` (when
    given)."""
    variants = []
    for name in methods:
        own = method_levels(name, weightings[name])
        if own is None:
            variants.append(Variant(name))
            continue
        chosen = [level for level in own if level in levels]
        variants.extend(Variant(name, level) for level in chosen)
        factory = WEIGHTINGS.get(name, "weighting.name")
        if update_every and getattr(factory, "reuses_weights", True):
            variants.extend(Variant(name, level, update_every) for level in chosen)
    if any(v.level == "params" for v in variants):
        variants.insert(1, Variant(FLOOR, "params"))
    return variants


class FloorRunner(Runner):
    """The floor of the explicit Jacobian: the forward pass, then every task's loss
    back-propagated through the whole network on its own (``k`` backward passes, the gradients
    adding up into ``.grad``), then the optimizer step. A step that forms the k task gradients
    of every parameter needs at least these k passes; what it costs above this row is its own
    (G, the rule, ``Jᵀw``). The ghost engine forms G without the weight gradients of the layers
    it reads, so it can cost less than this row. Measured side by side with the methods, so the
    ratio of a backward to a forward pass on the machine at hand is in the table."""

    def step(self) -> None:
        module, index = self.module, self.module.step_count
        batch = self.batches[index % len(self.batches)]
        outputs = module(module._images(batch))
        losses = list(module.task_losses(outputs, batch)[0].values())
        for i, loss in enumerate(losses):
            loss.backward(retain_graph=i < len(losses) - 1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        module.step_count += 1


# -------------------------------------------------------------------------------------- runners
def build_runners(
    args: argparse.Namespace,
    count: int,
    variants: list[Variant],
    weightings: dict[str, dict[str, Any]],
    batches: list[dict[str, Any]],
    device: torch.device,
) -> tuple[dict[Variant, Runner], dict[Variant, str]]:
    cfg = compose_train([f"model.backbone.name={args.backbone}"])
    tasks = task_block(count)
    runners: dict[Variant, Runner] = {}
    status: dict[Variant, str] = {}
    for variant in variants:
        name = f"{count} tasks {variant.method} {variant.label}"
        try:
            torch.manual_seed(0)  # the same initial weights for every method
            floor = variant.method == FLOOR
            weighting = (
                weightings[REFERENCE] if floor else variant.weighting(weightings[variant.method])
            )
            module = bench_module(cfg, tasks, weighting, optimizer_impl=args.optimizer_impl)
            if variant.method == REFERENCE:
                module.check_against_batch(batches[0])  # the task blocks fit the data
            runner = (FloorRunner if floor else Runner)(module, batches, device, CLOCKS[args.clock])
            runner.cycle = variant.update_every or 1
            for _ in range(args.warmup):
                runner.step()
            while module.step_count % runner.cycle:  # measure a step that computes the weights
                runner.step()
            runner.measure_memory()
        except ConfigError as err:
            status[variant] = "n/a"
            log(f"  {name}: n/a ({err})")
            continue
        except Exception:
            status[variant] = "error"
            log(f"  {name}: FAILED\n{traceback.format_exc()}")
            continue
        runners[variant] = runner
    return runners, status


@dataclass
class Reference:
    """``equal``'s own figures at one task count."""

    seconds: float
    peak_bytes: int
    optimizer: str


def measure(
    args: argparse.Namespace,
    count: int,
    variants: list[Variant],
    weightings: dict[str, dict[str, Any]],
    device: torch.device,
) -> tuple[dict[Variant, Result], Reference]:
    """``{variant: (time ratio, memory ratio) or 'n/a'/'error'}`` and equal's values."""
    batches = make_batches(args.num_batches, args.batch_size, args.image_size, device)
    if count == ATTRIBUTES:
        add_attribute_labels(batches)
    start = time.perf_counter()
    runners, status = build_runners(args, count, variants, weightings, batches, device)
    elapsed = time.perf_counter() - start
    log(
        f"{count} tasks: built, warmed up and measured the memory of {len(runners)} modules "
        f"in {elapsed:.0f} s"
    )
    reference_key = Variant(REFERENCE)
    if reference_key not in runners:
        raise SystemExit(f"the reference method {REFERENCE!r} failed at {count} tasks")
    equal = runners.pop(reference_key)

    def failed(key: Variant, trace: str) -> None:
        status[key] = "error"
        log(f"  {count} tasks {key.method} {key.label}: FAILED\n{trace}")

    ratios = paired_rounds(
        equal, runners, args.rounds, args.steps, failed, f"{count} tasks, ", REFERENCE
    )
    results: dict[Variant, Result] = dict(status)
    results[reference_key] = (1.0, 1.0)
    for key, runner in runners.items():
        results[key] = (statistics.median(ratios[key]), runner.peak_bytes / equal.peak_bytes)
    reference = Reference(equal.median, equal.peak_bytes, optimizer_line(equal))
    del runners, equal
    gc.collect()
    return results, reference


# ---------------------------------------------------------------------------------------- table
def verdicts(variant: Variant, results: dict[int, dict[Variant, Result]]) -> list[str]:
    """``met`` / ``not met`` for each target that reads this row's level at a measured count."""
    out = []
    for target in TARGETS:
        value = results.get(target.tasks, {}).get(variant)
        if variant.level != target.level or not isinstance(value, tuple):
            continue
        met = "met" if value[0] <= target.limit else "not met"
        out.append(f"≤{target.limit:g}× at {target.tasks}: {met}")
    return out


def print_table(
    args: argparse.Namespace,
    variants: list[Variant],
    results: dict[int, dict[Variant, Result]],
    references: dict[int, Reference],
    device: torch.device,
) -> None:
    shown = [t for t in TARGETS if t.tasks in args.tasks]
    optimizers = sorted({ref.optimizer for ref in references.values()})
    print("; ".join(optimizers))
    print()
    header = ["method", "level"]
    for count in args.tasks:
        header += [f"time ×equal at {count} tasks", f"peak mem ×equal at {count} tasks"]
    if shown:
        header.append("target")
    print("| " + " | ".join(header) + " |")
    numbers = 2 * len(args.tasks)
    print("|" + "|".join([":---", ":---"] + ["---:"] * numbers + [":---"] * bool(shown)) + "|")
    for variant in variants:
        row = [variant.method, variant.label]
        for count in args.tasks:
            value = results[count].get(variant, NOT_RUN)
            row += [value, value] if isinstance(value, str) else [f"{v:.2f}" for v in value]
        if shown:
            row.append("; ".join(verdicts(variant, results)))
        print("| " + " | ".join(row) + " |")
    print()
    equal = "; ".join(
        f"{count} tasks {ref.seconds * 1e3:.0f} ms/step, {ref.peak_bytes / 2**20:.0f} MiB peak"
        for count, ref in references.items()
    )
    print(
        f"equal: {equal}. {setting(args, device)}; "
        f"time: median over {args.rounds} rounds of (median of a {args.steps}-step block) / "
        f"(equal's steps around it); peak mem: tensors alive at a step's worst moment; "
        f"{NOT_RUN}: not measured at that count."
    )
    for target in shown:
        rows = [
            (variant, results[target.tasks][variant])
            for variant in variants
            if variant.level == target.level
            and variant.method != FLOOR
            and isinstance(results[target.tasks].get(variant), tuple)
        ]
        missed = [f"{v.method} {v.label} {r[0]:.2f}" for v, r in rows if r[0] > target.limit]
        met = len(rows) - len(missed)
        verdict = f"not met by {', '.join(missed)}" if missed else "met by every one"
        print(f"target: {target}: {met} of {len(rows)} rows meet it; {verdict}")
        floor = results[target.tasks].get(Variant(FLOOR, "params"))
        if target.level == "params" and isinstance(floor, tuple):
            over = sorted(r[0] / floor[0] for v, r in rows if not v.update_every)
            if over:
                print(
                    f"k full backward at {target.tasks} tasks (the explicit Jacobian's floor): one "
                    f"forward + {target.tasks} backward passes = {floor[0]:.2f}× equal; the "
                    f"params-level rows (every step computing the weights) cost "
                    f"{over[0]:.2f}-{over[-1]:.2f}× that, median "
                    f"{statistics.median(over):.2f}"
                )


# ---------------------------------------------------------------------------------------- main
def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, with ``--quick``'s preset where the command line left one unset."""
    args = parser.parse_args()
    quick = Quick() if args.quick else None
    args.tasks = args.tasks or list(quick.tasks if quick else (3, 10))
    args.methods = args.methods or (list(quick.methods) if quick else None)
    args.rounds = args.rounds or (quick.rounds if quick else 4)
    args.steps = args.steps or (quick.steps if quick else 4)
    levels_at = dict(quick.levels) if quick and not args.levels else {}
    args.levels = args.levels or list(LEVELS)
    args.levels_at = {count: levels_at.get(count, tuple(args.levels)) for count in args.tasks}
    return args


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=None, help="task counts (3 10)")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="weighting methods (default: all registered)"
    )
    parser.add_argument("--levels", nargs="+", default=None, choices=LEVELS)
    parser.add_argument(
        "--update-every",
        type=int,
        default=None,
        metavar="N",
        help="also a row per gradient method and level with weighting.update_every=N",
    )
    parser.add_argument(
        "--optimizer-impl",
        choices=IMPLEMENTATIONS,
        default=None,
        help="model.optimizer_impl (default: the config's, auto)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the preset that reads the targets in < 5 min on 2 cores (see the docstring)",
    )
    add_measure_arguments(parser)
    parser.set_defaults(rounds=None, steps=None)
    args = parse(parser)
    warnings.filterwarnings("ignore")  # self.log without a Trainer warns on every call
    device = configure(args)

    methods = args.methods or WEIGHTINGS.names()
    for name in methods:
        WEIGHTINGS.get(name, "--methods")  # an unknown name fails with the accepted ones
    methods = [REFERENCE, *sorted(set(methods) - {REFERENCE})]
    weightings = {name: weighting_config(name) for name in methods}
    variants = make_variants(methods, weightings, args.levels, args.update_every)

    started = time.perf_counter()
    results: dict[int, dict[Variant, Result]] = {}
    references: dict[int, Reference] = {}
    for count in args.tasks:
        measured = [v for v in variants if v.level is None or v.level in args.levels_at[count]]
        results[count], references[count] = measure(args, count, measured, weightings, device)
    print_table(args, variants, results, references, device)
    log(f"total wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
