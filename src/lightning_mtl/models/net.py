"""The network without Lightning: an architecture and one head per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_mtl.errors import ConfigError
from lightning_mtl.models.architectures import Architecture, ArchitectureOutput
from lightning_mtl.models.backbone import Features
from lightning_mtl.models.meeting import Meeting, task_views


class MultiTaskNet(nn.Module):
    """``forward(images) -> {task: output}``; a plain ``nn.Module``, usable in any PyTorch loop
    (see the benchmarks and docs/weighting.md, "A balancer in a plain PyTorch loop")."""

    def __init__(self, architecture: Architecture, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.architecture = architecture
        self.heads = nn.ModuleDict(heads)

    def forward_features(self, images: torch.Tensor, cut: bool = False) -> ArchitectureOutput:
        """Each task's features and the meetings; ``cut``: the modules after each meeting place
        read it detached (for gradient methods, see :mod:`lightning_mtl.models.meeting`)."""
        return self.architecture(images, cut=cut)

    def forward_heads(
        self,
        features: Mapping[str, Features],
        image_size: Sequence[int],
        meetings: Sequence[Meeting] = (),
    ) -> dict[str, torch.Tensor]:
        """Each head on its task's features; with the (cut) ``meetings`` of a gradient method's
        step, each head reads its own alias of the leaves (:func:`task_views`)."""
        size = tuple(image_size)
        if meetings:
            aliased = {
                name: task_views(meetings, name, [read.pooled, *read.maps])
                for name, read in features.items()
            }
            features = {name: Features(views[0], views[1:]) for name, views in aliased.items()}
        return {name: head(features[name], size) for name, head in self.heads.items()}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_heads(self.forward_features(images).features, images.shape[-2:])

    def compile_parts(self, options: bool | Mapping[str, Any] = True) -> None:
        """``torch.compile`` the architecture and each head in place (``model.compile``): the
        training step calls them, not this module's ``forward``; in place, the state-dict keys
        (and so checkpoints) stay those of the eager model. ``options``: true, or
        ``torch.compile``'s keyword arguments (``{"mode": "max-autotune"}``)."""
        if not isinstance(options, bool | Mapping):
            raise ConfigError(
                f"model.compile={options!r}: accepted values: true, false, or a mapping of "
                "torch.compile's options (e.g. {mode: max-autotune})"
            )
        # Gradient methods and the gradient monitor differentiate parts of the graph more than
        # once (retain_graph=True), which a compiled backward with donated buffers refuses.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        for part in (self.architecture, *self.heads.values()):
            part.compile(**(dict(options) if isinstance(options, Mapping) else {}))
