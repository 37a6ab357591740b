"""The gradient-based family: weights from the task gradients, still one optimizer.

Most gradient-balancing rules (MGDA, PCGrad, CAGrad, IMTL-G, Nash-MTL, Aligned-MTL, UPGrad,
DualProj, GradVac, FairGrad, ConFIG) combine the task gradients gᵢ into ``d = Σ wᵢ gᵢ`` with
weights that depend only on the k×k Gram matrix ``G = J Jᵀ`` of the task Jacobian J. One step:

1. the heads run on the shared representation z *detached into leaves* z', so each task
   gradient ``∂Lᵢ/∂z'`` costs a backward pass through the heads only (``autograd.grad``);
2. G comes from those gradients (``level=representation``, the MGDA-UB trick of Sener &
   Koltun 2018) or from the gradients of the shared parameters θ (``level=params``: one more
   backward pass per task through the backbone, ``∂Lᵢ/∂θ = (∂z/∂θ)ᵀ ∂Lᵢ/∂z``, batched by
   torchjd's autogram engine so that only G, never the k×D Jacobian, is formed);
3. ``w = rule(G)`` (detached; under DDP G is global, so every rank gets the same w);
4. the step returns ``Σ Lᵢ(z') + ⟨z, Σ wᵢ ∂Lᵢ/∂z'⟩ − (the same, detached)``. Lightning's one
   backward then gives every head exactly its own task's gradient and the backbone exactly
   ``Σ wᵢ ∂Lᵢ/∂θ = Jᵀw``, the aggregated gradient, at either level; the extra term is zero in
   value. DDP's all-reduce, AMP scaling, clipping, accumulation and schedulers stay Lightning's.

Cost per step, for k tasks: k backward passes through the heads and one through the backbone
(representation level), plus k through the backbone (params level). Memory: the k×|z| task
gradients of the representation; at params level also one module's k×|θ_m| Jacobian block at a
time (:mod:`~lightning_mtl.weighting.shared_gramian`; G is all that the rules read), or the
k×D Jacobian under DDP and in plain loops that skip :meth:`GradientWeighting.prepare`.

DDP: the rule must see the global batch. At the representation level the global Gram matrix is
the sum of the ranks' local ones divided by world_size² (DDP averages gradients): one
all-reduce of k² + 2k numbers. At the params level local Gram matrices do not add up, so the
k×D Jacobian is all-reduced (k times a normal gradient's traffic). Random rules (PCGrad's and
GradVac's orders) draw from a generator seeded by ``(seed, step)``: the same on every rank and
after a resume.

fp16 with a GradScaler: the task gradients are taken of the scaled losses (as Lightning's
backward is) and unscaled in float32, so small gradients do not underflow. A step whose
gradients overflow gets NaN weights, so its backbone gradient is NaN and the GradScaler skips
it; the rule's state is left untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_mtl.errors import ConfigError
from lightning_mtl.weighting.base import Combined, StepContext, Weighting
from lightning_mtl.weighting.shared_gramian import SharedGramian

log = logging.getLogger(__name__)

LEVELS = ("representation", "params")


def task_gradients(
    losses: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], scale: float | None = None
) -> torch.Tensor:
    """The m×n matrix of each loss's gradient with respect to ``inputs`` (flattened, float32).

    With a GradScaler ``scale``, gradients are taken of ``scale·L`` and divided back in float32,
    as fp16 training needs to avoid underflow. Inputs a loss does not reach get zeros.
    """
    rows = []
    for loss in losses:
        scaled = loss * scale if scale is not None else loss
        grads = torch.autograd.grad(scaled, list(inputs), retain_graph=True, allow_unused=True)
        flat = [
            (g if g is not None else torch.zeros_like(x)).reshape(-1).float()
            for g, x in zip(grads, inputs, strict=True)
        ]
        row = torch.cat(flat)
        rows.append(row / scale if scale is not None else row)
    if not rows:
        n = sum(x.numel() for x in inputs)
        return torch.zeros(0, n, device=inputs[0].device if inputs else None)
    return torch.stack(rows)


def step_generator_seed(seed: int, step: int, *more: int) -> int:
    """A seed for ``(seed, step, *more)``: identical on every DDP rank and after a resume
    (``more``: e.g. the rank, for draws that must differ between ranks)."""
    key = (int(seed), int(step), *(int(m) for m in more))
    return int(np.random.SeedSequence(key).generate_state(1)[0])


class GradientWeighting(Weighting):
    """Base of the gradient-based methods; subclasses implement :meth:`gram_weights`.

    Args:
        level: ``representation`` (gradients with respect to the backbone's output, one backward
            through the backbone) or ``params`` (with respect to the shared parameters, k more).
        seed: seeds the rule's randomness per step (see :func:`step_generator_seed`).
    """

    needs_gradients = True
    #: the levels this rule is defined at; a subclass narrows it and says why in ``level_note``
    levels: tuple[str, ...] = LEVELS
    level_note: str = ""

    def __init__(self, tasks: Sequence[str], level: str = "representation", seed: int = 0) -> None:
        super().__init__(tasks)
        if level not in self.levels:
            name = type(self).__name__
            note = f" {self.level_note}" if self.level_note else ""
            raise ConfigError(
                f"weighting.level={level!r} is not valid for {name}; accepted: "
                f"{', '.join(self.levels)}.{note}"
            )
        self.level, self.seed = level, int(seed)
        #: the global k×k Gram matrix of the last step (zero rows for tasks no rank labelled)
        self.last_gram: torch.Tensor | None = None
        self._warned_nonfinite = False
        self._gramian = SharedGramian()

    def prepare(self, backbone: nn.Module | None, world_size: int = 1) -> None:
        """At the params level of a single process, hook ``backbone`` so that G comes without
        the k×D Jacobian (:mod:`~lightning_mtl.weighting.shared_gramian`); None unhooks it.
        Without this call (or under DDP) the params level forms the Jacobian."""
        use = self.level == "params" and world_size == 1
        self._gramian.prepare(backbone if use else None)

    # ---------------------------------------------------------------------------- the rule
    def gram_weights(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        """Weights of the present tasks from their m×m Gram matrix (float64).

        ``losses``: the present tasks' loss values (global under DDP), for rules that read them.
        """
        raise NotImplementedError

    def representation_direction(
        self, rows: torch.Tensor, weights: torch.Tensor, local: list[int], context: StepContext
    ) -> torch.Tensor:
        """The gradient sent into the representation: ``Σ wᵢ ∂Lᵢ/∂z`` (GradDrop overrides it).

        ``rows``: this rank's task gradients of the representation, for the tasks ``local``
        (indices into ``self.tasks``); ``weights``: those tasks' weights.
        """
        return weights.to(rows) @ rows

    def extra_loss(
        self, gram: torch.Tensor, present: list[int], losses: torch.Tensor, context: StepContext
    ) -> torch.Tensor | None:
        """A term whose gradient trains the rule's own parameters (GradNorm); None if none."""
        return None

    # ---------------------------------------------------------------------------- the step
    def forward(
        self, losses: Mapping[str, torch.Tensor], context: StepContext | None = None
    ) -> Combined:
        # Unlike loss-based methods, this runs with no local loss too: under DDP the rank must
        # join the all-reduce, and its backbone must still receive a (zero) gradient.
        unknown = set(losses) - set(self.index)
        if unknown:
            raise KeyError(f"losses for unknown tasks {sorted(unknown)}; known: {self.tasks}")
        context = context or StepContext()
        if not context.representation:
            raise ValueError(
                f"{type(self).__name__} needs context.representation and context.features "
                "(the shared representation detached and attached); see GradientWeighting"
            )
        return self.combine(losses, context)

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        k = len(self.tasks)
        names = [name for name in self.tasks if name in losses]
        local = [self.index[name] for name in names]
        scale = context.grad_scale
        rows = task_gradients([losses[n] for n in names], context.representation, scale)
        device = rows.device
        stats = torch.zeros(2, k, device=device)
        for i, name in zip(local, names, strict=True):
            stats[0, i] = losses[name].detach().float()
            stats[1, i] = 1.0
        gram = self._global_gram(rows, local, stats, context)
        present = [i for i in range(k) if stats[1, i] > 0]
        loss_values = stats[0, present] / stats[1, present]
        self.last_gram = gram.detach()

        sub = gram[present][:, present].double()
        finite = bool(torch.isfinite(sub).all())
        if not present:
            weights = gram.new_zeros(0)
        elif finite:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(step_generator_seed(self.seed, context.step))
                weights = self.gram_weights(sub, present, loss_values.double(), context).float()
        elif scale is not None:
            # overflow under a GradScaler: NaN gradients make the scaler skip this step
            weights = torch.full((len(present),), float("nan"), device=device)
        else:
            if not self._warned_nonfinite:
                log.warning("non-finite task gradients; %s falls back to equal weights", self)
                self._warned_nonfinite = True
            weights = torch.ones(len(present), device=device)
        weights = weights.to(device)

        position = {task: j for j, task in enumerate(present)}
        local_weights = weights[[position[i] for i in local]] if local else weights[:0]
        direction = self.representation_direction(rows, local_weights, local, context)
        total = self._surrogate(direction, context)
        for name in names:
            total = total + losses[name]
        if finite:
            extra = self.extra_loss(sub, present, loss_values.double(), context)
            if extra is not None:
                total = total + (extra - extra.detach())
        else:  # the rule's own parameters (GradNorm) get a zero gradient, not a NaN one
            for parameter in self.parameters():
                total = total + parameter.sum() * 0.0
        shown = {self.tasks[i]: weights[j].detach() for j, i in enumerate(present)}
        return Combined(total, shown)

    def _global_gram(
        self, rows: torch.Tensor, local: list[int], stats: torch.Tensor, context: StepContext
    ) -> torch.Tensor:
        """The k×k Gram matrix of the global batch; ``stats`` is summed over ranks in place."""
        k = len(self.tasks)
        if self.level == "params":
            self._check_trainable(context)
            if context.all_reduce is None:
                local_gram = self._gramian.gramian(rows, context.features, context.grad_scale)
                if local_gram is not None:
                    gram = rows.new_zeros(k, k)
                    index = torch.tensor(local, dtype=torch.long, device=gram.device)
                    gram[index[:, None], index[None, :]] = local_gram.to(gram)
                    return gram
            jacobian = self._parameter_jacobian(rows, local, context)
            if context.all_reduce is not None:
                jacobian = _reduce_with(jacobian, stats, context) / context.world_size
            return jacobian @ jacobian.T
        full = rows.new_zeros(k, rows.shape[1])
        full[local] = rows
        gram = full @ full.T
        if context.all_reduce is not None:
            gram = _reduce_with(gram, stats, context) / context.world_size**2
        return gram

    def _parameter_jacobian(
        self, rows: torch.Tensor, local: list[int], context: StepContext
    ) -> torch.Tensor:
        """The k×D Jacobian of the shared parameters: ``(∂z/∂θ)ᵀ ∂Lᵢ/∂z`` per task."""
        params = [p for p in context.shared_parameters if p.requires_grad]
        features = list(context.features)
        scale = context.grad_scale or 1.0
        jacobian = rows.new_zeros(len(self.tasks), sum(p.numel() for p in params))
        for row, i in zip(rows, local, strict=True):
            outputs = _split_like(row * scale, features)
            used = [(f, g) for f, g in zip(features, outputs, strict=True) if f.requires_grad]
            grads = torch.autograd.grad(
                [f for f, _ in used],
                params,
                grad_outputs=[g for _, g in used],
                retain_graph=True,
                allow_unused=True,
            )
            flat = [
                (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                for g, p in zip(grads, params, strict=True)
            ]
            jacobian[i] = torch.cat(flat) / scale
        return jacobian

    @staticmethod
    def _check_trainable(context: StepContext) -> None:
        if not any(p.requires_grad for p in context.shared_parameters):
            raise ConfigError(
                "weighting.level=params needs trainable shared parameters, but the backbone is "
                "frozen; use weighting.level=representation"
            )

    def _surrogate(self, direction: torch.Tensor, context: StepContext) -> torch.Tensor:
        """Zero in value; its backward sends ``d`` into the backbone (as ``⟨z, d⟩`` would).

        Every feature tensor appears (with a zero direction where no head read it), so DDP with
        ``find_unused_parameters=False`` sees a gradient for every backbone parameter.
        """
        features = list(context.features)
        parts = _split_like(direction, features, keep_dtype=True)
        total = direction.new_zeros(())
        for feature, part in zip(features, parts, strict=True):
            if feature.requires_grad:
                total = total + _InjectGradient.apply(feature, part.detach())
        return total


class _InjectGradient(torch.autograd.Function):
    """Exactly zero in value (even for a NaN direction, so the logged loss stays finite on a
    step the GradScaler skips); its backward sends ``grad · direction`` into ``feature``.

    The product is formed in float32 and only then cast to the feature's dtype: an fp16 copy of
    the unscaled direction could underflow, the scaled gradient that fp16 features receive
    does not.
    """

    @staticmethod
    def forward(ctx: Any, feature: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(direction)
        ctx.dtype = feature.dtype
        return direction.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (direction,) = ctx.saved_tensors
        return (grad.float() * direction.float()).to(ctx.dtype), None


def _reduce_with(tensor: torch.Tensor, stats: torch.Tensor, context: StepContext) -> torch.Tensor:
    """``tensor`` summed over the DDP ranks, in one all-reduce with ``stats`` (summed in place)."""
    assert context.all_reduce is not None
    packed = context.all_reduce(torch.cat([tensor.flatten(), stats.flatten()]))
    stats.copy_(packed[tensor.numel() :].view_as(stats))
    return packed[: tensor.numel()].view_as(tensor)


def _split_like(
    vector: torch.Tensor, tensors: Sequence[torch.Tensor], keep_dtype: bool = False
) -> list[torch.Tensor]:
    """Cut a flat vector into pieces shaped like ``tensors`` (and typed like them, unless
    ``keep_dtype``)."""
    if vector.numel() == 0:
        return [torch.zeros(t.shape, device=t.device, dtype=vector.dtype) for t in tensors]
    pieces = torch.split(vector, [t.numel() for t in tensors])
    return [
        p.view(t.shape) if keep_dtype else p.view(t.shape).to(t.dtype)
        for p, t in zip(pieces, tensors, strict=True)
    ]
