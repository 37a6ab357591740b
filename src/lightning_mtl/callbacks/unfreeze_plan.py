"""When to freeze and unfreeze backbone stages: the options of ``configs/finetune/``, checked.

Pure bookkeeping, no Lightning: which bottom stages are frozen at the start, which of them
unfreeze (the top frozen stage first, ``keep_frozen`` kept), and how many have unfrozen once a
given epoch or optimizer step has begun. :class:`lightning_mtl.callbacks.layerwise.
LayerwiseTraining` applies it to a model and its optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_mtl.errors import ConfigError

INTERVALS = ("epoch", "step")
KEY = "finetune"  # where the options live in the composed config (configs/finetune/)


@dataclass
class UnfreezePlan:
    """The layer-wise training options (see ``LayerwiseTraining`` for each one's meaning).

    ``frozen`` holds the stages frozen at the start (``0 .. N-1``) once :meth:`check` has
    validated the options against an architecture.
    """

    freeze: int | str = "all"
    unfreeze: bool = False
    interval: str = "epoch"
    start: int = 1
    every: int = 1
    stages_per_unfreeze: int = 1
    keep_frozen: int = 0
    warmup_steps: int = 0
    frozen: list[int] = field(default_factory=list)

    def candidates(self) -> list[int]:
        """The stages to unfreeze, in order: the top frozen stage first, ``keep_frozen`` kept."""
        if not self.unfreeze:
            return []
        return list(range(len(self.frozen) - 1, self.keep_frozen - 1, -1))

    def target(self, progress: int) -> int:
        """How many stages are unfrozen once ``progress`` epochs (or steps) have begun."""
        if not self.unfreeze or progress < self.start:
            return 0
        events = (progress - self.start) // self.every + 1
        return min(len(self.candidates()), events * self.stages_per_unfreeze)

    def check(self, num_stages: int, staged: bool, backbone: str = "the backbone") -> int:
        """Validate the options against an architecture of ``num_stages`` stages (``staged``:
        whether the backbone runs stage by stage); set :attr:`frozen` and return its length."""
        if self.interval not in INTERVALS:
            raise ConfigError(
                f"{KEY}.interval={self.interval!r}: accepted values: {', '.join(INTERVALS)}"
            )
        if isinstance(self.freeze, str):
            if self.freeze != "all":
                raise ConfigError(
                    f"{KEY}.freeze={self.freeze!r}: accepted values: all, or a number of stages "
                    f"from 0 to {num_stages}"
                )
            frozen = num_stages
        elif isinstance(self.freeze, bool) or not isinstance(self.freeze, int):
            raise ConfigError(
                f"{KEY}.freeze={self.freeze!r}: accepted values: all, or a number of stages from "
                f"0 to {num_stages}"
            )
        elif not staged and self.freeze > 0:
            raise ConfigError(
                f"{KEY}.freeze={self.freeze}: {backbone} does not run stage by stage (timm builds "
                "it as one block), so it cannot be frozen stage by stage. Accepted values: all "
                "(the whole backbone) or 0; backbones that run stage by stage: CNNs timm builds as "
                "FeatureListNet (resnet*, convnext*, regnet*, swin*, ...), EfficientNet / "
                "MobileNet and VisionTransformer models (vit_*, deit_*)"
            )
        elif not 0 <= self.freeze <= num_stages:
            raise ConfigError(
                f"{KEY}.freeze={self.freeze}: {backbone} has {num_stages} stages (0 is the stem); "
                f"accepted values: all, or a number of stages from 0 to {num_stages}"
            )
        else:
            frozen = self.freeze
        counts = {
            "start": (self.start, 0),
            "every": (self.every, 1),
            "stages_per_unfreeze": (self.stages_per_unfreeze, 1),
            "warmup_steps": (self.warmup_steps, 0),
            "keep_frozen": (self.keep_frozen, 0),
        }
        for name, (value, least) in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{KEY}.{name}={value!r}: expected an integer >= {least}")
        if self.keep_frozen > frozen:
            raise ConfigError(
                f"{KEY}.keep_frozen={self.keep_frozen}: only {frozen} stage(s) are frozen "
                f"({KEY}.freeze={self.freeze}); accepted values: 0 to {frozen}"
            )
        if not isinstance(self.unfreeze, bool):
            raise ConfigError(f"{KEY}.unfreeze={self.unfreeze!r}: accepted values: true, false")
        self.frozen = list(range(frozen))
        return frozen

    def describe(self) -> str:
        """The unfreezing schedule, for the log."""
        every = f"every {self.every} {self.interval}(s)"
        return (
            f"; unfreezing {self.stages_per_unfreeze} stage(s) from {self.interval} {self.start}, "
            f"{every}, top first, down to stage {self.keep_frozen}"
        )
