"""Per-step cost of every architecture relative to ``hard``, side by side in one run.

Each architecture (``configs/architecture/<name>.yaml``, its defaults) gets its own real
:class:`~lightning_mtl.module.MultiTaskModule`: the same timm backbone, the default run's five
Shapes tasks (segmentation, depth, count, dominant_color, colors: the ``tasks:`` block of
``configs/train.yaml``, or ``--tasks``), the same weighting (``--weighting``, its defaults from
``configs/weighting/``; ``--level`` for a gradient method), built from the same seed, with its
own AdamW optimizer (no scheduler). A step is what Lightning's automatic optimization does,
without a Trainer, on Shapes batches held in memory::

    loss = module.training_step(batch, i); loss.backward(); optimizer.step(); optimizer.zero_grad()

How time and memory are measured is ``benchmarks/measure.py`` (shared with
``weighting_cost.py``): every module first runs ``--warmup`` steps and one memory step; then in
each of ``--rounds`` rounds every architecture runs a block of ``--steps`` steps between two
steps of ``hard``, and its ratio is the median of the block over the mean of the two ``hard``
steps (the table: the median over the rounds). On CPU, one torch thread and process CPU time
(``--threads 1``, ``--clock process``), so the ratios hold on a loaded machine. Peak memory: the
bytes of tensors alive at a step's worst moment (parameters, buffers, optimizer state, batch,
plus the step's own highest point; on CPU through the profiler's allocation events).

Parameters (total, trainable: the adapters' frozen backbone does not train) and forward FLOPs
per image come from the project's model report (:func:`lightning_mtl.model_report.build_report`,
matrix products and convolutions only, on one image of the benchmark's size). An architecture
that refuses the setting (a ``ConfigError`` when it is built, e.g. a gradient method at
``level=representation`` on ``cross_stitch``) shows ``n/a``.

    uv run python benchmarks/architectures.py [--architectures hard mtan ple]
        [--weighting equal | --weighting upgrad --level params] [--backbone resnet18]
        [--image-size 32] [--batch-size 16] [--rounds 4] [--steps 4] [--device cpu]

Prints a Markdown table (progress goes to stderr). Defaults are sized for a 2-core CPU: 32×32
images (the experiments use 64×64), batch 16, 4 rounds of 4 steps. ``--device cuda`` measures
on a GPU (wall time between synchronizations, peak from the CUDA allocator).
"""

from __future__ import annotations

import argparse
import gc
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
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # measure.py
from lightning_mtl.errors import ConfigError
from lightning_mtl.model_report import build_report
from lightning_mtl.models.architectures import ARCHITECTURES
from lightning_mtl.weighting import WEIGHTINGS
from measure import (
    CLOCKS,
    Runner,
    add_measure_arguments,
    bench_module,
    compose_train,
    configure,
    log,
    make_batches,
    paired_rounds,
    setting,
    weighting_config,
)

REFERENCE = "hard"


def default_order(names: list[str]) -> list[str]:
    """``hard`` first, then the others in the registry's order."""
    return [REFERENCE, *sorted(set(names) - {REFERENCE})]


def build_runners(
    args: argparse.Namespace,
    cfg: Any,
    tasks: dict[str, Any],
    weighting: dict[str, Any],
    batches: list[dict[str, Any]],
    device: torch.device,
) -> tuple[dict[str, Runner], dict[str, str], dict[str, tuple[int, int, int | None]]]:
    """A warmed-up runner with its peak memory per architecture; ``n/a``/``error`` for those
    that could not be built; ``(params, trainable, flops per image)`` from the model report."""
    runners: dict[str, Runner] = {}
    status: dict[str, str] = {}
    sizes: dict[str, tuple[int, int, int | None]] = {}
    for name in args.architectures:
        try:
            torch.manual_seed(0)  # the same initial weights wherever the modules match
            module = bench_module(cfg, tasks, weighting, architecture=name)
            if name == REFERENCE:
                module.check_against_batch(batches[0])  # the task blocks fit the data
            report = build_report(
                module.net,
                [task.name for task in module.tasks],
                batches[0]["image"],
                balancer=module.weighting,
                flops=True,
            )
            sizes[name] = (report.total.total, report.total.trainable, report.flops)
            runner = Runner(module, batches, device, CLOCKS[args.clock])
            for _ in range(args.warmup):
                runner.step()
            runner.measure_memory()
        except ConfigError as err:
            status[name] = "n/a"
            log(f"  {name}: n/a ({err})")
            continue
        except Exception:
            status[name] = "error"
            log(f"  {name}: FAILED\n{traceback.format_exc()}")
            continue
        runners[name] = runner
        log(f"  {name}: built, warmed up, {runner.peak_bytes / 2**20:.0f} MiB peak")
    return runners, status, sizes


def measure(
    args: argparse.Namespace, weighting: dict[str, Any], device: torch.device
) -> tuple[dict[str, tuple[float, float] | str], dict[str, tuple[int, int, int | None]], Runner]:
    """``{architecture: (time ratio, memory ratio) or 'n/a'/'error'}``, the model sizes, and
    the reference's runner (its absolute step time and peak)."""
    overrides = [f"model.backbone.name={args.backbone}"]
    if args.tasks:
        overrides.append(f"task=[{','.join(args.tasks)}]")
    cfg = compose_train(overrides)
    tasks = OmegaConf.to_container(cfg.tasks, resolve=True)
    log(f"tasks: {', '.join(tasks)}; weighting: {weighting}")
    batches = make_batches(args.num_batches, args.batch_size, args.image_size, device)
    start = time.perf_counter()
    runners, status, sizes = build_runners(args, cfg, tasks, weighting, batches, device)
    log(f"built {len(runners)} modules in {time.perf_counter() - start:.0f} s")
    if REFERENCE not in runners:
        raise SystemExit(f"the reference architecture {REFERENCE!r} failed: {status}")
    hard = runners.pop(REFERENCE)

    def failed(name: str, trace: str) -> None:
        status[name] = "error"
        log(f"  {name}: FAILED\n{trace}")

    ratios = paired_rounds(hard, runners, args.rounds, args.steps, failed, "", REFERENCE)
    results: dict[str, tuple[float, float] | str] = dict(status)
    results[REFERENCE] = (1.0, 1.0)
    for name, runner in runners.items():
        results[name] = (statistics.median(ratios[name]), runner.peak_bytes / hard.peak_bytes)
    del runners
    gc.collect()
    return results, sizes, hard


def table(
    names: list[str],
    results: dict[str, tuple[float, float] | str],
    sizes: dict[str, tuple[int, int, int | None]],
) -> list[str]:
    """The Markdown table's lines."""
    header = [
        "architecture",
        "params (M)",
        "trainable (M)",
        "MFLOPs/image",
        f"time ×{REFERENCE}",
        f"peak mem ×{REFERENCE}",
    ]
    lines = ["| " + " | ".join(header) + " |", "|:---|" + "---:|" * (len(header) - 1)]
    for name in names:
        total, trainable, flops = sizes.get(name, (None, None, None))
        row = [
            name,
            f"{total / 1e6:.2f}" if total is not None else "—",
            f"{trainable / 1e6:.2f}" if trainable is not None else "—",
            f"{flops / 1e6:.1f}" if flops is not None else "—",
        ]
        value = results.get(name, "error")
        row += [value, value] if isinstance(value, str) else [f"{value[0]:.2f}", f"{value[1]:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--architectures", nargs="+", default=None, help="default: every registered one"
    )
    parser.add_argument("--weighting", default="equal", help="a method of configs/weighting/")
    parser.add_argument(
        "--level", default=None, help="a gradient method's level (default: its config's)"
    )
    parser.add_argument(
        "--tasks", nargs="+", default=None, help="task files (default: the default run's five)"
    )
    add_measure_arguments(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # self.log without a Trainer warns on every call
    device = configure(args)

    names = args.architectures or ARCHITECTURES.names()
    for name in names:
        ARCHITECTURES.get(name, "--architectures")  # an unknown name fails with the accepted ones
    args.architectures = default_order(names)
    WEIGHTINGS.get(args.weighting, "--weighting")
    weighting = weighting_config(args.weighting)
    if args.level is not None:
        weighting["level"] = args.level

    started = time.perf_counter()
    results, sizes, hard = measure(args, weighting, device)
    print("\n".join(table(args.architectures, results, sizes)))
    print()
    method = weighting["name"] + (f" (level={weighting['level']})" if "level" in weighting else "")
    print(
        f"{REFERENCE}: {hard.median * 1e3:.0f} ms/step, {hard.peak_bytes / 2**20:.0f} MiB peak. "
        f"{setting(args, device)}, weighting {method}; time: median over {args.rounds} rounds "
        f"of (median of a {args.steps}-step block) / ({REFERENCE}'s steps around it); peak mem: "
        "tensors alive at a step's worst moment; FLOPs: forward, per image, matmuls and "
        "convolutions."
    )
    log(f"total wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
