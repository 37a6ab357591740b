"""The params-level Gram matrix from the layers' inputs and output gradients, without forming
any task's gradient of the large weights (the ghost products of
:mod:`~lightning_mtl.weighting.ghost_layers`).

A step: forward hooks on the place's ``nn.Conv2d`` and ``nn.Linear`` modules record each call's
input and output. Then, per task, one backward pass asks autograd for the gradients of the
chosen layers' *outputs* and of the other parameters only, so no chosen layer computes its
weight gradient (convolution backward computes only what is asked); G is the sum of the ghost
products and the other parameters' Gram matrix. The combined gradient ``Jᵀw`` then comes from
Lightning's one backward pass (the surrogate term of ``gradient.py``). Against the explicit
Jacobian (:mod:`~lightning_mtl.weighting.jacobian`: k full backward passes, a pass over k×D
for G and one for ``Jᵀw``) this saves, for the chosen layers, k weight gradients (the memory-bound
part of a backward pass on small feature maps), the k×D memory and the two passes over it, at
the price of one more backward pass; ``benchmarks/weighting_cost.py`` measures the difference
(resnet18, 3 tasks, 32 px, batch 16, one CPU thread: 1.83-2.06× ``equal`` for the rules that
read G, at 1.02× its memory, against 2.40-2.68× and 1.44× through the Jacobian; see
``docs/weighting.md``).

Beyond the layer guards of :mod:`~lightning_mtl.weighting.ghost_layers`, G's diagonal is
checked against one ordinary backward pass per task on the first step served and again whenever
parameters enter the ghost products (gradual unfreezing, a batch small enough for a layer): a
weight also used outside its module, e.g. tied embeddings, fails it. Any disagreement or error
turns the engine off for the run and the caller forms the Jacobian.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_mtl.models.meeting import MeetingPlace
from lightning_mtl.weighting.ghost_layers import LayerCall, plan
from lightning_mtl.weighting.jacobian import ParameterJacobian, backward_rows

log = logging.getLogger(__name__)


class GhostGram:
    """Hooks a meeting place's linear and convolution modules for one step and forms G from
    their recorded inputs and the task gradients of their outputs (see the module docstring).
    The same interface as :class:`~lightning_mtl.weighting.shared_gramian.SharedGramian`."""

    #: how G was formed, for the run's log
    source = "the ghost products (no weight gradient of the layers they read)"

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._calls: list[LayerCall] = []
        self._parameters: list[nn.Parameter] = []
        #: whether the last Gram matrix came from this engine (False: from the explicit Jacobian)
        self.used = False
        #: set when the engine failed or disagreed once: the Jacobian is formed from then on
        self.disabled = False
        #: the parameters (ids) whose ghost products a step's check has confirmed
        self._checked: set[int] = set()
        #: the parameters (ids) the last step's ghost products covered
        self._covered: set[int] = set()
        #: how many of the last step's parameters' gradients the ghost products replaced
        self.ghost_parameters = 0

    @property
    def verified(self) -> bool:
        """Whether every parameter of the last step's ghost products has been checked."""
        return self._covered <= self._checked

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def prepare(self, place: MeetingPlace | None) -> None:
        """Hook the exact ``nn.Conv2d``/``nn.Linear`` modules of ``place`` whose weight or bias
        is trainable (with the trainable parameters of that moment, so freezing and gradual
        unfreezing are followed); None only unhooks."""
        self.close()
        if place is None or self.disabled:
            return
        self._parameters = place.trainable_parameters()
        if not self._parameters:
            return
        for module in {m for top in place.modules for m in top.modules()}:
            if type(module) not in (nn.Conv2d, nn.Linear):
                continue
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self._handles.append(module.register_forward_hook(self._record))

    def _record(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not torch.is_grad_enabled() or not args or not isinstance(output, torch.Tensor):
            return
        x = args[0]
        assert isinstance(module, nn.Conv2d | nn.Linear)
        device = x.device.type
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        self._calls.append(LayerCall(module, x, output, (x._version, output._version), cast))

    def close(self) -> None:
        """Remove the hooks and drop the recorded tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._calls = [], []

    def gramian(
        self,
        cotangents: Sequence[Sequence[torch.Tensor | None]],
        features: Sequence[torch.Tensor],
        scale: float | None,
        exact: bool = False,
    ) -> torch.Tensor | None:
        """``G = J Jᵀ`` (float64) for the task gradients ``cotangents`` (one list per row, one
        part per tensor of ``features``, the meeting's tensors; None where a row does not reach
        one). ``exact``: the ghost products and the others' Gram matrix in float64 (the rules
        with a pseudo-inverse, see :mod:`~lightning_mtl.weighting.jacobian`). With a GradScaler
        ``scale`` the rows are scaled before the backward passes and the gradients unscaled in
        float32. None (the caller forms J instead) when the engine is off or fails."""
        self.used, self._covered, self.ghost_parameters = False, set(), 0
        if not self.active:
            return None
        calls, params = self._calls, self._parameters
        self.close()  # no hook during the backward passes (a checkpointed block re-runs forward)
        try:
            gram = self._gram(calls, params, cotangents, features, scale, exact)
        except Exception as error:  # any failure: the Jacobian path is exact
            self._disable(f"it failed ({type(error).__name__}: {error})")
            return None
        if gram is None:  # the Jacobian is cheaper for this step
            return None
        if not self.verified:
            # checked again whenever new parameters enter the ghost products (unfreezing, a
            # batch small enough for a layer); a non-finite step (an fp16 overflow the scaler
            # will skip) is left to the step's guard unchecked
            mixed = any(c.cast is not None for c in calls)
            agrees = self._diagonal_agrees(
                gram, cotangents, features, scale, rtol=1e-2 if mixed else 1e-3
            )
            if agrees is False:
                self._disable("its Gram matrix disagrees with explicit gradients")
                return None
            if agrees:
                self._checked |= self._covered
        self.used = True
        return gram

    def _gram(
        self,
        calls: list[LayerCall],
        params: list[nn.Parameter],
        cotangents: Sequence[Sequence[torch.Tensor | None]],
        features: Sequence[torch.Tensor],
        scale: float | None,
        exact: bool,
    ) -> torch.Tensor | None:
        rows = len(cotangents)
        device = features[0].device
        dtype = torch.float64 if exact else torch.float32
        layers = plan(calls, rows)
        if layers is None:
            return None
        covered = {id(p) for layer in layers for p in layer.call.module.parameters(recurse=False)}
        usual = [p for p in params if id(p) not in covered]
        self._covered = {id(p) for p in params if id(p) in covered}
        self.ghost_parameters = sum(p.numel() for p in params if id(p) in covered)
        outputs = [layer.call.output for layer in layers]
        got = backward_rows(cotangents, features, [*outputs, *usual], scale)
        deltas = [[row[i] for row in got] for i in range(len(layers))]
        per_row = [row[len(layers) :] for row in got]
        gram = torch.zeros(rows, rows, dtype=torch.float64, device=device)
        if rows == 0:
            return gram
        with torch.no_grad():
            for layer, grads in zip(layers, deltas, strict=True):
                gram += layer.gram(grads, dtype).double()
        if usual:
            jacobian = ParameterJacobian(usual, per_row=per_row)
            gram += jacobian.gram(exact, range(rows)).to(device)
        return gram

    def _diagonal_agrees(
        self,
        gram: torch.Tensor,
        cotangents: Sequence[Sequence[torch.Tensor | None]],
        features: Sequence[torch.Tensor],
        scale: float | None,
        rtol: float,
    ) -> bool | None:
        """Each row's squared gradient norm over all the parameters, from one ordinary
        backward pass per row (O(D) memory), against G's diagonal (``rtol``: looser under
        autocast, where autograd rounds each weight gradient to half precision). None where
        either side is not finite (nothing to compare)."""
        params = self._parameters
        explicit = [
            sum(float(g.double().square().sum()) for g in got if g is not None)
            for got in backward_rows(cotangents, features, params, scale)
        ]
        expected = torch.tensor(explicit, dtype=torch.float64)
        if not explicit:
            return True
        got = gram.diagonal().double().cpu()
        if not bool(expected.isfinite().all() and got.isfinite().all()):
            return None
        return bool(torch.allclose(got, expected, rtol=rtol, atol=1e-6 * float(expected.max())))

    def _disable(self, why: str) -> None:
        self.disabled = True
        log.warning(
            "the ghost Gram engine cannot serve this backbone: %s. The params level forms the "
            "k×D Jacobian from now on (exact, more memory).",
            why,
        )
