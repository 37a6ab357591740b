"""What the backbone expects of its input images, handed to the data before any dataset is built.

A timm backbone was trained on images normalised with its own statistics and at its own size,
which timm records in the model's data config (``timm.data.resolve_model_data_config``): the
ImageNet mean and std for most CNNs, 0.5/0.5 for many ViTs, CLIP's numbers for CLIP towers.
Images normalised otherwise shift every activation of a pretrained backbone, so the data follows
the backbone; and the backbone is known only once the model is built. The hand-over is one
explicit step:

1. ``train.py`` (and ``eval.py``) build the data module (no dataset is read yet), then the model;
2. :func:`share_backbone_inputs` reads the backbone's :class:`InputConfig` and gives it to the
   data module's ``use_backbone_inputs(config)`` (duck-typed, like ``example_batch()``);
3. the data module passes it (``inputs=``) to each source it builds, and each source resolves
   its ``normalization`` and ``image_size`` against it.

A ``normalization`` setting (a source's own, or ``data.normalization`` for all of a data
module's sources) is one of:

* ``backbone``: the backbone's mean and std; the default of the natural-image sources;
* ``dataset``: the source's own statistics; the default of the generated Shapes data, which is
  trained from scratch (natural-image sources have no statistics of their own and refuse it);
* ``{mean: [...], std: [...]}``: these numbers, one per channel (or one for every channel).

``image_size: backbone`` (the image-file sources, NYUv2, Cityscapes) resizes to the backbone's
input size (H, W).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_mtl.errors import ConfigError

log = logging.getLogger(__name__)

BACKBONE = "backbone"
DATASET = "dataset"
NORMALIZATION_NAMES = (BACKBONE, DATASET)
# Images of the sources are RGB; a statistic holds one value per channel or one for all.
CHANNELS = 3


@dataclass(frozen=True)
class Normalization:
    """``(image - mean) / std`` per channel, for a C×H×W float image in [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        mean, std = self._tensors
        return (image - mean.to(image.dtype)) / std.to(image.dtype)

    @cached_property
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as C×1×1 tensors, built once (this runs for every sample)."""
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)  # noqa: E731
        return as_tensor(self.mean), as_tensor(self.std)

    def as_dict(self) -> dict[str, list[float]]:
        """Plain values, for hyperparameters and logs."""
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def of(cls, mean: Any, std: Any, key: str) -> Normalization:
        """Checked statistics: each a number or a list of 1 or 3 finite numbers, std > 0.

        A :class:`ConfigError` names ``key.mean`` or ``key.std`` and the value otherwise.
        """
        values = {}
        for name, value in (("mean", mean), ("std", std)):
            numbers = _numbers(value)
            if numbers is None or len(numbers) not in (1, CHANNELS):
                raise ConfigError(
                    f"{key}.{name}={_show(value)}: expected {CHANNELS} numbers (one per RGB "
                    "channel) or a single number for every channel"
                )
            if not all(math.isfinite(v) for v in numbers) or (name == "std" and min(numbers) <= 0):
                raise ConfigError(
                    f"{key}.{name}={_show(value)}: expected finite numbers"
                    + (", each > 0" if name == "std" else "")
                )
            values[name] = numbers
        return cls(values["mean"], values["std"])


# The statistics used where no backbone is known: a natural-image source built on its own
# (a notebook, a test, a benchmark that reads the data without a model), with its default
# ``normalization: backbone``. They are ImageNet's, which most timm backbones share; in training
# the backbone's own numbers reach the sources instead (see the module docstring).
FALLBACK_NORMALIZATION = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

NormalizationSpec = str | Mapping[str, Any] | Normalization


@dataclass(frozen=True)
class InputConfig:
    """The backbone's input: normalisation statistics and image size (H, W)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int]

    @property
    def normalization(self) -> Normalization:
        return Normalization(self.mean, self.std)

    @classmethod
    def from_timm(cls, data_config: Mapping[str, Any]) -> InputConfig:
        """From timm's data config (``input_size`` (C, H, W), ``mean``, ``std``, ...)."""
        missing = {"input_size", "mean", "std"} - set(data_config)
        if missing:
            raise ConfigError(
                f"the backbone's data config lacks {sorted(missing)} (got {dict(data_config)})"
            )
        stats = Normalization.of(
            data_config["mean"], data_config["std"], "the backbone's timm data config"
        )
        size = tuple(int(v) for v in data_config["input_size"])[-2:]
        return cls(stats.mean, stats.std, (size[0], size[1]))


def parse_normalization(value: Any, key: str) -> str | Normalization:
    """A checked ``normalization`` setting: ``backbone``, ``dataset`` or a :class:`Normalization`.

    Refuses, with a :class:`ConfigError` naming ``key``, an unknown name, a mapping whose keys
    are not exactly ``mean`` and ``std``, and bad statistics.
    """
    if isinstance(value, Normalization):
        return value
    if isinstance(value, str):
        if value not in NORMALIZATION_NAMES:
            raise ConfigError(
                f"{key}={value!r} is not a normalization: expected {' or '.join(NORMALIZATION_NAMES)}"
                ", or {mean: [...], std: [...]}"
            )
        return value
    if isinstance(value, Mapping):
        if set(value) != {"mean", "std"}:
            raise ConfigError(
                f"{key} has keys {sorted(map(str, value))}: explicit statistics are "
                "{mean: [...], std: [...]} (both, nothing else)"
            )
        return Normalization.of(value["mean"], value["std"], key)
    raise ConfigError(
        f"{key}={_show(value)}: expected {' or '.join(NORMALIZATION_NAMES)}, or "
        "{mean: [...], std: [...]}"
    )


def plain_normalization(value: Any) -> Any:
    """A setting as plain Python values (a DictConfig becomes a dict), for saved hyperparameters."""
    if isinstance(value, Normalization):
        return value.as_dict()
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def resolve_normalization(
    value: Any,
    inputs: InputConfig | None,
    who: str,
    own: Normalization | None = None,
    key: str = "normalization",
) -> Normalization:
    """The statistics a source applies, from its ``normalization`` setting.

    ``backbone``: the backbone's (``inputs``), or :data:`FALLBACK_NORMALIZATION` when the
    source is used alone; ``dataset``: ``own`` (a ConfigError when the source has none).
    """
    spec = parse_normalization(value, f"{who}: {key}")
    if isinstance(spec, Normalization):
        return spec
    if spec == BACKBONE:
        return inputs.normalization if inputs is not None else FALLBACK_NORMALIZATION
    if own is None:
        raise ConfigError(
            f"{who}: {key}=dataset, but {who} has no statistics of its own (natural images "
            "follow the backbone): use backbone, or {mean: [...], std: [...]}"
        )
    return own


def resolve_image_size(image_size: Any, inputs: InputConfig | None, who: str) -> Any:
    """``image_size`` with the sentinel ``backbone`` replaced by the backbone's (H, W)."""
    if not (isinstance(image_size, str) and image_size == BACKBONE):
        return image_size
    if inputs is None:
        raise ConfigError(
            f"{who}: image_size=backbone needs the backbone's input size, which the data module "
            "receives from the model in training (datamodule.use_backbone_inputs). Used alone, "
            "give the dataset an int or [height, width]."
        )
    return inputs.size


def accepted_keywords(factory: Any) -> set[str]:
    """The keyword names a callable (a class, a ``functools.partial``...) takes by name."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return set()
    return {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


# ------------------------------------------------------------------------- model -> data module
def backbone_input_config(model: Any) -> InputConfig | None:
    """The input config of ``model``'s backbone (``model.net.architecture.backbone``), or None.

    The size is the one the backbone was built for when that differs from timm's data config:
    a ViT created with ``img_size=64`` (``model.backbone.model_kwargs``) accepts 64 px only,
    while its pretrained config still says 224.
    """
    net = getattr(model, "net", None)
    backbone = getattr(getattr(net, "architecture", None), "backbone", None)
    if backbone is None or not callable(getattr(backbone, "data_config", None)):
        return None
    config = InputConfig.from_timm(backbone.data_config())
    built = _fixed_input_size(backbone)
    if built is not None and built != config.size:
        config = InputConfig(config.mean, config.std, built)
    return config


def _fixed_input_size(backbone: torch.nn.Module) -> tuple[int, int] | None:
    """The (H, W) a patch embedding insists on (``strict_img_size``), if the model has one."""
    from timm.layers import PatchEmbed

    for module in backbone.modules():
        if isinstance(module, PatchEmbed):
            if module.img_size is None or not module.strict_img_size:
                return None  # any size works (dynamic_img_size): timm's config stands
            height, width = (int(v) for v in module.img_size)
            return (height, width)
    return None


def share_backbone_inputs(datamodule: Any, model: Any) -> InputConfig | None:
    """Give ``datamodule`` the backbone's normalisation and input size, before it reads data.

    Does nothing for a data module without ``use_backbone_inputs`` or a model without a timm
    backbone. Returns the config given.
    """
    use = getattr(datamodule, "use_backbone_inputs", None)
    if use is None:
        return None
    config = backbone_input_config(model)
    if config is None:
        log.warning("the model has no backbone data config: the data keeps its own inputs")
        return None
    log.info(
        "backbone inputs: mean=%s std=%s size=%s", list(config.mean), list(config.std), config.size
    )
    use(config)
    return config


def share_task_targets(datamodule: Any, model: Any) -> list[str] | None:
    """Tell ``datamodule`` which label keys the model's tasks read (``use_targets``, duck-typed
    like ``use_backbone_inputs``): merged data then leaves out the sources that label none of
    them, so a single-task baseline on merged data trains on its own task's samples only.
    Returns the keys given (None when either side does not take part)."""
    use = getattr(datamodule, "use_targets", None)
    tasks = getattr(model, "tasks", None)
    if use is None or tasks is None:
        return None
    targets = list(dict.fromkeys(task.target for task in tasks))
    use(targets)
    return targets


def _numbers(value: Any) -> tuple[float, ...] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return (float(value),)
    if isinstance(value, Sequence | ListConfig) and not isinstance(value, str):
        items = list(value)
        if not items or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in items
        ):
            return None
        return tuple(float(v) for v in items)
    return None


def _show(value: Any) -> str:
    if isinstance(value, DictConfig | ListConfig):
        return repr(OmegaConf.to_container(value))
    return repr(value)
