"""fp16: a step the GradScaler skips leaves no trace in the balancer's state.

With ``16-mixed`` the GradScaler skips an optimizer step whose gradients hold inf/NaN and lowers
its scale. Gradient methods already see an overflow in the task gradients of a meeting place
(NaN weights, state untouched), but one that occurs deeper in the backward pass shows only when
the scaler unscales, after the balancer ran: loss-based methods (DWA's history, FAMO's logits)
and stateful gradient rules (Nash-MTL's warm start) would otherwise count a step that did not
happen. This callback snapshots the balancer's state at the start of each optimizer step's
window (its first micro-batch) and restores it when the scale went down at the window's end.

``MultiTaskModule.configure_callbacks`` adds it to every run (a config cannot drop it); without
a GradScaler it does nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch

if TYPE_CHECKING:  # the module imports this callback; its hooks are written for that module
    from lightning_mtl.module import MultiTaskModule

log = logging.getLogger(__name__)


def grad_scale(trainer: L.Trainer | None) -> float | None:
    """The fp16 GradScaler's current scale, or None without one."""
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    scaler = getattr(plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else None


class BalancerRollback(L.Callback):
    """Restore ``pl_module.weighting``'s state after a step the GradScaler skipped."""

    def __init__(self) -> None:
        self._snapshot: tuple[float, dict[str, torch.Tensor]] | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % trainer.accumulate_grad_batches:  # not a window's first micro-batch
            return
        scale = grad_scale(trainer)  # (a device sync on GPU: read it only where needed)
        if scale is None:
            return
        weighting = cast("MultiTaskModule", pl_module).weighting
        state = {k: v.clone() for k, v in weighting.state_dict().items()}
        self._snapshot = (scale, state)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if self._snapshot is None:
            return
        scale, state = self._snapshot
        now = grad_scale(trainer)
        if now is not None and now < scale:
            cast("MultiTaskModule", pl_module).weighting.load_state_dict(state)
            self._snapshot = None
            log.debug(
                "step %d skipped by the GradScaler; balancer state restored", trainer.global_step
            )
