"""What a multi-task model is made of: which parameters each task uses, and what a forward costs.

Architectures differ in what the tasks share: hard sharing shares the whole backbone, a branched
tree shares the trunk among all tasks and each branch among its group, soft sharing shares
little or nothing. :func:`build_report` measures it on the model itself rather than trusting
the configuration:

* **ownership**, exactly, from the autograd graph: every parameter is made to require grad for
  one forward pass of one image, and each task's output graph is walked back to the parameters
  it reaches. A parameter reached by every task is *shared*, one reached by some of them
  belongs to that *group* (``segmentation+depth``), one reached by a single task is *specific*
  to it, one reached by none is *unused* (e.g. a backbone layer no head reads). The
  ``requires_grad`` flags and the train/eval mode of every module are restored afterwards, so
  the *trainable* and *frozen* counts are those of the run (after any freezing).
* **backbone stages** (when the network has an architecture that runs the backbone stage by
  stage): each stage's modules and parameters, copies included, trainable and frozen; the
  stage numbers are those ``finetune.freeze``, branch points and expert or adapter ranges count.
* **forward FLOPs per image**, with :class:`torch.utils.flop_counter.FlopCounterMode` on a batch
  of one image in eval mode without gradients: the total and per top-level submodule
  (``architecture``, ``heads/<task>``). Only matrix products and convolutions are counted, as
  2 FLOPs per multiply-add; element-wise operations, norms, pooling and resizing are not.

Plain PyTorch (no Lightning): the :class:`~lightning_mtl.callbacks.ModelReport` callback calls it
at the start of every fit, prints it and sends :meth:`ModelReport.as_metrics` to the loggers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PREFIX = "model"


@dataclass(frozen=True)
class ParamCount:
    """A number of parameter elements, and how many of them train (``requires_grad``)."""

    total: int = 0
    trainable: int = 0

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def __add__(self, other: ParamCount) -> ParamCount:
        return ParamCount(self.total + other.total, self.trainable + other.trainable)

    @classmethod
    def of(cls, params: Sequence[nn.Parameter]) -> ParamCount:
        return cls(
            sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
        )


@dataclass
class ModelReport:
    """Parameter ownership and forward FLOPs of a multi-task network (see the module docstring).

    ``owners`` maps each set of tasks (in task order; ``()``: no task) to the parameters whose
    use is exactly that set; ``used_by`` counts, per task, every parameter its output depends
    on (shared ones included); ``flops`` is per image of ``input_shape`` (``None``: not
    measured), ``module_flops`` splits it by top-level submodule (``"heads/segmentation"``).
    """

    tasks: list[str]
    input_shape: tuple[int, ...]
    owners: dict[tuple[str, ...], ParamCount]
    used_by: dict[str, ParamCount]
    balancer: ParamCount = field(default_factory=ParamCount)
    flops: int | None = None
    module_flops: dict[str, int] = field(default_factory=dict)
    #: ``(label, parameters)`` per backbone stage, bottom-up (empty: not staged)
    stages: list[tuple[str, ParamCount]] = field(default_factory=list)

    # ----------------------------------------------------------------------------- the numbers
    @property
    def shared(self) -> ParamCount:
        """Parameters every task uses (none when there is a single task: they are its own)."""
        if len(self.tasks) < 2:
            return ParamCount()
        return self.owners.get(tuple(self.tasks), ParamCount())

    @property
    def groups(self) -> dict[tuple[str, ...], ParamCount]:
        """Parameters used by two or more tasks but not all, per exact set of tasks."""
        return {s: c for s, c in self.owners.items() if 1 < len(s) < len(self.tasks)}

    def specific(self, task: str) -> ParamCount:
        """Parameters ``task`` alone uses (its head, its branch of one, its adapters, ...)."""
        return self.owners.get((task,), ParamCount())

    @property
    def unused(self) -> ParamCount:
        """Network parameters no task output depends on."""
        return self.owners.get((), ParamCount())

    @property
    def total(self) -> ParamCount:
        """The network's parameters and the balancer's."""
        return sum(self.owners.values(), start=ParamCount()) + self.balancer

    def rows(self) -> list[tuple[str, str, ParamCount | int]]:
        """``(metric key, label, value)`` in display order: parameter counts, then FLOPs."""
        p = f"{PREFIX}/params"
        everyone = f"all {len(self.tasks)} tasks" if len(self.tasks) > 1 else "all tasks"
        rows: list[tuple[str, str, ParamCount | int]] = [
            (f"{p}/shared", f"shared by {everyone}", self.shared)
        ]
        for tasks, count in self.groups.items():
            name = "+".join(tasks)
            rows.append((f"{p}/group/{name}", f"shared by {name}", count))
        rows += [(f"{p}/task/{t}", f"{t} only", self.specific(t)) for t in self.tasks]
        rows.append((f"{p}/unused", "used by no task", self.unused))
        rows.append((f"{p}/balancer", "balancer (loss weighting)", self.balancer))
        rows.append((f"{p}/total", "total", self.total))
        rows += [(f"{p}/used_by/{t}", f"{t} (all it uses)", self.used_by[t]) for t in self.tasks]
        if self.flops is not None:
            f = f"{PREFIX}/flops_per_image"
            rows.append((f, "total", self.flops))
            rows += [(f"{f}/{name}", name, n) for name, n in self.module_flops.items()]
        return rows

    def as_metrics(self) -> dict[str, int]:
        """Flat ``{key: number}`` for the loggers: ``model/params/shared``,
        ``model/params/group/<a+b>``, ``model/params/task/<task>``, ``model/params/unused``,
        ``model/params/balancer``, ``model/params/total``, ``model/params/trainable``,
        ``model/params/frozen``, ``model/params/used_by/<task>``, ``model/flops_per_image``
        and ``model/flops_per_image/<module>``."""
        metrics: dict[str, int] = {}
        for key, _, value in self.rows():
            metrics[key] = value.total if isinstance(value, ParamCount) else value
        metrics[f"{PREFIX}/params/trainable"] = self.total.trainable
        metrics[f"{PREFIX}/params/frozen"] = self.total.frozen
        return metrics

    # ----------------------------------------------------------------------------- the display
    def _tables(self) -> Iterator[tuple[str, list[str], list[list[str]]]]:
        """``(title, header, rows)`` of each table, as text cells."""
        params: list[list[str]] = []
        used: list[list[str]] = []
        flops: list[list[str]] = []
        for key, label, value in self.rows():
            if isinstance(value, ParamCount):
                cells = [label, f"{value.total:,}", f"{value.trainable:,}", f"{value.frozen:,}"]
                (used if "/used_by/" in key else params).append(cells)
            else:
                share = f"{value / self.flops:.1%}" if self.flops else "-"
                flops.append([label, f"{value:,}", _human(value), share])
        yield "parameters by the tasks that use them", ["", "params", "trainable", "frozen"], params
        yield (
            "parameters each task's output depends on",
            ["", "params", "trainable", "frozen"],
            used,
        )
        if self.stages:
            rows = [
                [label, f"{c.total:,}", f"{c.trainable:,}", f"{c.frozen:,}"]
                for label, c in self.stages
            ]
            title = "backbone stages (copies included; what finetune.freeze and `at` count)"
            yield title, ["", "params", "trainable", "frozen"], rows
        if flops:
            size = "×".join(map(str, self.input_shape))
            title = f"forward FLOPs per image ({size}; matmuls and convolutions)"
            yield title, ["", "FLOPs", "", "share"], flops

    def format(self) -> str:
        """The report as aligned plain-text tables (for the console and the log)."""
        blocks = [f"Model report: {len(self.tasks)} tasks ({', '.join(self.tasks)})"]
        for title, header, rows in self._tables():
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
            lines = [title]
            for row in [header, *rows]:
                cells = [row[0].ljust(widths[0])]
                cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
                lines.append("  " + "  ".join(cells).rstrip())
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    def markdown(self) -> str:
        """The report as Markdown tables (the file written next to the run's logs)."""
        out = [f"# Model report\n\n{len(self.tasks)} tasks: {', '.join(self.tasks)}."]
        for title, header, rows in self._tables():
            lines = [f"## {title[0].upper()}{title[1:]}", ""]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|---" + "|--:" * (len(header) - 1) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            out.append("\n".join(lines))
        return "\n\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ measuring
def build_report(
    net: nn.Module,
    tasks: Sequence[str],
    images: torch.Tensor,
    balancer: nn.Module | None = None,
    flops: bool = True,
    stages: Sequence[tuple[str, Sequence[nn.Parameter]]] = (),
) -> ModelReport:
    """Measure ``net`` (``net(images) -> {task: output}``) on the first image of ``images``.

    ``balancer``: a module whose parameters (learned task weights) are counted apart.
    ``flops=False`` skips the FLOP count. ``stages``: ``(label, parameters)`` per backbone stage
    (:func:`backbone_stages`). The network is left as it was found: parameters'
    ``requires_grad`` flags, modules' train/eval modes; it runs in eval mode (batch norm on its
    running statistics, so a single image works) on its own device and floating dtype.
    """
    tasks = list(tasks)
    image = _one_image(net, images)
    call = _eager_call(net)
    params = list(net.parameters())
    modes = [(m, m.training) for m in net.modules()]
    try:
        net.eval()
        reached = _task_parameters(call, image, tasks, params)
        total, by_module = _count_flops(net, call, image) if flops else (None, {})
    finally:
        for module, mode in modes:
            module.training = mode

    owners: dict[tuple[str, ...], list[nn.Parameter]] = {}
    for p in params:
        key = tuple(t for t in tasks if id(p) in reached[t])
        owners.setdefault(key, []).append(p)
    # all tasks first, then groups, single tasks and no task, each in task order
    rank = {len(tasks): 0, 1: 2, 0: 3}
    order = sorted(owners, key=lambda s: (rank.get(len(s), 1), [tasks.index(t) for t in s]))
    own = set(map(id, params))
    extra = [p for p in (balancer.parameters() if balancer is not None else ()) if id(p) not in own]
    return ModelReport(
        tasks=tasks,
        input_shape=tuple(image.shape),
        owners={s: ParamCount.of(owners[s]) for s in order},
        used_by={t: ParamCount.of([p for p in params if id(p) in reached[t]]) for t in tasks},
        balancer=ParamCount.of(extra),
        flops=total,
        module_flops=by_module,
        stages=[(label, ParamCount.of(list(ps))) for label, ps in stages],
    )


def backbone_stages(net: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """``("<s>: <modules>", parameters)`` per stage of ``net.architecture`` (a
    :class:`~lightning_mtl.models.net.MultiTaskNet`) whose backbone runs stage by stage; [] for
    another network or backbone."""
    architecture = getattr(net, "architecture", None)
    names = getattr(getattr(architecture, "backbone", None), "stage_names", None)
    if architecture is None or not names or not hasattr(architecture, "stage_parameters"):
        return []
    groups = architecture.stage_parameters()
    return [(f"{s}: {names[s]}", params) for s, params in enumerate(groups) if s < len(names)]


def _one_image(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The first image, as a batch of one, on the network's device and floating dtype."""
    image = images[:1]
    reference = next((p for p in net.parameters() if p.is_floating_point()), None)
    if reference is not None:
        image = image.to(device=reference.device, dtype=reference.dtype)
    return image.detach()


def _eager_call(net: nn.Module) -> Any:
    """The network's forward; for a module compiled in place (``nn.Module.compile``) its eager
    forward, so that a report does not trigger a compilation for a batch of one."""
    if getattr(net, "_compiled_call_impl", None) is not None:
        return net.forward
    return net


def _task_parameters(
    call: Any, image: torch.Tensor, tasks: Sequence[str], params: Sequence[nn.Parameter]
) -> dict[str, set[int]]:
    """Per task, the ids of the parameters its output's autograd graph reaches, with every
    parameter made to require grad for the forward pass (the flags are restored after)."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            outputs = call(image)
            missing = [t for t in tasks if t not in outputs]
            if missing:
                raise KeyError(f"the network returned no output for the task(s) {missing}")
            return {t: _reached(_tensors(outputs[t])) for t in tasks}
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors in a task's output (a tensor, or a mapping or sequence of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, Sequence) and not isinstance(output, str):
        return [t for value in output for t in _tensors(value)]
    return []


def _reached(outputs: Sequence[torch.Tensor]) -> set[int]:
    """Ids of the leaf tensors (parameters) the autograd graph of ``outputs`` reaches: the
    parameters a gradient of these outputs would flow into."""
    found: set[int] = {id(t) for t in outputs if t.requires_grad and t.grad_fn is None}
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf's gradient sink
        if variable is not None:
            found.add(id(variable))
        stack.extend(following for following, _ in node.next_functions if following is not None)
    return found


def _count_flops(net: nn.Module, call: Any, image: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total forward FLOPs of one image, and per top-level submodule (``architecture``) and per
    entry of a top-level ``ModuleDict`` (``heads/<task>``)."""
    # depth=None: every depth (torch handles None but annotates an int)
    counter = FlopCounterMode(display=False, depth=None)  # type: ignore[arg-type]
    with torch.no_grad(), counter:
        call(image)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(net).__name__
    by_module: dict[str, int] = {}
    for name, child in net.named_children():
        if isinstance(child, nn.ModuleDict):
            for key in child:
                by_module[f"{name}/{key}"] = _module_flops(
                    counts, f"{root}.{name}.{key}", child[key]
                )
        else:
            by_module[name] = _module_flops(counts, f"{root}.{name}", child)
    return int(counter.get_total_flops()), by_module


def _module_flops(counts: Mapping[str, int], path: str, module: nn.Module) -> int:
    """The FLOPs recorded under ``path``; for a container that is never called itself (a
    ``ModuleList``), the sum of its children's."""
    if path in counts:
        return counts[path]
    return sum(_module_flops(counts, f"{path}.{n}", c) for n, c in module.named_children())


def _human(number: float) -> str:
    """1234567 -> '1.23 M'."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(number) < 1000:
            return f"{number:.3g} {unit}".rstrip()
        number /= 1000
    return f"{number:.3g} P"
