"""Measuring machinery shared by the benchmarks that compare training steps side by side
(``weighting_cost.py``: weighting methods against ``equal``; ``architectures.py``: architectures
against ``hard``). Not a package: a script imports it after putting its own folder on
``sys.path``.

What it provides, and why it is built this way:

* :class:`BenchModule`: the real :class:`~lightning_mtl.module.MultiTaskModule` with a step
  counter standing in for the Trainer's ``global_step`` (methods that read the step, such as
  FAMO and the seeded random rules, see it advance). Built by :func:`bench_module` from the
  composed ``configs/train.yaml`` (its backbone, optimizer and ``model.optimizer_impl``: by
  default the fused AdamW where torch has one, as in training), with no scheduler.
  :func:`optimizer_line` says which implementation a runner's optimizer runs.
* :class:`Runner`: one module, its optimizer and its measurements. A step is what Lightning's
  automatic optimization does, written out without a Trainer (``training_step``, ``backward``,
  ``optimizer.step``, ``zero_grad``) on batches held in memory (data generation is not measured).
* :func:`paired_rounds`: time in alternating rounds. In each round every candidate runs a block
  of steps with one step of the reference just before and one just after it (the order of the
  candidates is reversed every other round); a block's ratio is the median of its step times
  over the mean of the two reference steps around it. The load of the machine drifts over
  seconds, so it hits both sides of every ratio alike. The result is the median ratio over the
  rounds. A runner whose steps differ by design in a cycle of N (``Runner.cycle``: a balancer
  that recomputes its weights every N steps) runs blocks of a multiple of N steps and counts
  their mean rather than their median, so each block holds the expensive step in its true share.
* Clocks: on CPU with one torch thread, a step's time is the CPU time of the process
  (``process``: user + system), which does not count the time the process waits for a core,
  so ratios stay steady when other programs load the machine (with one thread it equals wall
  time on an idle machine). Two OpenMP threads on a 2-core machine that also runs other work
  stall at their barriers (single steps then take 10 to 50 times their usual time). With more
  threads, or on CUDA, the time is wall time (on CUDA between ``torch.cuda.synchronize()``).
* Peak memory (:meth:`Runner.measure_memory`): the bytes of tensors alive at the worst moment of
  one step, i.e. what is alive at the step's start (parameters, buffers, optimizer state, the
  batch) plus the highest point the step's own allocations reach above that. On CUDA the
  latter is ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  what was allocated before the step. On CPU no allocator keeps a peak, and neither the process
  RSS (allocator caching, noise) nor ``tracemalloc`` (blind to torch's allocator) measures it,
  so one step runs under ``torch.profiler.profile(profile_memory=True)``
  (:func:`cpu_peak_of`): every allocation and free of the CPU allocator is recorded with its
  size and time, and the peak is the maximum of their running sum. Memory is deterministic:
  one step suffices.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lightning_mtl.data.shapes import SceneConfig, ShapesDataset
from lightning_mtl.module import MultiTaskModule
from lightning_mtl.optim import implementation_of
from lightning_mtl.utils.setup import CONFIG_DIR, configure_environment

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
K = TypeVar("K", bound=Hashable)


class BenchModule(MultiTaskModule):
    """The real module, with a step counter standing in for the Trainer's ``global_step``."""

    step_count = 0

    @property
    def global_step(self) -> int:
        return self.step_count


# ------------------------------------------------------------------------------------- configs
def compose_train(overrides: Sequence[str] = ()) -> Any:
    """``configs/train.yaml`` composed as the entry point does (``seed=0`` fills ``${seed}``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("train", overrides=["seed=0", *overrides])


def load_task(name: str) -> dict[str, Any]:
    """The block of one task file ``configs/task/<name>.yaml``."""
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "task" / f"{name}.yaml"))
    return dict(raw[name])


def weighting_config(name: str) -> dict[str, Any]:
    """The method's defaults from ``configs/weighting/<name>.yaml`` (just the name if none)."""
    if not (CONFIG_DIR / "weighting" / f"{name}.yaml").is_file():
        return {"name": name}
    cfg = compose_train([f"weighting={name}"])
    return OmegaConf.to_container(cfg.weighting, resolve=True)


def bench_module(
    cfg: Any,
    tasks: Mapping[str, Any],
    weighting: Mapping[str, Any],
    architecture: str | Mapping[str, Any] = "hard",
    optimizer_impl: str | None = None,
) -> BenchModule:
    """A :class:`BenchModule` with ``cfg``'s backbone and optimizer, the given tasks, weighting
    and architecture, no scheduler and no ``torch.compile``; the caller seeds torch.
    ``optimizer_impl``: ``auto``/``fused``/``foreach``/``single`` (None: ``cfg``'s)."""
    if optimizer_impl is None:
        optimizer_impl = cfg.model.get("optimizer_impl", "auto")
    return BenchModule(
        backbone=cfg.model.backbone,
        tasks=tasks,
        weighting=weighting,
        optimizer=hydra.utils.instantiate(cfg.model.optimizer),
        scheduler=None,
        architecture=architecture,
        backbone_lr_scale=cfg.model.backbone_lr_scale,
        layer_decay=cfg.model.layer_decay,
        no_decay_norm_bias=cfg.model.no_decay_norm_bias,
        train_metrics=cfg.model.train_metrics,
        compile=False,
        channels_last=False,
        optimizer_impl=optimizer_impl,
    )


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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
        #: steps of the cycle its cost repeats over (1: every step costs the same)
        self.cycle = 1

    def block_steps(self, steps: int) -> int:
        """The steps of a timed block: ``steps``, rounded up to a multiple of the cycle."""
        return -(-steps // self.cycle) * self.cycle

    def block_time(self, steps: int) -> float:
        """The time of the last block of ``steps``: the median step, or the mean over whole
        cycles."""
        last = self.times[-steps:]
        return statistics.median(last) if self.cycle == 1 else statistics.fmean(last)

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


def optimizer_line(runner: Runner) -> str:
    """E.g. ``optimizer: AdamW, fused (model.optimizer_impl=auto)``, for above a table."""
    optimizer = runner.optimizer
    impl = runner.module.hparams.get("optimizer_impl", "auto")
    return (
        f"optimizer: {type(optimizer).__name__}, {implementation_of(optimizer)} "
        f"(model.optimizer_impl={impl})"
    )


def make_batches(
    count: int, batch_size: int, image_size: int, device: torch.device
) -> list[dict[str, Any]]:
    """``count`` Shapes batches (the data seed 0), held on ``device``."""
    dataset = ShapesDataset(count * batch_size, seed=0, scene=SceneConfig(image_size=image_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return [to_device(batch, device) for batch in loader]


def paired_rounds(
    reference: Runner,
    runners: dict[K, Runner],
    rounds: int,
    steps: int,
    on_error: Callable[[K, str], None],
    label: str = "",
    reference_name: str = "reference",
) -> dict[K, list[float]]:
    """Every candidate's time ratios to ``reference``, one per round (see the module
    docstring). A candidate whose step raises is reported to ``on_error(key, traceback)`` and
    removed from ``runners``; the others keep their ratios."""
    ratios: dict[K, list[float]] = {key: [] for key in runners}
    for round_index in range(rounds):
        start = time.perf_counter()
        order = list(runners.items())
        for key, runner in order if round_index % 2 == 0 else reversed(order):
            # one step of the reference just before and one just after the block: the machine's
            # load drifts over seconds, and so hits both sides of the ratio alike
            reference.timed(1)
            block_steps = runner.block_steps(steps)
            try:
                runner.timed(block_steps)
            except Exception:
                on_error(key, traceback.format_exc())
                del runners[key], ratios[key]
                continue
            reference.timed(1)
            block = runner.block_time(block_steps)
            ratios[key].append(block / statistics.mean(reference.times[-2:]))
        log(
            f"{label}round {round_index + 1}/{rounds}: {time.perf_counter() - start:.0f} s, "
            f"{reference_name} {reference.median * 1e3:.1f} ms/step so far"
        )
    return ratios


# ---------------------------------------------------------------------------- command line
def add_measure_arguments(parser: argparse.ArgumentParser, batch_size: int = 16) -> None:
    """The options every side-by-side benchmark takes (rounds, steps, device, clock, sizes)."""
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
    parser.add_argument("--batch-size", type=int, default=batch_size)


def configure(args: argparse.Namespace) -> torch.device:
    """Apply the measuring options: the environment, torch's threads, the clock; the device."""
    configure_environment()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.clock == "auto":
        single = device.type == "cpu" and torch.get_num_threads() == 1
        args.clock = "process" if single else "wall"
    return device


def setting(args: argparse.Namespace, device: torch.device) -> str:
    """One line saying what was measured, for under a table."""
    return (
        f"{args.backbone}, {args.image_size}×{args.image_size} images, batch {args.batch_size}, "
        f"{device.type} (threads={torch.get_num_threads()}, {args.clock} time)"
    )
