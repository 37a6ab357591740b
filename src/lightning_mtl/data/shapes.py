"""Shapes: a procedurally generated multi-task image dataset that needs no files.

Each sample is a small scene drawn from ``numpy.random.default_rng((seed, index))``, so it is
deterministic from the seed and the index, costs no disk and is generated inside the data
loader workers. A scene is a floor that recedes towards the top of the image and 1 to
``max_objects`` coloured shapes (circle, square, triangle) standing at depths between
``near`` and ``far``. Perspective ties the cues together: a nearer object is larger, brighter
and occludes farther ones. That is what makes the tasks *related* (they share visual features,
so a shared backbone helps) while their losses live on very different scales:

========================  ======================  ===============================  =============
target key                kind                    value                            usual loss
========================  ======================  ===============================  =============
``segmentation``          dense classification    H×W int64, 0 = floor, 1..3 shape  cross-entropy
``depth``                 dense regression        1×H×W float32, depth units 2..12   L1 (~3 at start)
``count``                 image regression        (1,) float32 visible objects      MSE (~5 at start)
``dominant_color``        image classification    int64 colour of most object pixels cross-entropy
``colors``                multi-label             (6,) float32 colours present      BCE
========================  ======================  ===============================  =============

The images are normalised with the generated data's own statistics (``normalization:
dataset``, the default: the scenes are synthetic and trained from scratch), or with the
backbone's (``normalization: backbone``, for a pretrained backbone) or explicit ones
(``{mean: [...], std: [...]}``); see :mod:`lightning_mtl.data.inputs`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_mtl.data.inputs import (
    InputConfig,
    Normalization,
    NormalizationSpec,
    parse_normalization,
    plain_normalization,
    resolve_normalization,
)
from lightning_mtl.data.merged import MergedDataModule
from lightning_mtl.errors import ConfigError

SHAPES = ("circle", "square", "triangle")
PALETTE = np.array(
    [
        [0.90, 0.15, 0.15],  # red
        [0.15, 0.75, 0.20],  # green
        [0.20, 0.35, 0.95],  # blue
        [0.95, 0.85, 0.10],  # yellow
        [0.85, 0.20, 0.85],  # magenta
        [0.10, 0.85, 0.85],  # cyan
    ],
    dtype=np.float32,
)
COLOR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
# Normalisation of the generated images (roughly their mean and standard deviation).
IMAGE_MEAN, IMAGE_STD = 0.42, 0.20
SHAPES_NORMALIZATION = Normalization((IMAGE_MEAN,), (IMAGE_STD,))


@dataclass(frozen=True)
class SceneConfig:
    """The knobs of the generator; defaults keep a 2-core CPU run under a few minutes."""

    image_size: int = 64
    max_objects: int = 5
    near: float = 2.0
    far: float = 12.0
    noise: float = 0.04


class ShapesDataset(Dataset[dict[str, Any]]):
    """``length`` scenes drawn from ``seed``; item ``i`` is always the same scene.

    ``normalization``: the statistics applied to the images (None: the generated data's own).
    """

    target_names: tuple[str, ...] = ("segmentation", "depth", "count", "dominant_color", "colors")
    num_classes = {"segmentation": 1 + len(SHAPES), "dominant_color": len(PALETTE)}
    num_labels = {"colors": len(PALETTE)}

    def __init__(
        self,
        length: int,
        seed: int,
        scene: SceneConfig | None = None,
        normalization: Normalization | None = None,
    ) -> None:
        if length <= 0:
            raise ValueError(f"ShapesDataset length must be positive, got {length}")
        self.length = length
        self.seed = seed
        self.scene = scene or SceneConfig()
        self.normalization = normalization or SHAPES_NORMALIZATION
        size = self.scene.image_size
        self._yy, self._xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        image, targets = self.render(np.random.default_rng((self.seed, index)))
        sample_targets = {
            key: torch.from_numpy(np.asarray(value)) for key, value in targets.items()
        }
        return {
            "image": self.normalization(torch.from_numpy(image)),
            "targets": sample_targets,
            "mask": {key: torch.tensor(True) for key in sample_targets},
        }

    def render(self, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Draw one scene: a 3×H×W image in [0, 1] and its targets."""
        cfg, yy, xx = self.scene, self._yy, self._xx
        size = cfg.image_size
        # Floor: far at the top row, near at the bottom row; lit by a random tint.
        depth = cfg.far + (cfg.near - cfg.far) * (yy / (size - 1))
        tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
        shade = 1.0 - 0.6 * (depth - cfg.near) / (cfg.far - cfg.near)
        image = shade[None] * tint[:, None, None] * 0.7
        segmentation = np.zeros((size, size), dtype=np.int64)
        owner = np.full((size, size), -1, dtype=np.int64)  # which object each pixel shows

        count = int(rng.integers(1, cfg.max_objects + 1))
        kinds = rng.integers(0, len(SHAPES), size=count)
        colors = rng.integers(0, len(PALETTE), size=count)
        depths = rng.uniform(cfg.near, cfg.far * 0.8, size=count).astype(np.float32)
        centers = rng.uniform(0.1 * size, 0.9 * size, size=(count, 2)).astype(np.float32)
        for i in np.argsort(-depths):  # painter's algorithm: far objects first
            radius = size * 0.6 / depths[i] + 2.0
            cy, cx = centers[i]
            mask = _shape_mask(int(kinds[i]), yy - cy, xx - cx, radius)
            brightness = 1.15 - 0.5 * (depths[i] - cfg.near) / (cfg.far - cfg.near)
            image[:, mask] = (PALETTE[colors[i]] * brightness)[:, None]
            segmentation[mask] = kinds[i] + 1
            owner[mask] = i
            depth = np.where(mask, depths[i], depth)

        image = image + rng.normal(0.0, cfg.noise, size=image.shape).astype(np.float32)
        area_by_color = np.bincount(colors[owner[owner >= 0]], minlength=len(PALETTE))
        visible = np.unique(owner[owner >= 0])  # fully occluded objects are not counted
        colors_present = np.zeros(len(PALETTE), dtype=np.float32)
        colors_present[colors[visible]] = 1.0
        targets = {
            "segmentation": segmentation,
            "depth": depth[None].astype(np.float32),
            "count": np.array([len(visible)], dtype=np.float32),
            # the colour covering the most visible object pixels (ties: the lower index)
            "dominant_color": np.array(np.argmax(area_by_color), dtype=np.int64),
            "colors": colors_present,
        }
        return np.clip(image, 0.0, 1.0).astype(np.float32), targets


def _shape_mask(kind: int, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    if kind == 0:  # circle
        return dy * dy + dx * dx <= radius * radius
    if kind == 1:  # square
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    # triangle, apex up: |dx| grows linearly from the apex to the base
    return (dy >= -radius) & (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)


SPLITS = ("train", "val", "test")


def split_seed(seed: int, offset: int) -> int:
    """The seed of split number ``offset`` (train 0, val 1, test 2) of a dataset seeded ``seed``:
    the splits never share a scene."""
    return int(np.random.SeedSequence((seed, offset)).generate_state(1)[0])


class ShapesDataModule(MergedDataModule):
    """Train/val/test splits of the Shapes scenes: a :class:`MergedDataModule` with one
    :class:`ShapesSource` (named ``shapes``), so the default run goes through the same sampler,
    DDP sharding, mid-epoch resume, evaluation loaders and bad-sample policy as merged data.

    The splits never share a scene: split ``s`` uses seed ``(seed, s)``; ``seed`` is the scenes'
    (the dataset's identity), ``sampling_seed`` the order's (``${seed}`` in the config, so it
    follows the run's). ``normalization``: ``dataset`` (the scenes' own statistics, the
    default), ``backbone`` (the statistics :meth:`use_backbone_inputs` gives) or ``{mean: [...],
    std: [...]}``. ``sampling``: ``steps_per_epoch`` and ``drop_last`` as for merged data.
    """

    #: the name of the one source (in warnings and errors about its samples)
    SOURCE = "shapes"

    def __init__(
        self,
        train_size: int = 4096,
        val_size: int = 512,
        test_size: int = 512,
        batch_size: int = 32,
        num_workers: int = 1,
        seed: int = 0,
        image_size: int = 64,
        max_objects: int = 5,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        normalization: NormalizationSpec = "dataset",
        sampling_seed: int = 0,
        sampling: Mapping[str, Any] | None = None,
        on_bad_sample: str = "raise",
        max_bad_fraction: float = 0.01,
    ) -> None:
        spec = parse_normalization(normalization, "data.normalization")
        sizes = {"train": train_size, "val": val_size, "test": test_size}
        for split, size in sizes.items():
            if not isinstance(size, int) or size <= 0:
                raise ConfigError(f"data.{split}_size={size!r}: expected a positive integer")
        for key, value in (("image_size", image_size), ("max_objects", max_objects)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"data.{key}={value!r}: expected a positive integer")
        factory = functools.partial(
            ShapesSource,
            sizes=sizes,
            seed=seed,
            image_size=image_size,
            max_objects=max_objects,
            normalization=spec,
        )
        super().__init__(
            {self.SOURCE: factory},
            batch_size=batch_size,
            sampling=sampling,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            seed=sampling_seed,
            on_bad_sample=on_bad_sample,
            max_bad_fraction=max_bad_fraction,
        )
        normalization = plain_normalization(normalization)  # saved as plain values
        sampling = dict(sampling or {})  # plain values too (checkpoints load weights_only)
        self.save_hyperparameters(logger=False)


class ShapesSource(ShapesDataset):
    """One split of a generated Shapes source for :class:`~lightning_mtl.data.MergedDataModule`
    that labels only ``targets`` (all five by default): the embedded stand-in for a real
    dataset that annotates some of the tasks.

    Two sources with different ``seed`` draw different scenes, and ``image_size`` may differ
    between sources (with homogeneous batches). Split s of source seed k draws from seed
    ``(k, s)``, as :class:`ShapesDataModule` does. ``normalization`` and ``inputs`` (the
    backbone's input config, passed by the data module) work as in :class:`ShapesDataModule`.
    """

    def __init__(
        self,
        split: str = "train",
        sizes: dict[str, int] | None = None,
        targets: list[str] | tuple[str, ...] | None = None,
        seed: int = 0,
        image_size: int = 64,
        max_objects: int = 5,
        normalization: NormalizationSpec = "dataset",
        inputs: InputConfig | None = None,
    ) -> None:
        sizes = dict(sizes or {"train": 1024, "val": 128, "test": 128})
        if split not in sizes:
            raise ConfigError(f"ShapesSource: split={split!r} is not one of {sorted(sizes)}")
        keep = tuple(targets) if targets else ShapesDataset.target_names
        unknown = set(keep) - set(ShapesDataset.target_names)
        if unknown:
            raise ConfigError(
                f"ShapesSource: targets {sorted(unknown)} unknown; accepted: "
                f"{', '.join(ShapesDataset.target_names)}"
            )
        offset = SPLITS.index(split) if split in SPLITS else len(SPLITS)
        scene = SceneConfig(image_size=image_size, max_objects=max_objects)
        stats = resolve_normalization(normalization, inputs, "ShapesSource", SHAPES_NORMALIZATION)
        super().__init__(int(sizes[split]), split_seed(seed, offset), scene, stats)
        self.target_names = keep
        self.num_classes = {k: v for k, v in ShapesDataset.num_classes.items() if k in keep}
        self.num_labels = {k: v for k, v in ShapesDataset.num_labels.items() if k in keep}

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        targets = {k: v for k, v in item["targets"].items() if k in self.target_names}
        return {
            "image": item["image"],
            "targets": targets,
            "mask": {k: item["mask"][k] for k in targets},
        }
