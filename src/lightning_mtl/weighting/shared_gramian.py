"""The Gram matrix of the shared parameters' task Jacobian, without holding the Jacobian.

At ``weighting.level=params`` a Gram-based rule needs ``G = J Jᵀ`` with J the k×D Jacobian of
the k task losses with respect to the D shared parameters. Forming J costs k·D floats (for a
ResNet-50 and 10 tasks, 1 GB). torchjd's autogram engine (Jacobian Descent for Multi-Objective
Optimization, Quinton & Rey 2024, Algorithm 3) sums the Gram matrix module by module during one
batched backward pass, so only one module's k×|θ_m| block exists at a time. Same backward cost as
k separate passes; memory k·max|θ_m| instead of k·D.

The engine hooks the modules upstream of a meeting place (the backbone, for hard sharing) and
records the forward passes, so it must exist *before* the step's forward: :meth:`prepare` hooks
them at the start of each training step (with its trainable parameters of that moment, so freezing and gradual unfreezing are
followed) and the hooks are removed as soon as G is formed. Between steps the backbone carries no
hook: validation, callbacks and ``copy.deepcopy`` see a plain module. ``batch_dim=None``:
BatchNorm mixes the samples of a batch, which the engine's batched mode forbids. Under mixed
precision (autocast) the engine is not used (see :meth:`SharedGramian.prepare`).

The engine sees parameters through their modules' forward hooks, which not every backbone
honours (timm's ViTs hold parameters in the top module but produce features through
``forward_intermediates``; a weight may be used outside its module's forward). So any failure
switches the engine off for the run, and on its first use its diagonal is checked against one
ordinary backward pass per task (O(D) memory, once).

Under DDP the global Gram matrix has cross-rank terms ``J_r J_sᵀ`` that local Gram matrices do
not give, so there the k×D Jacobian is formed and all-reduced instead (see ``gradient.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torchjd.autogram import Engine

from lightning_mtl.models.meeting import MeetingPlace

log = logging.getLogger(__name__)


class SharedGramian:
    """Hooks the backbone for one step with a torchjd autogram engine and queries it."""

    #: how G was formed, for the run's log
    source = "torchjd's autogram engine (the k×D Jacobian is above weighting.jacobian_budget_mb)"

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._warned_autocast = False
        #: whether the last Gram matrix came from the engine (False: from the explicit Jacobian)
        self.used = False
        #: set when the engine failed or disagreed once: the Jacobian is formed from then on
        self.disabled = False
        #: whether the engine's diagonal has been checked against explicit gradients
        self.verified = False
        self._parameters: list[torch.Tensor] = []

    @property
    def active(self) -> bool:
        return self._engine is not None

    def prepare(self, place: MeetingPlace | None) -> None:
        """Hook the modules (and submodules) of ``place`` that have trainable parameters; None
        only unhooks. A place with trainable parameters outside its modules is not served.

        Under autocast (``16-mixed``, ``bf16-mixed``) nothing is hooked: torchjd 0.18's engine
        multiplies the half-precision module Jacobians with float32 ones and fails, so the
        caller forms the Jacobian instead.
        """
        self.close()
        modules = list(place.modules) if place is not None else []
        trainable: list[torch.Tensor] = [
            p for m in modules for p in m.parameters() if p.requires_grad
        ]
        loose = place is not None and any(p.requires_grad for p in place.extra_parameters)
        if not trainable or self.disabled or loose:
            return
        if torch.is_autocast_enabled(trainable[0].device.type):
            if not self._warned_autocast:
                log.info("mixed precision: the params-level Gram matrix comes from the Jacobian")
                self._warned_autocast = True
            return
        self._engine = Engine(*modules, batch_dim=None)
        self._parameters = trainable

    def close(self) -> None:
        """Remove the engine's hooks from the backbone."""
        if self._engine is not None:
            # the engine removes its forward hooks when finalized; do it now, not at GC time
            self._engine._module_hook_manager._finalizer()
        self._engine = None

    def gramian(
        self,
        cotangents: Sequence[Sequence[torch.Tensor | None]],
        features: Sequence[torch.Tensor],
        scale: float | None,
        exact: bool = False,
    ) -> torch.Tensor | None:
        """``G = J Jᵀ`` for the task gradients ``cotangents`` (one list per task, one part per
        tensor of ``features``, the meeting's tensors; None for a tensor the task does not reach).

        The i-th output differentiated is ``⟨z, rowᵢ⟩``, whose gradient in θ is
        ``(∂z/∂θ)ᵀ rowᵢ``, the i-th row of J. With a GradScaler ``scale`` the rows are scaled
        before the backbone's (fp16) backward and G is divided by scale² in float32. Returns
        None (the caller forms J instead) when the engine is absent or refuses this graph.
        ``exact`` is not honoured: torchjd forms G in the modules' dtype (this engine serves
        only the Jacobians above ``weighting.jacobian_budget_mb``).
        """
        self.used = False
        if self._engine is None:
            return None
        factor = scale or 1.0
        outputs = []
        for row in cotangents:
            terms = [
                (f.float() * (p * factor).to(f.dtype).float()).sum()
                for f, p in zip(features, row, strict=True)
                if f.requires_grad and p is not None
            ]
            outputs.append(torch.stack(terms).sum() if terms else features[0].new_zeros(()).float())
        try:
            if not outputs:
                return torch.zeros(0, 0, device=features[0].device)
            gram = self._engine.compute_gramian(torch.stack(outputs))
        except Exception as error:  # any failure: the Jacobian path is exact
            # e.g. a module called twice or outside its forward, a ViT whose top module holds
            # parameters but whose features come from forward_intermediates
            self._disable(f"it failed ({type(error).__name__}: {error})")
            return None
        finally:
            self.close()
        if not self.verified and not self._diagonal_agrees(gram, outputs):
            self._disable("its Gram matrix disagrees with explicit gradients")
            return None
        self.used = True
        return gram.float() / factor**2

    def _diagonal_agrees(self, gram: torch.Tensor, outputs: list[torch.Tensor]) -> bool:
        """First use only: each task's squared gradient norm from one ordinary backward pass
        per task (O(D) memory) against the engine's diagonal. A backbone whose parameters the
        engine's module hooks do not see (a weight used outside its module's forward) fails it.
        """
        explicit = []
        for output in outputs:
            grads = torch.autograd.grad(
                output, self._parameters, retain_graph=True, allow_unused=True
            )
            explicit.append(sum(float(g.double().square().sum()) for g in grads if g is not None))
        expected = torch.tensor(explicit, dtype=torch.float64)
        got = gram.diagonal().double().cpu()
        self.verified = bool(
            torch.allclose(got, expected, rtol=1e-3, atol=1e-6 * float(expected.max()))
        )
        return self.verified

    def _disable(self, why: str) -> None:
        self.disabled = True
        log.warning(
            "torchjd's autogram engine cannot serve this backbone: %s. The params level forms "
            "the k×D Jacobian from now on (exact, more memory).",
            why,
        )
