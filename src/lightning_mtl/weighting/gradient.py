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
   (``level=params``: one more backward pass per task, ``∂Lᵢ/∂θ = (∂z/∂θ)ᵀ ∂Lᵢ/∂z``; within
   ``jacobian_budget_mb`` G from the layers' ghost products where they are cheaper
   (:mod:`~lightning_mtl.weighting.ghost_gram`, one process) or else from the k×D Jacobian,
   above it G alone by torchjd's autogram engine; :mod:`~lightning_mtl.weighting.rule_inputs`
   forms what the rule reads);
3. ``w = rule(G)`` (detached; under DDP G is global, so every rank gets the same w; guarded
   and cached for ``update_every`` in :mod:`~lightning_mtl.weighting.rule_step`);
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

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.meeting import LEVELS, Meeting, MeetingPlace
from lightning_mtl.weighting.base import Combined, StepContext, Weighting
from lightning_mtl.weighting.ghost_gram import GhostGram
from lightning_mtl.weighting.meetings import LeafGrads, balance, check_gradient_step
from lightning_mtl.weighting.rule_step import meet_at, reused_at
from lightning_mtl.weighting.shared_gramian import SharedGramian

log = logging.getLogger(__name__)


#: default of ``weighting.jacobian_budget_mb``: the params level forms the k×D Jacobian (one
#: k-batched backward, no second one) when it takes at most this many MiB, else G alone
JACOBIAN_BUDGET_MB = 1024.0


class GradientWeighting(Weighting):
    """Base of the gradient-based methods; subclasses implement :meth:`gram_weights` (or
    :meth:`jacobian_weights` with ``needs_jacobian``, :meth:`cross_gram_weights` with
    ``needs_cross_gram``).

    Args:
        level: ``representation`` (gradients with respect to the backbone's output, one backward
            through the backbone) or ``params`` (with respect to the shared parameters, k more).
        seed: seeds the rule's randomness per step (see :func:`~lightning_mtl.weighting.rule_step.step_generator_seed`).

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
        self._gram_sources: set[tuple[str, str]] = set()
        #: the params-level Gram engine serving each meeting place (by name) this step
        self._gramians: dict[str, GhostGram | SharedGramian] = {}
        self._engines: dict[tuple[str, str], GhostGram | SharedGramian] = {}

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

    def prepare(
        self, places: Sequence[MeetingPlace] | None, world_size: int = 1, step: int | None = None
    ) -> None:
        """Before a step's forward pass, at the params level of a single process: hook each
        place's modules so that G may come without the k×D Jacobian, from the ghost products
        where the Jacobian would fit ``jacobian_budget_mb`` (:mod:`~lightning_mtl.weighting.
        ghost_gram`, which may still leave the step to the Jacobian), else from torchjd's
        autogram engine (:mod:`~lightning_mtl.weighting.shared_gramian`); None unhooks them
        all. Without this call (or under DDP) the params level forms the Jacobian. A ``step``
        that reuses the weights (``update_every``) forms no G, so nothing is hooked for it."""
        for gramian in self._gramians.values():
            gramian.close()
        if places is None or self.level != "params" or world_size != 1 or self.needs_jacobian:
            return
        if step is not None and not self.updates_now(step):
            return
        for place in places:
            # both engines of a place are kept: one switched off stays off when the budget
            # (the trainable parameters, with gradual unfreezing) moves the place between them
            kind = GhostGram if self._jacobian_fits(place) else SharedGramian
            engine = self._engines.setdefault((place.name, kind.__name__), kind())
            self._gramians[place.name] = engine
            engine.prepare(place)

    def _jacobian_fits(self, place: MeetingPlace) -> bool:
        rows = len(place.tasks) * (2 if self.needs_cross_gram else 1)
        size = rows * sum(p.numel() for p in place.trainable_parameters()) * 4
        return size <= self.jacobian_budget_mb * 2**20

    def warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def note_gram_source(self, place: str, source: str) -> None:
        """One INFO line per place and source of the params-level G, the first time that source
        serves it (the ghost plan, the budget and the engines' checks may change it)."""
        if (place, source) not in self._gram_sources:
            self._gram_sources.add((place, source))
            log.info(
                "%s: the params-level G at %r comes from %s", type(self).__name__, place, source
            )

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
        global under DDP). It is the step's own buffer, not a copy (the step then sums ``Jᵀw``
        into it): read it here, keep no reference."""
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

    @property
    def custom_direction(self) -> bool:
        """Whether the rule overrides :meth:`representation_direction` (GradDrop)."""
        return type(self).representation_direction is not GradientWeighting.representation_direction

    def reused_weights(
        self, meeting: Meeting, losses: Mapping[str, torch.Tensor], context: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The term and weights of a step that reuses the cached weights (``update_every``) at
        the only meeting place, or None on a step that computes them (:func:`reused_at`)."""
        return reused_at(self, meeting, losses, context)

    def meet(
        self,
        meeting: Meeting,
        grads: Mapping[str, LeafGrads],
        losses: Mapping[str, torch.Tensor],
        context: StepContext,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The term and the weights of this rule at one meeting (:func:`meet_at`)."""
        return meet_at(self, meeting, grads, losses, context)
