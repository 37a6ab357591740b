"""Per-step cost of every weighting method relative to ``equal``, side by side in one run.

Each method (and, for the gradient-based ones, each ``level``) gets its own real
:class:`~lightning_mtl.module.MultiTaskModule`: the same timm backbone and task heads, built
from the same seed, its weighting with the defaults of ``configs/weighting/<name>.yaml``, its
own AdamW optimizer (no scheduler), ``grad_monitor_every_n_steps=0`` so that the gradient
monitor does not distort the timings. A step is what Lightning's automatic optimization does,
written out without a Trainer::

    loss = module.training_step(batch, i); loss.backward(); optimizer.step(); optimizer.zero_grad()

on a few Shapes batches held in memory (data generation is not measured). The only change to
the module is a step counter in place of the Trainer's ``global_step`` (methods that read the
step, such as FAMO and the seeded random rules, see it advance); ``self.log`` without a Trainer
only warns, and those warnings are silenced.

Tasks: at 3 tasks segmentation, depth and dominant_color (``configs/task/``); at k > 3 tasks
segmentation, depth, count and k - 3 classification heads ``cls0, cls1, ...`` that all read
the dominant_color label (10 tasks: ``cls0..cls6``).

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
import contextlib
import gc
import inspect
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lightning_mtl.data.shapes import SceneConfig, ShapesDataset
from lightning_mtl.errors import ConfigError
from lightning_mtl.module import MultiTaskModule
from lightning_mtl.utils.setup import CONFIG_DIR, configure_environment
from lightning_mtl.weighting import WEIGHTINGS

LEVELS = ("representation", "params")
REFERENCE = "equal"
NO_LEVEL = "-"
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


class BenchModule(MultiTaskModule):
    """The real module, with a step counter standing in for the Trainer's ``global_step``."""

    step_count = 0

    @property
    def global_step(self) -> int:
        return self.step_count


# ------------------------------------------------------------------------------------- configs
def task_block(count: int) -> dict[str, Any]:
    """The ``tasks:`` block for ``count`` tasks, from the task configs in ``configs/task/``."""

    def load(name: str) -> dict[str, Any]:
        raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "task" / f"{name}.yaml"))
        return dict(raw[name])

    if count <= 3:
        return {name: load(name) for name in ("segmentation", "depth", "dominant_color")[:count]}
    tasks = {name: load(name) for name in ("segmentation", "depth", "count")}
    classification = load("dominant_color")  # its target: key stays dominant_color
    tasks.update({f"cls{i}": dict(classification) for i in range(count - 3)})
    return tasks


def compose_train(overrides: list[str]) -> Any:
    """``configs/train.yaml`` composed as the entry point does (``seed=0`` fills ``${seed}``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("train", overrides=["seed=0", *overrides])


def weighting_config(name: str) -> dict[str, Any]:
    """The method's defaults from ``configs/weighting/<name>.yaml`` (just the name if none)."""
    if not (CONFIG_DIR / "weighting" / f"{name}.yaml").is_file():
        return {"name": name}
    cfg = compose_train([f"weighting={name}"])
    return OmegaConf.to_container(cfg.weighting, resolve=True)


def accepts_level(name: str) -> bool:
    factory = WEIGHTINGS.get(name, "weighting.name")
    return "level" in inspect.signature(factory).parameters


# ------------------------------------------------------------------------------------- helpers
def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    return value


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors_in(item)


def storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def quiet_fds() -> Iterator[None]:
    """Silence the C++ profiler's own prints (kineto writes to fds 1 and 2 directly)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def cpu_peak_of(fn: Any) -> int:
    """The highest running sum of CPU allocations minus frees while ``fn()`` runs, in bytes."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with quiet_fds(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    if not events:
        raise RuntimeError("the profiler recorded no allocation: cannot measure CPU memory")
    events.sort()
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return peak


# -------------------------------------------------------------------------------------- runner
class Runner:
    """One module, its optimizer and its measurements."""

    def __init__(
        self,
        module: BenchModule,
        batches: Sequence[dict[str, Any]],
        device: torch.device,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.module = module.to(device).train()
        self.optimizer = module.configure_optimizers()
        self.batches, self.device, self.clock = batches, device, clock
        self.times: list[float] = []
        self.peak_bytes = 0

    def step(self) -> None:
        index = self.module.step_count
        batch = self.batches[index % len(self.batches)]
        loss = self.module.training_step(batch, index)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.module.step_count += 1

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, steps: int) -> None:
        for _ in range(steps):
            self.sync()
            start = self.clock()
            self.step()
            self.sync()
            self.times.append(self.clock() - start)

    def resident_bytes(self) -> int:
        """What is alive at a step's start: parameters, buffers, optimizer state, the batch."""
        state = [tensors_in(dict(s)) for s in self.optimizer.state.values()]
        return storage_bytes(
            tensor
            for source in (
                self.module.parameters(),
                self.module.buffers(),
                *state,
                tensors_in(self.batches[self.module.step_count % len(self.batches)]),
            )
            for tensor in source
        )

    def measure_memory(self) -> None:
        resident = self.resident_bytes()
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.step()
            self.sync()
            extra = torch.cuda.max_memory_allocated(self.device) - before
        else:
            extra = cpu_peak_of(self.step)
        self.peak_bytes = resident + extra

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def make_batches(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    dataset = ShapesDataset(
        args.num_batches * args.batch_size, seed=0, scene=SceneConfig(image_size=args.image_size)
    )
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    return [to_device(batch, device) for batch in loader]


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
            module = BenchModule(
                backbone=cfg.model.backbone,
                tasks=tasks,
                weighting=weighting,
                optimizer=hydra.utils.instantiate(cfg.model.optimizer),
                scheduler=None,
                backbone_lr_scale=cfg.model.backbone_lr_scale,
                train_metrics=cfg.model.train_metrics,
                compile=False,
                grad_monitor_every_n_steps=0,
            )
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
    batches = make_batches(args, device)
    start = time.perf_counter()
    runners, status = build_runners(args, count, variants, weightings, batches, device)
    elapsed = time.perf_counter() - start
    log(
        f"{count} tasks: built, warmed up and measured the memory of {len(runners)} modules in {elapsed:.0f} s"
    )
    if (REFERENCE, None) not in runners:
        raise SystemExit(f"the reference method {REFERENCE!r} failed at {count} tasks")
    equal = runners.pop((REFERENCE, None))
    ratios: dict[tuple[str, str | None], list[float]] = {key: [] for key in runners}
    for round_index in range(args.rounds):
        start = time.perf_counter()
        order = list(runners.items())
        for key, runner in order if round_index % 2 == 0 else reversed(order):
            # one step of equal just before and one just after the block: the machine's load
            # drifts over seconds, and so hits both sides of the ratio alike
            equal.timed(1)
            try:
                runner.timed(args.steps)
            except Exception:
                status[key] = "error"
                log(f"  {count} tasks {key[0]} {key[1] or ''}: FAILED\n{traceback.format_exc()}")
                del runners[key], ratios[key]
                continue
            equal.timed(1)
            block = statistics.median(runner.times[-args.steps :])
            ratios[key].append(block / statistics.mean(equal.times[-2:]))
        log(
            f"{count} tasks, round {round_index + 1}/{args.rounds}: "
            f"{time.perf_counter() - start:.0f} s, equal {equal.median * 1e3:.1f} ms/step so far"
        )
    results: dict[tuple[str, str | None], tuple[float, float] | str] = dict(status)
    results[REFERENCE, None] = (1.0, 1.0)
    for key, runner in runners.items():
        results[key] = (statistics.median(ratios[key]), runner.peak_bytes / equal.peak_bytes)
    reference = (equal.median, equal.peak_bytes)
    del runners, equal
    gc.collect()
    return results, reference


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per round")
    parser.add_argument(
        "--warmup", type=int, default=1, help="steps before the memory step and the rounds"
    )
    parser.add_argument("--num-batches", type=int, default=4, help="batches held in memory")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument(
        "--clock",
        choices=["auto", *CLOCKS],
        default="auto",
        help="step time: wall, or the process's CPU time (auto: process on 1 CPU thread, else wall)",
    )
    parser.add_argument("--backbone", default="resnet18", help="any timm model name")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # self.log without a Trainer warns on every call
    configure_environment()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.clock == "auto":
        single = device.type == "cpu" and torch.get_num_threads() == 1
        args.clock = "process" if single else "wall"

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
        f"equal: {equal}. {args.backbone}, {args.image_size}×{args.image_size} images, batch "
        f"{args.batch_size}, {device.type} (threads={torch.get_num_threads()}, {args.clock} "
        f"time); time: median over {args.rounds} rounds of (median of a {args.steps}-step block) / "
        "(equal's steps around it); peak mem: tensors alive at a step's worst moment."
    )
    for note in notes:
        print(f"note: slower than 1.3× equal at the representation level: {note}")
    log(f"total wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
