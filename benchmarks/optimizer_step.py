"""The optimizer step of single-tensor, foreach and fused AdamW, side by side in one run, and its
share of ``equal``'s full training step at the size of ``benchmarks/weighting_cost.py``.

Three real :class:`~lightning_mtl.module.MultiTaskModule` s, built as that benchmark builds its
``equal`` module (the timm backbone, here resnet18 without pretrained weights, the 3 tasks
segmentation, depth and dominant_color, ``configs/model/default.yaml``'s AdamW, no scheduler,
the same seed), differ only in ``model.optimizer_impl``: ``single`` (one tensor at a time, what
torch runs on the CPU by default), ``foreach`` (multi-tensor kernels) and ``fused`` (one kernel
for every parameter). The update is the same (``tests/test_optimizer_impl.py``); only its
speed differs.

Two measurements, both with ``benchmarks/measure.py``'s machinery (one torch thread and the
process's CPU time on the CPU, wall time between synchronisations on CUDA):

* ``optimizer.step()`` alone, on the gradients of one real step, repeated: in each of
  ``--rounds`` rounds every implementation runs ``--steps`` steps in turn (the order reversed
  every other round); the median step time.
* the full training step (``training_step``, ``backward``, ``optimizer.step``, ``zero_grad``)
  in paired rounds against ``single``: each block of ``foreach`` or ``fused`` steps between
  two ``single`` steps, its ratio the median of the block over the mean of the two; the median
  ratio over the rounds.

    uv run python benchmarks/optimizer_step.py [--rounds 4] [--steps 4] [--device cpu]
        [--threads 1] [--backbone resnet18] [--image-size 32] [--batch-size 16]

Prints a Markdown table (progress goes to stderr); about 1.5 minutes on a 2-core CPU.
An implementation torch cannot run on the device (a ``ConfigError``) shows ``n/a``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # measure.py
from lightning_mtl.errors import ConfigError
from lightning_mtl.optim import implementation_of
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
)

IMPLS = ("single", "foreach", "fused")
REFERENCE = "single"


def build(args: argparse.Namespace, device: torch.device) -> dict[str, Runner]:
    """One warmed-up runner per implementation torch can run here."""
    cfg = compose_train([f"model.backbone.name={args.backbone}"])
    tasks = {name: load_task(name) for name in ("segmentation", "depth", "dominant_color")}
    batches = make_batches(args.num_batches, args.batch_size, args.image_size, device)
    runners = {}
    for impl in IMPLS:
        torch.manual_seed(0)
        module = bench_module(cfg, tasks, {"name": "equal"}, optimizer_impl=impl)
        try:
            runner = Runner(module, batches, device, CLOCKS[args.clock])
        except ConfigError as err:
            log(f"{impl}: n/a ({err})")
            continue
        if implementation_of(runner.optimizer) != impl:
            raise SystemExit(f"{impl}: the optimizer runs {implementation_of(runner.optimizer)}")
        for _ in range(args.warmup):
            runner.step()
        runners[impl] = runner
    if REFERENCE not in runners:
        raise SystemExit(f"the reference implementation {REFERENCE!r} cannot run here")
    return runners


def time_optimizer_steps(
    runners: dict[str, Runner], rounds: int, steps: int
) -> dict[str, list[float]]:
    """Each runner's ``optimizer.step()`` times on the gradients of one real step."""
    for runner in runners.values():
        batch = runner.batches[0]
        runner.module.training_step(batch, 0).backward()  # gradients to step with, kept
    times: dict[str, list[float]] = {impl: [] for impl in runners}
    order = list(runners.items())
    for round_index in range(rounds):
        for impl, runner in order if round_index % 2 == 0 else reversed(order):
            for _ in range(steps):
                runner.sync()
                start = runner.clock()
                runner.optimizer.step()
                runner.sync()
                times[impl].append(runner.clock() - start)
    for runner in runners.values():
        runner.optimizer.zero_grad(set_to_none=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_measure_arguments(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # self.log without a Trainer warns on every call
    device = configure(args)
    started = time.perf_counter()

    runners = build(args, device)
    log(f"built and warmed up {len(runners)} modules in {time.perf_counter() - started:.0f} s")
    optimizer_times = time_optimizer_steps(runners, args.rounds, args.steps)
    log(f"timed the optimizer steps: {time.perf_counter() - started:.0f} s")
    reference = runners.pop(REFERENCE)

    def failed(key: str, trace: str) -> None:
        log(f"{key}: FAILED\n{trace}")

    ratios = paired_rounds(reference, runners, args.rounds, args.steps, failed, "", REFERENCE)
    runners[REFERENCE] = reference

    params = [p for group in reference.optimizer.param_groups for p in group["params"]]
    base = statistics.median(optimizer_times[REFERENCE])
    header = [
        "implementation",
        "optimizer.step (ms)",
        "×single",
        "full step (ms)",
        "full step ×single",
        "optimizer.step / full step",
    ]
    print("| " + " | ".join(header) + " |")
    print("|:---|" + "---:|" * (len(header) - 1))
    for impl in IMPLS:
        if impl not in runners:
            print(f"| {impl} | " + " | ".join(["n/a"] * (len(header) - 1)) + " |")
            continue
        step = statistics.median(optimizer_times[impl])
        full = runners[impl].median
        ratio = 1.0 if impl == REFERENCE else statistics.median(ratios[impl])
        cells = [f"{step * 1e3:.1f}", f"{step / base:.2f}", f"{full * 1e3:.0f}", f"{ratio:.2f}"]
        print(f"| {impl} | " + " | ".join(cells) + f" | {step / full:.0%} |")
    print()
    print(
        f"equal, 3 tasks: {len(params)} parameter tensors, {sum(p.numel() for p in params) / 1e6:.2f} M "
        f"parameters, AdamW. {setting(args, device)}; optimizer.step: median of "
        f"{args.rounds}×{args.steps} steps; full step ×single: median over {args.rounds} rounds "
        f"of (median of a {args.steps}-step block) / (single's steps around it); full step (ms): "
        "the median of all its steps."
    )
    log(f"total wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
