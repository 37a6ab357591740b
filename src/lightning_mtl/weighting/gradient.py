"""The gradient-based family: weights from the task gradients, still one optimizer.

Most gradient-balancing rules (MGDA, PCGrad, CAGrad, IMTL-G, Nash-MTL, Aligned-MTL, UPGrad,
DualProj, GradVac, FairGrad, ConFIG) combine the task gradients gᵢ into ``d = Σ wᵢ gᵢ`` with
weights that depend only on the k×k Gram matrix ``G = J Jᵀ`` of the task Jacobian J. Where the
gradients are taken is the architecture's *meeting places* (:mod:`lightning_mtl.models.meeting`):
tensors z that several tasks' losses flow through, with the shared parameters θ just upstream.
Hard sharing has one (the backbone's output); a branching tree one per node. One step:

1. the modules downstream of each place read z *detached into leaves* z', so each task
   gradient ``∂Lᵢ/∂z'`` costs a backward pass through those modules only (``autograd.grad``);
   across nested places the chain rule runs through the cuts (:func:`balance`);
2. at each place, G comes from those gradients (``level=representation``, the MGDA-UB trick of
   Sener & Koltun 2018) or from the gradients of the place's shared parameters θ
   (``level=params``: one more backward pass per task, ``∂Lᵢ/∂θ = (∂z/∂θ)ᵀ ∂Lᵢ/∂z``, batched by
   torchjd's autogram engine so that only G, never the k×D Jacobian, is formed);
3. ``w = rule(G)`` (detached; under DDP G is global, so every rank gets the same w);
4. the step returns ``Σ Lᵢ + Σ_places (⟨z, Σ wᵢ ∂Lᵢ/∂z'⟩ − the same, detached)``. Lightning's one
   backward then gives every head exactly its own task's gradient and each place's parameters
   exactly ``Σ wᵢ ∂Lᵢ/∂θ = Jᵀw``, the aggregated gradient, at either level; the extra terms are
   zero in value. DDP's all-reduce, AMP scaling, clipping, accumulation and schedulers stay
   Lightning's.

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

import numpy as np
import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.meeting import LEVELS, Meeting, MeetingPlace
from lightning_mtl.weighting.base import Combined, StepContext, Weighting
from lightning_mtl.weighting.meetings import balance, check_gradient_step, split_like, surrogate
from lightning_mtl.weighting.shared_gramian import SharedGramian

log = logging.getLogger(__name__)


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
        self._warned_inactive: set[str] = set()
        #: one params-level Gram engine per meeting place (by name)
        self._gramians: dict[str, SharedGramian] = {}

    def prepare(self, places: Sequence[MeetingPlace] | None, world_size: int = 1) -> None:
        """Before a step's forward pass, at the params level of a single process: hook each
        place's modules so that G comes without the k×D Jacobian
        (:mod:`~lightning_mtl.weighting.shared_gramian`); None unhooks them all. Without this
        call (or under DDP) the params level forms the Jacobian."""
        for gramian in self._gramians.values():
            gramian.close()
        if places is None or self.level != "params" or world_size != 1:
            return
        for place in places:
            self._gramians.setdefault(place.name, SharedGramian()).prepare(place)

    def warn_inactive(self, place: MeetingPlace, why: str) -> None:
        """Once per place: it has nothing to balance (see :func:`balance`)."""
        if place.name in self._warned_inactive:
            return
        self._warned_inactive.add(place.name)
        log.warning(
            "%s: meeting place %r (tasks %s) is skipped: %s, so no shared parameter there "
            "takes its tasks' combined gradient; their heads still train. This stays so while "
            "it is frozen.",
            type(self).__name__,
            place.name,
            ", ".join(place.tasks),
            why,
        )

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
        return self.combine(losses, check_gradient_step(self, losses, context))

    def combine(self, losses: Mapping[str, torch.Tensor], context: StepContext) -> Combined:
        """This rule at every meeting of ``context`` (one state shared by all of them; the
        Lightning module gives each meeting place its own rule, see ``places.py``)."""
        return balance(losses, context, lambda place: self)

    def meet(
        self,
        meeting: Meeting,
        grads: Mapping[str, torch.Tensor],
        losses: Mapping[str, torch.Tensor],
        context: StepContext,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The rule at one meeting: G of its tasks (global under DDP), the weights, and the term
        (zero in value) that sends ``Σ wᵢ gᵢ`` into the meeting's tensors.

        ``grads``: this rank's gradient of each of the place's tasks with a local loss, with
        respect to ``meeting.leaves`` (flat, float32). Tasks outside the place are absent here.
        Returns the term and the weight of each task present at the place on any rank.
        """
        k = len(self.tasks)
        names = [name for name in self.tasks if name in grads]
        local = [self.index[name] for name in names]
        scale = context.grad_scale
        device = meeting.leaves[0].device
        width = sum(leaf.numel() for leaf in meeting.leaves)
        rows = (
            torch.stack([grads[n] for n in names])
            if names
            else torch.zeros(0, width, device=device)
        )
        stats = torch.zeros(2, k, device=device)
        for i, name in zip(local, names, strict=True):
            stats[0, i] = losses[name].detach().float()
            stats[1, i] = 1.0
        gram = self._global_gram(rows, local, stats, meeting, context)
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
        total = surrogate(direction, meeting)
        if finite:
            extra = self.extra_loss(sub, present, loss_values.double(), context)
            if extra is not None:
                total = total + (extra - extra.detach())
        else:
            total = total + self.zero_term()
        shown = {self.tasks[i]: weights[j].detach() for j, i in enumerate(present)}
        return total, shown

    def _global_gram(
        self,
        rows: torch.Tensor,
        local: list[int],
        stats: torch.Tensor,
        meeting: Meeting,
        context: StepContext,
    ) -> torch.Tensor:
        """The k×k Gram matrix of the global batch; ``stats`` is summed over ranks in place."""
        k = len(self.tasks)
        if self.level == "params":
            if context.all_reduce is None:
                gramian = self._gramians.get(meeting.place.name)
                local_gram = (
                    gramian.gramian(rows, meeting.tensors, context.grad_scale) if gramian else None
                )
                if local_gram is not None:
                    gram = rows.new_zeros(k, k)
                    index = torch.tensor(local, dtype=torch.long, device=gram.device)
                    gram[index[:, None], index[None, :]] = local_gram.to(gram)
                    return gram
            jacobian = self._parameter_jacobian(rows, local, meeting, context)
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
        self, rows: torch.Tensor, local: list[int], meeting: Meeting, context: StepContext
    ) -> torch.Tensor:
        """The k×D Jacobian of the place's shared parameters: ``(∂z/∂θ)ᵀ ∂Lᵢ/∂z`` per task."""
        params = meeting.place.trainable_parameters()
        tensors = meeting.tensors
        scale = context.grad_scale or 1.0
        jacobian = rows.new_zeros(len(self.tasks), sum(p.numel() for p in params))
        for row, i in zip(rows, local, strict=True):
            outputs = split_like(row * scale, tensors)
            used = [(t, g) for t, g in zip(tensors, outputs, strict=True) if t.requires_grad]
            grads = torch.autograd.grad(
                [t for t, _ in used],
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


def _reduce_with(tensor: torch.Tensor, stats: torch.Tensor, context: StepContext) -> torch.Tensor:
    """``tensor`` summed over the DDP ranks, in one all-reduce with ``stats`` (summed in place)."""
    assert context.all_reduce is not None
    packed = context.all_reduce(torch.cat([tensor.flatten(), stats.flatten()]))
    stats.copy_(packed[tensor.numel() :].view_as(stats))
    return packed[: tensor.numel()].view_as(tensor)
