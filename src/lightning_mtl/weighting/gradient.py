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
   (``level=params``: one more backward pass per task, ``∂Lᵢ/∂θ = (∂z/∂θ)ᵀ ∂Lᵢ/∂z``; the k×D
   Jacobian where it fits ``jacobian_budget_mb``, else G alone by torchjd's autogram engine;
   :mod:`~lightning_mtl.weighting.rule_inputs` forms what the rule reads);
3. ``w = rule(G)`` (detached; under DDP G is global, so every rank gets the same w);
4. the step returns ``Σ Lᵢ + Σ_places (⟨z, Σ wᵢ ∂Lᵢ/∂z'⟩ − the same, detached)``. Lightning's one
   backward then gives every head exactly its own task's gradient and each place's parameters
   exactly ``Σ wᵢ ∂Lᵢ/∂θ = Jᵀw``, the aggregated gradient, at either level; the extra terms are
   zero in value. DDP's all-reduce, AMP scaling, clipping, accumulation and schedulers stay
   Lightning's.

Cost per step, for k tasks: k backward passes through the heads and one through the backbone
(representation level), plus k through the backbone (params level, where a kept Jacobian
gives ``Jᵀw`` without the backbone's second backward). Memory: the k×|z| task gradients of the
representation; at params level also the k×D Jacobian (within the budget, under DDP, and in
plain loops that skip :meth:`GradientWeighting.prepare`) or one module's k×|θ_m| block at a
time (:mod:`~lightning_mtl.weighting.shared_gramian`).

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

import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.meeting import LEVELS, Meeting, MeetingPlace
from lightning_mtl.weighting.base import Combined, StepContext, Weighting
from lightning_mtl.weighting.jacobian import inject_into_parameters
from lightning_mtl.weighting.meetings import (
    LeafGrads,
    balance,
    check_gradient_step,
    split_like,
    surrogate,
)
from lightning_mtl.weighting.rule_inputs import Solved, flat_rows, rule_inputs
from lightning_mtl.weighting.shared_gramian import SharedGramian

log = logging.getLogger(__name__)


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """One controller per process: creating one scans the loaded libraries."""
    return ThreadpoolController()


def single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """NumPy/SciPy's BLAS (OpenBLAS) limited to one thread while a rule solves its k×k problem.

    The rules' eigendecompositions, pseudo-inverses and NNLS solves on k×k matrices gain nothing
    from threads, but OpenBLAS's idle workers spin for a while after each call, on the cores the
    training step then needs: measured at 40 tasks, UPGrad's and DualProj's step took 1.04×
    ``equal``'s wall time but 1.38× its CPU time (the spinning thread), CAGrad's likewise.
    ``threadpoolctl`` sets and restores the limit (about 25 µs per step)."""
    return _blas_controller().limit(limits=1, user_api="blas")


#: default of ``weighting.jacobian_budget_mb``: the params level forms the k×D Jacobian (one
#: k-batched backward, no second one) when it takes at most this many MiB, else G alone
JACOBIAN_BUDGET_MB = 1024.0


def step_generator_seed(seed: int, step: int, *more: int) -> int:
    """A seed for ``(seed, step, *more)``: identical on every DDP rank and after a resume
    (``more``: e.g. the rank, for draws that must differ between ranks)."""
    key = (int(seed), int(step), *(int(m) for m in more))
    return int(np.random.SeedSequence(key).generate_state(1)[0])


class GradientWeighting(Weighting):
    """Base of the gradient-based methods; subclasses implement :meth:`gram_weights` (or
    :meth:`jacobian_weights` with ``needs_jacobian``, :meth:`cross_gram_weights` with
    ``needs_cross_gram``).

    Args:
        level: ``representation`` (gradients with respect to the backbone's output, one backward
            through the backbone) or ``params`` (with respect to the shared parameters, k more).
        seed: seeds the rule's randomness per step (see :func:`step_generator_seed`).

    Options every gradient method takes (set by :meth:`configure`, from ``weighting.<option>``):
    ``update_every`` (N: the weights are recomputed on steps that are multiples of N and reused
    in between) and ``jacobian_budget_mb`` (params level: the most memory the k×D Jacobian may
    take; above it only G is formed).
    """

    # buffers (register_buffer in __init__), declared for the type checker
    cached_weights: torch.Tensor

    needs_gradients = True
    #: the rule reads the k×D Jacobian itself (not only G): :meth:`jacobian_weights`
    needs_jacobian: ClassVar[bool] = False
    #: the rule reads ``J₁J₂ᵀ`` of the two halves of the batch: :meth:`cross_gram_weights`
    needs_cross_gram: ClassVar[bool] = False
    #: the rule reads a pseudo-inverse, a solve or an eigenvalue cut-off of G, so at the params
    #: level G is formed in float64 (else each parameter's block product is float32, summed in
    #: float64; the representation level is always float64, its G being cheap)
    exact_gram: ClassVar[bool] = False
    #: whether a step may reuse the weights of an earlier step (``update_every``)
    reuses_weights: ClassVar[bool] = True
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
        self.update_every = 1
        self.jacobian_budget_mb = JACOBIAN_BUDGET_MB
        #: the weights of the last step that computed them (NaN: never), reused in between
        self.register_buffer(
            "cached_weights", torch.full((len(self.tasks),), float("nan"), dtype=torch.float64)
        )
        #: the global k×k Gram matrix of the last step (zero rows for tasks no rank labelled)
        self.last_gram: torch.Tensor | None = None
        self._warned: set[str] = set()
        self._warned_inactive: set[str] = set()
        #: one params-level Gram engine per meeting place (by name)
        self._gramians: dict[str, SharedGramian] = {}

    def configure(
        self, update_every: int = 1, jacobian_budget_mb: float = JACOBIAN_BUDGET_MB
    ) -> None:
        """The options every gradient method takes (see the class docstring), checked."""
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"weighting.update_every={update_every!r}; expected an integer >= 1")
        if update_every > 1 and not self.reuses_weights:
            raise ConfigError(
                f"weighting.update_every={update_every} is not valid for {type(self).__name__}: "
                "it has no weights to reuse (its direction is a new function of each step's "
                "gradients); use update_every=1"
            )
        if not isinstance(jacobian_budget_mb, int | float) or jacobian_budget_mb < 0:
            raise ConfigError(
                f"weighting.jacobian_budget_mb={jacobian_budget_mb!r}; expected a number of MiB "
                ">= 0 (0: never form the Jacobian where G alone will do)"
            )
        self.update_every, self.jacobian_budget_mb = update_every, float(jacobian_budget_mb)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # checkpoints written before update_every existed have no cached weights: start afresh
        state_dict.setdefault(prefix + "cached_weights", self.cached_weights.clone())
        super()._load_from_state_dict(state_dict, prefix, *args)

    def prepare(self, places: Sequence[MeetingPlace] | None, world_size: int = 1) -> None:
        """Before a step's forward pass, at the params level of a single process, when the
        Jacobian would not fit ``jacobian_budget_mb``: hook each place's modules so that G comes
        without the k×D Jacobian (:mod:`~lightning_mtl.weighting.shared_gramian`); None unhooks
        them all. Without this call (or under DDP) the params level forms the Jacobian."""
        for gramian in self._gramians.values():
            gramian.close()
        if places is None or self.level != "params" or world_size != 1 or self.needs_jacobian:
            return
        for place in places:
            if not self._jacobian_fits(place):
                self._gramians.setdefault(place.name, SharedGramian()).prepare(place)

    def _jacobian_fits(self, place: MeetingPlace) -> bool:
        rows = len(place.tasks) * (2 if self.needs_cross_gram else 1)
        size = rows * sum(p.numel() for p in place.trainable_parameters()) * 4
        return size <= self.jacobian_budget_mb * 2**20

    def warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

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
        """Weights of the present tasks from their m×m Gram matrix (float64, formed in float64).

        ``losses``: the present tasks' loss values (global under DDP), for rules that read them.
        """
        raise NotImplementedError

    def jacobian_weights(
        self,
        jacobian: torch.Tensor,
        present: list[int],
        losses: torch.Tensor,
        context: StepContext,
    ) -> torch.Tensor:
        """With ``needs_jacobian``: weights from the present tasks' m×D Jacobian (float32,
        global under DDP)."""
        raise NotImplementedError

    def cross_gram_weights(
        self,
        cross: torch.Tensor,
        gram: torch.Tensor,
        present: list[int],
        losses: torch.Tensor,
        context: StepContext,
    ) -> torch.Tensor:
        """With ``needs_cross_gram``: weights from ``J₁J₂ᵀ`` (m×m float64; J₁, J₂ the present
        tasks' Jacobians of the two halves of the batch) and the full batch's G."""
        raise NotImplementedError

    def representation_direction(
        self, rows: torch.Tensor, weights: torch.Tensor, local: list[int], context: StepContext
    ) -> torch.Tensor:
        """The gradient sent into the representation: ``Σ wᵢ ∂Lᵢ/∂z`` (GradDrop overrides it).

        ``rows``: this rank's task gradients of the representation (flat), for the tasks
        ``local`` (indices into ``self.tasks``); ``weights``: those tasks' weights.
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

    def updates_now(self, step: int) -> bool:
        """Whether this step computes the weights (``update_every``; the same on every rank)."""
        if self.update_every == 1 or step % self.update_every == 0:
            return True
        return not bool(torch.isfinite(self.cached_weights).any())

    def _reused(self, indices: list[int]) -> torch.Tensor:
        """The cached weights of ``indices``; a task never weighted yet gets the mean of the
        cached ones (the same on every rank)."""
        cached = self.cached_weights
        known = cached[torch.isfinite(cached)]
        fallback = known.mean() if known.numel() else cached.new_ones(())
        chosen = cached[indices]
        return torch.where(torch.isfinite(chosen), chosen, fallback)

    def reused_weights(
        self, meeting: Meeting, losses: Mapping[str, torch.Tensor], context: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """On a step that reuses the weights (``update_every``) at the only meeting place: the
        term that sends ``Σ wᵢ ∂Lᵢ/∂z`` into it from ONE backward pass of ``Σ wᵢ Lᵢ`` through
        the heads (no task gradient, no G, no all-reduce: the cached weights are the same on
        every rank). None on a step that computes the weights."""
        if self.updates_now(context.step):
            return None
        self.last_gram = None  # no G this step
        names = [n for n in self.tasks if n in losses and n in meeting.place.tasks]
        weights = self._reused([self.index[n] for n in names]).float()
        inputs = [leaf for leaf in meeting.leaves if leaf.requires_grad]
        direction: list[torch.Tensor | None] = [None] * len(meeting.leaves)
        if names:
            factor = context.grad_scale or 1.0
            weighted = sum(w * losses[n].float() for w, n in zip(weights, names, strict=True))
            got = iter(
                torch.autograd.grad(weighted * factor, inputs, retain_graph=True, allow_unused=True)
            )
            for i, leaf in enumerate(meeting.leaves):
                grad = next(got) if leaf.requires_grad else None
                direction[i] = None if grad is None else grad.float() / factor
        term = surrogate(direction, meeting) + self.zero_term()
        return term, {n: w.detach() for n, w in zip(names, weights, strict=True)}

    def meet(
        self,
        meeting: Meeting,
        grads: Mapping[str, LeafGrads],
        losses: Mapping[str, torch.Tensor],
        context: StepContext,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The rule at one meeting: G of its tasks (global under DDP, float64), the weights, and
        the term (zero in value) that sends ``Σ wᵢ gᵢ`` into the meeting's tensors (or, with the
        params-level Jacobian, ``Jᵀw`` into the shared parameters directly).

        ``grads``: this rank's gradient of each of the place's tasks with a local loss, with
        respect to ``meeting.leaves`` (float32, None where a task does not reach a leaf). Tasks
        outside the place are absent here. Returns the term and the weight of each task
        present at the place on any rank.
        """
        k = len(self.tasks)
        names = [name for name in self.tasks if name in grads]
        local = [self.index[name] for name in names]
        device = meeting.leaves[0].device
        stats = torch.zeros(2, k, device=device, dtype=torch.float64)
        for i, name in zip(local, names, strict=True):
            stats[0, i] = losses[name].detach().double()
            stats[1, i] = 1.0
        update = self.updates_now(context.step)
        solved = Solved()
        if update:
            solved = rule_inputs(self, meeting, grads, names, local, stats, context)
        elif context.all_reduce is not None:
            stats.copy_(context.all_reduce(stats))
        present = [i for i in range(k) if stats[1, i] > 0]
        loss_values = stats[0, present] / stats[1, present]

        finite = True
        if not present:
            weights = torch.zeros(0, device=device, dtype=torch.float64)
        elif not update:
            weights = self._reused(present).to(device)
            self.last_gram = None  # no G this step (the conflict monitor measures its own)
        else:
            self.last_gram = solved.gram.detach()
            sub = solved.gram[present][:, present]
            finite = bool(torch.isfinite(sub).all())
            usable = torch.isfinite(loss_values)
            kept = [j for j in range(len(present)) if usable[j]]
            if finite and not bool(usable.all()):
                # a non-finite loss with finite gradients: that task is left out of the rule
                # (weight 0, as if absent), so no rule state sees it
                bad = [self.tasks[present[j]] for j in range(len(present)) if not usable[j]]
                self.warn_once(
                    f"loss-{bad}",
                    "%s: non-finite loss of %s; weighted as absent (weight 0) this step",
                    type(self).__name__,
                    bad,
                )
            if finite:
                weights = torch.zeros(len(present), device=device, dtype=torch.float64)
                if kept:
                    keep = [present[j] for j in kept]
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(step_generator_seed(self.seed, context.step))
                        got = self._rule_weights(
                            solved, sub[kept][:, kept], keep, loss_values[kept], context
                        )
                    weights[kept] = got.to(device=device, dtype=torch.float64)
                finite = bool(torch.isfinite(weights).all())
                if not finite:
                    self.warn_once(
                        "nan-weights",
                        "%s gave non-finite weights; equal weights this step",
                        type(self).__name__,
                    )
                    weights = torch.ones(len(present), device=device, dtype=torch.float64)
            elif context.grad_scale is not None:
                # overflow under a GradScaler: NaN gradients make the scaler skip this step
                weights = torch.full((len(present),), float("nan"), device=device)
            else:
                self.warn_once(
                    "nonfinite",
                    "non-finite task gradients or losses; %s falls back to equal weights",
                    type(self).__name__,
                )
                weights = torch.ones(len(present), device=device, dtype=torch.float64)
            stored = kept if finite else list(range(len(present)))
            if stored and bool(torch.isfinite(weights).all()):
                index = [present[j] for j in stored]
                self.cached_weights[index] = weights[stored].to(self.cached_weights)

        position = {task: j for j, task in enumerate(present)}
        local_weights = weights[[position[i] for i in local]] if local else weights[:0]
        if solved.jacobian is not None and present and meeting.place.closed:
            parts, factor = solved.direction(weights, present)
            total = inject_into_parameters(parts, solved.jacobian.params, factor)
        else:
            total = surrogate(
                self._direction(meeting, grads, names, local_weights, local, context), meeting
            )
        extra = None
        if update and finite and present:
            extra = self.extra_loss(solved.gram[present][:, present], present, loss_values, context)
        total = total + (extra - extra.detach() if extra is not None else self.zero_term())
        shown = {self.tasks[i]: weights[j].detach().float() for j, i in enumerate(present)}
        return total, shown

    def _rule_weights(
        self,
        solved: Solved,
        sub: torch.Tensor,
        present: list[int],
        losses: torch.Tensor,
        context: StepContext,
    ) -> torch.Tensor:
        with single_threaded_blas():
            if self.needs_jacobian:
                jacobian = solved.task_jacobian(present)
                return self.jacobian_weights(jacobian, present, losses, context)
            if self.needs_cross_gram:
                assert solved.cross is not None
                cross = solved.cross[present][:, present]
                return self.cross_gram_weights(cross, sub, present, losses, context)
            return self.gram_weights(sub, present, losses, context)

    def _direction(
        self,
        meeting: Meeting,
        grads: Mapping[str, LeafGrads],
        names: list[str],
        weights: torch.Tensor,
        local: list[int],
        context: StepContext,
    ) -> list[torch.Tensor | None]:
        """``Σ wᵢ gᵢ`` per leaf (None where no task reaches it); a rule that overrides
        :meth:`representation_direction` gets the flat rows over the leaves some task reaches
        (40 heads on the pooled vector: its 512 numbers per sample, not the feature maps too)."""
        if type(self).representation_direction is not GradientWeighting.representation_direction:
            reached = [
                i for i in range(len(meeting.leaves)) if any(grads[n][i] is not None for n in names)
            ]
            rows = flat_rows(grads, names, meeting, reached)
            pieces = split_like(
                self.representation_direction(rows, weights, local, context),
                [meeting.leaves[i] for i in reached],
                keep_dtype=True,
            )
            placed: list[torch.Tensor | None] = [None] * len(meeting.leaves)
            for i, piece in zip(reached, pieces, strict=True):
                placed[i] = piece
            return placed
        direction: list[torch.Tensor | None] = []
        for index in range(len(meeting.leaves)):
            parts = [
                (w, grads[n][index])
                for w, n in zip(weights.float(), names, strict=True)
                if grads[n][index] is not None
            ]
            direction.append(
                sum((w * g for w, g in parts[1:]), start=parts[0][0] * parts[0][1])
                if parts
                else None
            )
        return direction
