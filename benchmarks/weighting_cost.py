"""Per-step cost of every weighting method relative to ``equal``, side by side in one run.

Each method (and, for the gradient-based ones, each ``level``) gets its own real
:class:`~lightning_mtl.module.MultiTaskModule`: the same timm backbone and task heads, built
from the same seed, its weighting with the defaults of ``configs/weighting/<name>.yaml``, its
own AdamW optimizer (no scheduler); the gradient monitor is a Trainer callback, so it plays no
part here. A step is what Lightning's automatic optimization does,
written out without a Trainer::

    loss = module.training_step(batch, i); loss.backward(); optimizer.step(); optimizer.zero_grad()

on a few Shapes batches held in memory (data generation is not measured). The only change to
the module is a step counter in place of the Trainer's ``global_step`` (methods that read the
step, such as FAMO and the seeded random rules, see it advance); ``self.log`` without a Trainer
only warns, and those warnings are silenced.

Tasks: at 3 tasks segmentation, depth and dominant_color (``configs/task/``); at k > 3 tasks
segmentation, depth, count and k - 3 classification heads ``cls0, cls1, ...`` that all read
the dominant_color label (10 tasks: ``cls0..cls6``).

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
``torch.cuda.synchronize()`` calls).

Peak memory: the bytes of tensors alive at the worst moment of one step, i.e. what is alive at
the step's start (the module's parameters and buffers, the optimizer state, the batch) plus
the highest point the step's own allocations reach above that. On CUDA the latter is
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus what was
allocated before the step. On CPU no allocator keeps a peak, and neither the process RSS
(allocator caching, noise) nor ``tracemalloc`` (blind to torch's allocator) measures it, so
one step (after the warm-up) runs under ``torch.profiler.profile(profile_memory=True)``: every
allocation and free of the CPU allocator is recorded with its size and time, and the peak is
the maximum of their running sum. That sees exactly the tensors that gradient methods add:
the k×|z| task gradients of the representation and, at ``level=params``, the k×|θ_m| Jacobian
block of one backbone module at a time (torchjd's autogram engine; never the k×D Jacobian). Memory is deterministic, so one step per method suffices. The
representation gradients are freed before the backward pass, which (with the optimizer step)
sets the peak, so at the representation level they barely move it.

A method that refuses a level (a ``ConfigError`` when it is built) shows ``n/a``; methods
without a ``level`` argument (the loss-based ones) have one row, level ``-``.

    uv run python benchmarks/weighting_cost.py [--tasks 3 10] [--methods mgda pcgrad]
        [--levels representation params] [--rounds 4] [--steps 4] [--device cpu]
        [--threads 1] [--backbone resnet18] [--image-size 32] [--batch-size 16]

Prints a Markdown table (progress goes to stderr). Defaults are sized for a 2-core CPU: 32×32
images (not the experiments' 64) and 4 rounds of 4 steps; the full default run (24 methods,
37 variants at each of 3 and 10 tasks, about 7.5 GB of RAM) then takes about 14 minutes, most
of it in the ``level=params`` variants at 10 tasks. ``--device cuda`` measures on a GPU. Ratios
of loss-based methods, which cost nothing measurable, show the noise: within about ±0.07.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # measure.py
from lightning_mtl.errors import ConfigError
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
    paired_rounds,
    setting,
    weighting_config,
)

LEVELS = ("representation", "params")
REFERENCE = "equal"
NO_LEVEL = "-"


# ------------------------------------------------------------------------------------- configs
def task_block(count: int) -> dict[str, Any]:
    """The ``tasks:`` block for ``count`` tasks, from the task configs in ``configs/task/``."""
    if count <= 3:
        return {
            name: load_task(name) for name in ("segmentation", "depth", "dominant_color")[:count]
        }
    tasks = {name: load_task(name) for name in ("segmentation", "depth", "count")}
    classification = load_task("dominant_color")  # its target: key stays dominant_color
    tasks.update({f"cls{i}": dict(classification) for i in range(count - 3)})
    return tasks


def accepts_level(name: str) -> bool:
    factory = WEIGHTINGS.get(name, "weighting.name")
    return "level" in inspect.signature(factory).parameters


# -------------------------------------------------------------------------------------- runners
def build_runners(
    args: argparse.Namespace,
    count: int,
    variants: list[tuple[str, str | None]],
    weightings: dict[str, dict[str, Any]],
    batches: list[dict[str, Any]],
    device: torch.device,
) -> tuple[dict[tuple[str, str | None], Runner], dict[tuple[str, str | None], str]]:
    cfg = compose_train([f"model.backbone.name={args.backbone}"])
    tasks = task_block(count)
    runners: dict[tuple[str, str | None], Runner] = {}
    status: dict[tuple[str, str | None], str] = {}
    for method, level in variants:
        weighting = dict(weightings[method])
        if level is not None:
            weighting["level"] = level
        try:
            torch.manual_seed(0)  # the same initial weights for every method
            module = bench_module(cfg, tasks, weighting)
            if method == REFERENCE:
                module.check_against_batch(batches[0])  # the task blocks fit the data
            runner = Runner(module, batches, device, CLOCKS[args.clock])
            for _ in range(args.warmup):
                runner.step()
            runner.measure_memory()
        except ConfigError as err:
            status[method, level] = "n/a"
            log(f"  {count} tasks {method} {level or ''}: n/a ({err})")
            continue
        except Exception:
            status[method, level] = "error"
            log(f"  {count} tasks {method} {level or ''}: FAILED\n{traceback.format_exc()}")
            continue
        runners[method, level] = runner
    return runners, status


def measure(
    args: argparse.Namespace,
    count: int,
    variants: list[tuple[str, str | None]],
    weightings: dict[str, dict[str, Any]],
    device: torch.device,
) -> tuple[dict[tuple[str, str | None], tuple[float, float] | str], tuple[float, int]]:
    """``{(method, level): (time ratio, memory ratio) or 'n/a'/'error'}`` and equal's values."""
    batches = make_batches(args.num_batches, args.batch_size, args.image_size, device)
    start = time.perf_counter()
    runners, status = build_runners(args, count, variants, weightings, batches, device)
    elapsed = time.perf_counter() - start
    log(
        f"{count} tasks: built, warmed up and measured the memory of {len(runners)} modules in {elapsed:.0f} s"
    )
    if (REFERENCE, None) not in runners:
        raise SystemExit(f"the reference method {REFERENCE!r} failed at {count} tasks")
    equal = runners.pop((REFERENCE, None))

    def failed(key: tuple[str, str | None], trace: str) -> None:
        status[key] = "error"
        log(f"  {count} tasks {key[0]} {key[1] or ''}: FAILED\n{trace}")

    ratios = paired_rounds(
        equal, runners, args.rounds, args.steps, failed, f"{count} tasks, ", REFERENCE
    )
    results: dict[tuple[str, str | None], tuple[float, float] | str] = dict(status)
    results[REFERENCE, None] = (1.0, 1.0)
    for key, runner in runners.items():
        results[key] = (statistics.median(ratios[key]), runner.peak_bytes / equal.peak_bytes)
    reference = (equal.median, equal.peak_bytes)
    del runners, equal
    gc.collect()
    return results, reference


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=[3, 10], help="task counts")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="weighting methods (default: all registered)"
    )
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    add_measure_arguments(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # self.log without a Trainer warns on every call
    device = configure(args)

    methods = args.methods or WEIGHTINGS.names()
    for name in methods:
        WEIGHTINGS.get(name, "--methods")  # an unknown name fails with the accepted ones
    methods = [REFERENCE, *sorted(set(methods) - {REFERENCE})]
    variants: list[tuple[str, str | None]] = []
    for name in methods:
        if accepts_level(name):
            variants.extend((name, level) for level in args.levels)
        else:
            variants.append((name, None))
    weightings = {name: weighting_config(name) for name in methods}

    started = time.perf_counter()
    results, reference = {}, {}
    for count in args.tasks:
        results[count], reference[count] = measure(args, count, variants, weightings, device)

    header = ["method", "level"]
    for count in args.tasks:
        header += [f"time ×equal at {count} tasks", f"peak mem ×equal at {count} tasks"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join([":---", ":---"] + ["---:"] * (len(header) - 2)) + "|")
    notes = []
    for method, level in variants:
        row = [method, level or NO_LEVEL]
        for count in args.tasks:
            value = results[count].get((method, level), "error")
            if isinstance(value, str):
                row += [value, value]
                continue
            row += [f"{value[0]:.2f}", f"{value[1]:.2f}"]
            if level == "representation" and value[0] > 1.3:
                notes.append(f"{method} (representation) at {count} tasks: {value[0]:.2f}× equal")
        print("| " + " | ".join(row) + " |")
    print()
    equal = "; ".join(
        f"{count} tasks {ms * 1e3:.0f} ms/step, {peak / 2**20:.0f} MiB peak"
        for count, (ms, peak) in reference.items()
    )
    print(
        f"equal: {equal}. {setting(args, device)}; "
        f"time: median over {args.rounds} rounds of (median of a {args.steps}-step block) / "
        "(equal's steps around it); peak mem: tensors alive at a step's worst moment."
    )
    for note in notes:
        print(f"note: slower than 1.3× equal at the representation level: {note}")
    log(f"total wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
