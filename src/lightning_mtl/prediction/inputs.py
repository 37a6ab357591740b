"""What ``mtl-predict`` and ``mtl-export`` feed the model: the normalisation and size of its
images (:class:`InputSpec`; resized as the training sources resize theirs), resolved from
``preprocess`` (``data``, ``backbone`` or explicit values), and the data settings taken over
from (or compared with) those the checkpoint was trained with."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, open_dict

from lightning_mtl.checkpointing import read_checkpoint
from lightning_mtl.data.inputs import (
    CHANNELS,
    InputConfig,
    Normalization,
    backbone_input_config,
    parse_normalization,
    share_backbone_inputs,
    share_task_targets,
)
from lightning_mtl.data.sources.base import IMAGE_RESIZE, as_size
from lightning_mtl.errors import ConfigError
from lightning_mtl.tasks import plain_container

if TYPE_CHECKING:  # lightning_mtl.module imports this package (predicted)
    import lightning as L

    from lightning_mtl.module import MultiTaskModule

log = logging.getLogger(__name__)

BACKBONE, DATA = "backbone", "data"
#: the data settings compared with the checkpoint's (they decide what the model was fed)
INPUT_SETTINGS = ("normalization", "image_size", "sources")


@dataclass(frozen=True)
class InputSpec:
    """What the model is fed: RGB images in [0, 1], resized to ``size`` (H, W) as every training
    source resizes its images (:data:`~lightning_mtl.data.sources.base.IMAGE_RESIZE`, through
    :func:`~lightning_mtl.data.sources.images.load_image`), then ``(x - mean) / std`` per
    channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: tuple[int, int]

    @property
    def normalization(self) -> Normalization:
        return Normalization(self.mean, self.std)

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            **IMAGE_RESIZE,
        }


def _three(values: Sequence[float]) -> tuple[float, float, float]:
    """One value per RGB channel (a statistic given once applies to every channel)."""
    items = [float(v) for v in values] * (CHANNELS if len(values) == 1 else 1)
    return (items[0], items[1], items[2])


def resolve_inputs(
    preprocess: Mapping[str, Any], model: MultiTaskModule, datamodule: Any | None
) -> InputSpec:
    """The inputs of ``preprocess`` (``normalization`` and ``image_size``: ``data``,
    ``backbone`` or explicit values) for ``model``; ``datamodule`` answers ``data``."""
    own = backbone_input_config(model)  # the backbone's mean, std and size (timm's data config)
    if own is None:
        raise ConfigError("the checkpoint's model has no timm backbone to take the inputs from")
    in_chans = int(model.hparams.get("backbone", {}).get("in_chans", CHANNELS))
    if in_chans != CHANNELS:
        raise ConfigError(
            f"the checkpoint's backbone takes in_chans={in_chans} channels: folder images and "
            f"the exported model's inputs are RGB ({CHANNELS} channels)"
        )
    options = dict(plain_container(preprocess) or {})
    unknown = set(options) - {"normalization", "image_size"}
    if unknown:
        raise ConfigError(
            f"preprocess has unknown keys {sorted(unknown)}; accepted: normalization, image_size"
        )
    normalization = options.get("normalization", DATA)
    image_size = options.get("image_size", DATA)
    fed = data_inputs(datamodule) if reads_data(options) else own
    stats = _named(normalization, {DATA: fed.normalization, BACKBONE: own.normalization})
    size = _named(image_size, {DATA: fed.size, BACKBONE: own.size})
    stats = stats or _explicit_normalization(normalization)
    size = size or _explicit_size(image_size)
    return InputSpec(_three(stats.mean), _three(stats.std), size)


def _named(value: Any, named: Mapping[str, Any]) -> Any:
    """``named[value]`` for a name of ``named`` (``data``, ``backbone``), else None."""
    return named.get(value) if isinstance(value, str) else None


def _explicit_normalization(value: Any) -> Normalization:
    """``preprocess.normalization`` given as ``{mean: [...], std: [...]}``, checked."""
    if not isinstance(value, str):
        spec = parse_normalization(value, "preprocess.normalization")
        if isinstance(spec, Normalization):
            return spec
    raise ConfigError(
        f"preprocess.normalization={value!r}: expected {DATA}, {BACKBONE} or "
        "{mean: [r, g, b], std: [r, g, b]}"
    )


def _explicit_size(value: Any) -> tuple[int, int]:
    """``preprocess.image_size`` given as an integer or ``[height, width]``, checked."""
    try:
        size = as_size(value) if not isinstance(value, str | bool) else None
    except (TypeError, ValueError):
        size = None
    if size is None or min(size) <= 0:
        raise ConfigError(
            f"preprocess.image_size={value!r}: expected {DATA}, {BACKBONE}, an integer or "
            "[height, width]"
        )
    return size


def data_inputs(datamodule: Any | None) -> InputConfig:
    """The statistics and image size the data module's evaluation split feeds the model (its
    first source's; a warning when its sources differ)."""
    if datamodule is None:
        raise ConfigError("preprocess=data needs a data config (data=...)")
    datamodule.setup("test")
    merged = getattr(datamodule, "splits", {}).get("test")
    sources = list(getattr(merged, "datasets", []) or [])
    stats = [getattr(source, "normalization", None) for source in sources]
    if not sources or not all(isinstance(s, Normalization) for s in stats):
        raise ConfigError(
            f"preprocess.normalization=data / image_size=data: the data module "
            f"{type(datamodule).__name__} does not say how it normalises its test split (its "
            "sources have no 'normalization'); give preprocess.normalization=backbone or "
            "{mean: [...], std: [...]}, and preprocess.image_size=backbone or [height, width]"
        )
    sizes = [tuple(int(v) for v in source[0]["image"].shape[-2:]) for source in sources]
    if len(set(stats)) > 1 or len(set(sizes)) > 1:
        log.warning(
            "the data's sources differ in normalisation or size (%s, %s): using the first one's",
            [s.as_dict() for s in stats],  # type: ignore[union-attr]
            sizes,
        )
    first = stats[0]
    assert isinstance(first, Normalization)
    return InputConfig(first.mean, first.std, (sizes[0][0], sizes[0][1]))


# what prepares an image: taken from the checkpoint unless the command line sets data.*
PREPARATION = ("normalization", "image_size")


def reads_data(preprocess: Mapping[str, Any]) -> bool:
    """Whether ``preprocess`` takes the normalisation or the image size from the data config
    (``data``, the default of both), so the data module must be built."""
    return DATA in (preprocess.get("normalization", DATA), preprocess.get("image_size", DATA))


def trained_datamodule(
    cfg: DictConfig, model: MultiTaskModule, ckpt_path: str
) -> L.LightningDataModule:
    """``cfg.data`` prepared as the checkpoint was trained (:func:`adopt_trained_preparation`),
    fed the backbone's inputs and the tasks' targets as training fed it, and compared with the
    checkpoint's data settings (:func:`warn_if_data_differs`)."""
    adopt_trained_preparation(cfg, ckpt_path)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    share_backbone_inputs(datamodule, model)  # the backbone's normalisation and input size
    share_task_targets(datamodule, model)  # merged data: the sources that label the tasks
    warn_if_data_differs(ckpt_path, datamodule)
    return datamodule


def adopt_trained_preparation(cfg: DictConfig, ckpt_path: str) -> list[str]:
    """Set the data config's image size and normalisation to those the checkpoint was trained
    with (its ``datamodule_hyper_parameters``), so ``mtl-predict ckpt_path=<run>`` prepares
    images as training did without repeating the run's data overrides. A command line that sets
    any ``data`` key keeps its data config as given. Returns the keys taken over."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        given = [o.lstrip("+~") for o in HydraConfig.get().overrides.task]
        if any(o.startswith(("data.", "data=")) for o in given):
            return []
    trained = read_checkpoint(ckpt_path, mmap=True).get("datamodule_hyper_parameters")
    if not isinstance(trained, Mapping) or "data" not in cfg:
        return []
    adopted = []
    with open_dict(cfg):
        for key in PREPARATION:
            same = key not in cfg.data or plain_container(cfg.data[key]) == trained.get(key)
            if key in trained and not same:
                cfg.data[key] = trained[key]
                adopted.append(key)
    if adopted:
        shown = ", ".join(f"{k}={_short(trained[k])}" for k in adopted)
        log.info("images prepared as %s was trained: %s", ckpt_path, shown)
    return adopted


def warn_if_data_differs(ckpt_path: str, datamodule: Any) -> list[str]:
    """Warn when the data config's input settings (normalisation, image size, sources) or data
    module differ from those the checkpoint was trained with; returns the differing keys."""
    checkpoint = read_checkpoint(ckpt_path, mmap=True)
    trained = checkpoint.get("datamodule_hyper_parameters")
    current = getattr(datamodule, "hparams", None)
    if not isinstance(trained, Mapping) or current is None:
        return []
    differ = [
        key
        for key in INPUT_SETTINGS
        if key in trained and key in current and plain_container(current[key]) != trained[key]
    ]
    shown = [
        f"{k} (trained: {_short(trained[k])}, now: {_short(plain_container(current[k]))})"
        for k in differ
    ]
    name = type(datamodule).__qualname__
    if checkpoint.get("datamodule_hparams_name") and name not in checkpoint:
        differ.insert(0, "data module")
        shown.insert(0, f"the data module (now {name})")
    if differ:
        log.warning(
            "the data config differs from the one %s was trained with: %s. Compose with the "
            "run's data overrides (as for mtl-eval), or the images are not prepared as in training",
            ckpt_path,
            "; ".join(shown),
        )
    return differ


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
