"""The optimizer's implementation (``model.optimizer_impl``, :func:`build_optimizer`): torch's
Adam, AdamW, SGD and Adagrad can update every parameter in one fused kernel (``fused=True``), in
a few multi-tensor kernels (``foreach=True``) or one tensor at a time (both off); the update is
the same, only its speed differs. ``auto`` (the default) takes ``fused`` where torch supports it
for the parameters' device and dtype, else ``foreach`` where torch would pick it itself, else the
single-tensor loop; ``fused``, ``foreach`` and ``single`` force one, and a forced choice torch
cannot run is a :class:`~lightning_mtl.errors.ConfigError` before the first step. Any
``_partial_`` optimizer works: the options are passed only where its signature takes them, and a
``fused:`` or ``foreach:`` written under ``model.optimizer`` wins over ``model.optimizer_impl``.
Support is asked of torch itself: its own device lists (``_default_to_fused_or_foreach``, the
helper behind its default), then one step of the configured optimizer on a two-element tensor of
each (device, dtype) of the parameters, which catches what the lists do not say (complex
parameters have no fused kernel; ``differentiable=True`` rules fused out; a class may lack a
kernel for a listed device). The optimizer state is the
same in every implementation, so a checkpoint resumes under any of them: the loaded state keeps
the run's implementation rather than the checkpoint's (:func:`keep_implementation`).
With ``precision=16-mixed`` and ``trainer.gradient_clip_val`` a fused optimizer is left out:
it unscales the gradients inside its step, and Lightning refuses to clip them before that.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lightning_mtl.errors import ConfigError

log = logging.getLogger(__name__)

#: the values of ``model.optimizer_impl``
IMPLEMENTATIONS = ("auto", "fused", "foreach", "single")
#: the torch optimizer arguments that select the implementation
IMPL_ARGS = ("fused", "foreach")
IMPL_KEY = "model.optimizer_impl"

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def _class_name(make_optimizer: OptimizerFactory) -> str:
    factory = getattr(make_optimizer, "func", make_optimizer)
    return f"{getattr(factory, '__module__', '')}.{getattr(factory, '__qualname__', factory)}"


def _arguments(make_optimizer: OptimizerFactory) -> tuple[set[str], dict[str, Any]]:
    """(the keyword arguments the optimizer takes, the implementation ones its config set)."""
    try:
        accepted = set(inspect.signature(make_optimizer).parameters)
    except (TypeError, ValueError):  # a callable without a readable signature
        accepted = set()
    keywords = getattr(make_optimizer, "keywords", None) or {}
    chosen = {key: keywords[key] for key in IMPL_ARGS if keywords.get(key) is not None}
    return accepted, chosen


def check_implementation(make_optimizer: OptimizerFactory, impl: str) -> None:
    """What can be checked without parameters: ``impl`` is a known value, and a forced
    ``fused``/``foreach`` exists in the optimizer's signature (else ``ConfigError``)."""
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(f"{IMPL_KEY}={impl!r}: accepted values: {', '.join(IMPLEMENTATIONS)}")
    accepted, chosen = _arguments(make_optimizer)
    if chosen:
        if chosen.get("fused") and chosen.get("foreach"):
            raise ConfigError(
                "model.optimizer.fused=true and model.optimizer.foreach=true: torch runs one "
                "implementation; set one of them (or neither, and choose with model.optimizer_impl)"
            )
        return
    if impl in IMPL_ARGS and impl not in accepted:
        raise ConfigError(
            f"{IMPL_KEY}={impl}: {_class_name(make_optimizer)} has no {impl} implementation "
            f"(no `{impl}` argument); accepted here: auto, "
            + ("foreach, " if "foreach" in accepted else "")
            + "single"
        )


def _torch_defaults(params: list[torch.Tensor], differentiable: bool) -> tuple[bool, bool]:
    """Torch's own answer, from its device lists: (fused possible, foreach its default)."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:  # a torch without the helper: the probe alone decides fused
        return True, False
    fused, _ = _default_to_fused_or_foreach(params, differentiable, use_fused=True)
    _, foreach = _default_to_fused_or_foreach(params, differentiable, use_fused=False)
    return fused, foreach


def _probe(
    make_optimizer: OptimizerFactory, options: Mapping[str, bool], params: list[torch.Tensor]
) -> str | None:
    """None when the configured optimizer with ``options`` steps a tensor of every (device,
    dtype) in ``params``; else where and why it does not (torch's message)."""
    for device, dtype in sorted({(p.device, p.dtype) for p in params}, key=str):
        probe = torch.zeros(2, device=device, dtype=dtype, requires_grad=True)
        probe.grad = torch.zeros_like(probe)
        try:
            make_optimizer([probe], **options).step()
        except Exception as err:  # torch raises RuntimeError, NotImplementedError, TypeError
            return f"{device.type}, {dtype}: {type(err).__name__}: {err}"
    return None


def fused_conflict(trainer: Any) -> str | None:
    """Why a fused optimizer cannot run under ``trainer`` (None: it can): fp16 mixed precision
    (a GradScaler) with gradient clipping, which Lightning refuses for an optimizer that
    unscales its gradients inside ``step``."""
    if trainer is None or not getattr(trainer, "gradient_clip_val", None):
        return None
    if getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is None:
        return None
    return (
        "trainer.gradient_clip_val with precision=16-mixed: Lightning clips after unscaling the "
        "gradients, and a fused optimizer unscales them inside its step"
    )


def _options(impl: str, accepted: set[str]) -> dict[str, bool]:
    """The keyword arguments that select ``impl`` (only those the optimizer takes)."""
    wanted = {
        "fused": {"fused": True, "foreach": False},
        "foreach": {"fused": False, "foreach": True},
        "single": {"fused": False, "foreach": False},
    }[impl]
    return {key: value for key, value in wanted.items() if key in accepted}


def implementation_options(
    make_optimizer: OptimizerFactory,
    params: list[torch.Tensor],
    impl: str = "auto",
    conflict: str | None = None,
) -> dict[str, bool]:
    """The keyword arguments to add to ``make_optimizer(groups)`` for ``impl`` on ``params``.

    ``auto``: fused where torch supports it (its device lists, then a probe step) and
    ``conflict`` (see :func:`fused_conflict`) is None, else foreach where torch would default to
    it (CUDA and other accelerators, not the CPU), else the single-tensor loop. A forced choice
    torch cannot run, or ``fused`` with a ``conflict``, is a ``ConfigError`` naming the key that
    forced it. ``fused``/``foreach`` set under ``model.optimizer`` win (nothing is added).
    """
    check_implementation(make_optimizer, impl)
    accepted, chosen = _arguments(make_optimizer)
    keywords = getattr(make_optimizer, "keywords", None) or {}
    differentiable = bool(keywords.get("differentiable", False))
    if chosen:
        if impl != "auto":
            log.warning(
                "%s=%s is ignored: model.optimizer sets %s, which wins",
                IMPL_KEY,
                impl,
                ", ".join(f"{key}={value}" for key, value in chosen.items()),
            )
        forced = next((key for key in IMPL_ARGS if chosen.get(key)), None)
        if forced is not None:
            _require(make_optimizer, {}, params, f"model.optimizer.{forced}=true", conflict, forced)
        return {}
    fused_listed, foreach_default = _torch_defaults(params, differentiable)
    if impl == "auto":
        if "fused" in accepted and conflict is None and fused_listed:
            options = _options("fused", accepted)
            if _probe(make_optimizer, options, params) is None:
                return options
        return _options(
            "foreach" if "foreach" in accepted and foreach_default else "single", accepted
        )
    options = _options(impl, accepted)
    if impl != "single":
        _require(make_optimizer, options, params, f"{IMPL_KEY}={impl}", conflict, impl)
    return options


def _require(
    make_optimizer: OptimizerFactory,
    options: Mapping[str, bool],
    params: list[torch.Tensor],
    key: str,
    conflict: str | None,
    impl: str,
) -> None:
    """``ConfigError`` naming ``key`` when the forced ``impl`` cannot run on ``params``."""
    why = conflict if impl == "fused" else None
    why = why or _probe(make_optimizer, options, params)
    if why is not None:
        raise ConfigError(
            f"{key}: {_class_name(make_optimizer)} cannot run {impl} here ({why}); "
            f"{IMPL_KEY}=auto picks the fastest implementation torch supports"
        )


def implementation_of(optimizer: torch.optim.Optimizer) -> str:
    """``fused``, ``foreach`` or ``single``: what ``optimizer.step`` runs (torch's default where
    its ``foreach`` is unset)."""
    defaults = optimizer.defaults
    if defaults.get("fused"):
        return "fused"
    foreach = defaults.get("foreach")
    if foreach is None and "foreach" in defaults:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        differentiable = bool(defaults.get("differentiable", False))
        foreach = _torch_defaults(params, differentiable)[1]
    return "foreach" if foreach else "single"


def keep_implementation(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict``: the run's implementation, not the checkpoint's.

    torch's ``load_state_dict`` replaces each group's options with the saved ones, ``fused`` and
    ``foreach`` included, so a single-tensor checkpoint would silently resume single-tensor.
    This puts the optimizer's own flags back on every group and hosts each ``step`` counter
    where that implementation keeps it (on the parameter's device in float32 when fused or
    capturable, else on the CPU). The state itself (moments, step counts) has the same layout in
    every implementation."""
    flags = {key: optimizer.defaults[key] for key in IMPL_ARGS if key in optimizer.defaults}
    for group in optimizer.param_groups:
        group.update(flags)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                device = param.device if on_device else torch.device("cpu")
                dtype = torch.float32 if group.get("fused") else step.dtype
                state["step"] = step.to(device=device, dtype=dtype)


def build_optimizer(
    make_optimizer: OptimizerFactory,
    groups: list[dict[str, Any]],
    impl: str = "auto",
    conflict: str | None = None,
) -> torch.optim.Optimizer:
    """``make_optimizer(groups)`` in the implementation ``impl`` selects for the groups'
    parameters (:func:`implementation_options`), keeping it across ``load_state_dict``."""
    params = [p for group in groups for p in group["params"]]
    options = implementation_options(make_optimizer, params, impl, conflict)
    optimizer = make_optimizer(groups, **options)
    optimizer.register_load_state_dict_post_hook(keep_implementation)
    log.info(
        "optimizer %s: %s (%s=%s)",
        _class_name(make_optimizer),
        implementation_of(optimizer),
        IMPL_KEY,
        impl,
    )
    return optimizer
