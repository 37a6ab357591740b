"""Which layers' task gradients enter G as "ghost" inner products, and those products.

For a linear map ``y_n = W x_n + b`` applied at N positions n (the samples of a batch, times the
spatial positions of a convolution, whose ``x_n`` is the unfolded k_h·k_w·C_in patch), task i's
weight gradient is ``∇_W Lᵢ = Σ_n δᵢₙ x_nᵀ`` with ``δᵢₙ = ∂Lᵢ/∂y_n``. Its inner product with
task j's needs neither gradient:

    ⟨∇_W Lᵢ, ∇_W Lⱼ⟩ = Σ_{n,m} (δᵢₙ · δⱼₘ)(x_n · x_m) = ⟨Δᵢ, A Δⱼ⟩,   A = X Xᵀ (N×N),

with X (N×C_in) the inputs and Δᵢ (N×C_out) the output gradients; the bias adds
``(Σ_n δᵢₙ)·(Σ_n δⱼₙ)``. This is the per-example "ghost norm" of differentially private
training (Goodfellow 2015; Li et al. 2022, "Large language models can be strong differentially
private learners"), taken here across tasks instead of across samples. Cost per layer:
``N²·C_in + k·N²·C_out`` multiply-adds, against ``k·N·C_out·C_in`` for the k weight gradients;
so it pays for the layers where N is small against the weight (deep convolutions, heads of
small images), and :func:`plan` picks them. Torch has no API for these products (torch.func
computes per-sample gradients, not their inner products without them; torchjd's autogram engine
forms each module's k×|θ_m| Jacobian block), hence this module; the engine that records the
calls and runs the backward passes is :mod:`~lightning_mtl.weighting.ghost_gram`.

Exactness guards: only the exact types ``nn.Conv2d`` (groups 1, zero padding given as numbers,
4-D input) and ``nn.Linear`` are read (a subclass may transform its weight or input, e.g. weight
standardisation or "same" padding in forward); a call whose input or output was modified in
place after it ran (:func:`ghost_layer`), and a module called more than once in the forward
(:func:`plan`), are left to autograd.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: the most positions N for which A = X Xᵀ (N×N) is formed: 64 MiB in float32
MAX_POSITIONS = 4096


@dataclass
class LayerCall:
    """One forward call of a hooked module: what it read and produced, and their versions."""

    module: nn.Conv2d | nn.Linear
    input: torch.Tensor
    output: torch.Tensor
    versions: tuple[int, int]
    #: the autocast dtype the module ran under (its input was cast to it), None outside autocast
    cast: torch.dtype | None = None

    def changed(self) -> bool:
        return (self.input._version, self.output._version) != self.versions


@dataclass
class GhostLayer:
    """A call whose weight's task gradients enter G through the ghost products."""

    call: LayerCall
    positions: int
    fan_in: int
    fan_out: int

    def inputs(self, dtype: torch.dtype) -> torch.Tensor:
        """X: N×fan_in, the input at each position (a convolution's unfolded patches)."""
        module, x = self.call.module, self.call.input
        if self.call.cast is not None and x.is_floating_point() and x.dtype != torch.float64:
            x = x.to(self.call.cast)  # what the layer multiplied (autocast leaves float64 be)
        if isinstance(module, nn.Conv2d):
            padding = module.padding  # a tuple: ghost_layer leaves 'same'/'valid' to autograd
            assert not isinstance(padding, str)
            patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
            return patches.transpose(1, 2).reshape(self.positions, self.fan_in).to(dtype)
        return x.reshape(self.positions, self.fan_in).to(dtype)

    def deltas(self, grads: Sequence[torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
        """Δ: rows×N×fan_out, each row's gradient of the output at each position."""
        out = self.call.output
        rows = [g if g is not None else torch.zeros_like(out) for g in grads]
        stacked = torch.stack(rows).to(dtype)
        if isinstance(self.call.module, nn.Conv2d):  # (r, B, C, H, W) -> (r, B·H·W, C)
            stacked = stacked.flatten(3).transpose(2, 3)
        return stacked.reshape(len(rows), self.positions, self.fan_out)

    def gram(self, grads: Sequence[torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
        """This layer's rows×rows part of G: ``⟨Δᵢ, A Δⱼ⟩`` (+ the bias term)."""
        x, deltas = self.inputs(dtype), self.deltas(grads, dtype)
        rows = deltas.shape[0]
        gram = torch.zeros(rows, rows, dtype=dtype, device=x.device)
        module = self.call.module
        if module.weight.requires_grad:
            spread = torch.matmul(x @ x.T, deltas)  # A Δⱼ for every row j
            gram += deltas.reshape(rows, -1) @ spread.reshape(rows, -1).T
        if module.bias is not None and module.bias.requires_grad:
            sums = deltas.sum(1)
            gram += sums @ sums.T
        return gram


def multiply_adds(call: LayerCall) -> int:
    """The call's forward multiply-adds (a backward pass costs about twice that)."""
    module, y = call.module, call.output
    if isinstance(module, nn.Conv2d) and y.dim() == 4:
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        return y.numel() * per_output
    return y.numel() * (module.in_features if isinstance(module, nn.Linear) else 1)


def ghost_layer(call: LayerCall, rows: int) -> GhostLayer | None:
    """The call as a ghost layer, or None where its gradients are better (or only correctly)
    taken as usual: the cost comparison of the module docstring, and the exactness guards."""
    module, x, y = call.module, call.input, call.output
    if call.changed() or not y.requires_grad:
        return None
    if isinstance(module, nn.Conv2d):
        if (
            x.dim() != 4
            or module.groups != 1
            or module.padding_mode != "zeros"
            or isinstance(module.padding, str)
        ):
            return None
        positions = y.shape[0] * y.shape[2] * y.shape[3]
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        fan_out = module.out_channels
    else:
        fan_in, fan_out = module.in_features, module.out_features
        positions = x.numel() // fan_in
    if positions > MAX_POSITIONS:
        return None
    if positions * positions * (fan_in + rows * fan_out) >= rows * positions * fan_out * fan_in:
        return None
    return GhostLayer(call, positions, fan_in, fan_out)


def plan(calls: Sequence[LayerCall], rows: int) -> list[GhostLayer] | None:
    """The ghost layers of a step with ``rows`` task rows, or None where the Jacobian path is
    cheaper. Against the Jacobian, the ghost path spends one more backward pass (about twice the
    forward's multiply-adds F) and saves, per ghost layer, ``k·F_l`` minus its ghost products,
    plus the two memory-bound passes over their k×|θ_l| gradients. Taken when the multiply-adds
    saved reach F: calibrated on resnet18 with 3 tasks on one CPU thread, where the saving is
    1.33·F at 32 px (the rules' steps then 1.00-1.13× one forward + k full backward passes on
    an idle machine, 0.73-0.87× on a loaded one, against 1.06-1.18× through the Jacobian),
    1.00·F at 64 px (both paths within 5 %), and
    0.52·F and 0.20·F at 128 and 224 px; with 10 tasks it is taken up to 128 px."""
    once = Counter(id(c.module) for c in calls)
    layers = [
        layer
        for c in calls
        if once[id(c.module)] == 1 and (layer := ghost_layer(c, rows)) is not None
    ]
    if not layers:  # the ghost path's extra backward pass would buy nothing
        return None
    saved = sum(
        rows * multiply_adds(layer.call)
        - layer.positions**2 * (layer.fan_in + rows * layer.fan_out)
        for layer in layers
    )
    return layers if saved >= sum(multiply_adds(c) for c in calls) else None
