"""Callbacks of the template, one concern each: the gradient-conflict monitor, the fp16
balancer roll-back, layer-wise training (freezing and gradual unfreezing) and the model report."""

from lightning_mtl.callbacks.balancer_rollback import BalancerRollback
from lightning_mtl.callbacks.gradient_conflict import GradientConflictMonitor
from lightning_mtl.callbacks.model_report import ModelReport

__all__ = ["BalancerRollback", "GradientConflictMonitor", "ModelReport"]
