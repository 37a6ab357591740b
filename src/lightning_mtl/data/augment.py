"""Training augmentation of the sources with ``torchvision.transforms.v2``, seeded per access.

Two pipelines, both applied to the train split only (evaluation never augments):

* :class:`DenseAugment`, for NYUv2 and Cityscapes, as MTAN, Nash-MTL, FAMO and CAGrad train: a
  scale ``s`` drawn from ``scales`` (``[1.0, 1.2, 1.5]``), a crop of ``(H/s, W/s)`` at a random
  position resized back to the output size, then a horizontal flip with probability 1/2. The
  image and every label move together, each with the interpolation its values allow: the image
  bilinear, class ids nearest (:class:`~torchvision.tv_tensors.Mask`), depth nearest (missing
  0 never blends) and **divided by s** (:class:`Depth`: zooming in by s brings the scene s times
  closer, as the papers do; they apply it to Cityscapes' disparity as well), normals bilinear and
  re-normalised, with their **x component negated by a flip** (:class:`Normals`, whose kernels
  are registered below).
* :class:`ImageAugment`, for the image-file sources (CelebA, Office, CSV folder): a random
  resized crop (area fraction ``crop_scale``), a horizontal flip, and a colour jitter, each
  optional.

**Randomness.** v2 transforms draw from torch's global generator, so each access runs them
inside :func:`seeded`, which forks that generator and seeds it with :func:`access_seed` of
``(source seed, index, draw)``: the result is a pure function of those numbers, in any process
and any DataLoader worker, and the global generators (CPU and CUDA) are left as they were.
``draw`` tells accesses of one index apart; :mod:`lightning_mtl.data.sources.base` says where it
comes from.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lightning_mtl.errors import ConfigError

# A normal shorter than this after a bilinear resize is treated as missing (set to 0).
MIN_NORM = 1e-6
#: the dense label kinds of the npy-folder sources (see ``npy_folders.py``)
DENSE_KINDS = ("classes", "depth", "normals")


# --------------------------------------------------------------------------- randomness
def access_seed(*entropy: int) -> int:
    """A 64-bit torch seed mixed from non-negative integers (numpy's ``SeedSequence``), so
    nearby inputs such as consecutive indices give unrelated streams."""
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint64)
    return int(state[0])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded to ``seed``, restored afterwards (only
    that one: ``torch.manual_seed`` would reseed the CUDA generators too)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- dense labels
class Depth(tv_tensors.Mask):
    """A 1×H×W depth (or disparity) map: moved as a mask (nearest), divided by the scale of a
    :class:`RandomScaleCrop`."""


class Normals(tv_tensors.TVTensor):
    """3×H×W unit surface normals (x, y, z; 0-vector = missing). Kernels for the flip and the
    resized crop are registered below; other geometric transforms would pass it unchanged, so
    only :class:`DenseAugment`'s transforms are used on it."""

    def __new__(cls, data: Any) -> Normals:
        return torch.as_tensor(data).as_subclass(cls)


def unit_normals(normals: torch.Tensor) -> torch.Tensor:
    """Bilinearly resampled normals back to unit length; near-zero ones (missing) become 0."""
    norm = normals.norm(dim=-3, keepdim=True)
    return torch.where(norm > MIN_NORM, normals / norm.clamp_min(MIN_NORM), 0.0)


@F.register_kernel(F.horizontal_flip, Normals)
def _flip_normals(normals: torch.Tensor) -> Normals:
    """A mirrored scene's surfaces face the other way along x."""
    flipped = normals.as_subclass(torch.Tensor).flip(-1).clone()
    flipped[..., 0, :, :] = -flipped[..., 0, :, :]
    return tv_tensors.wrap(flipped, like=normals)


@F.register_kernel(F.resized_crop, Normals)
def _resized_crop_normals(
    normals: torch.Tensor,
    top: int,
    left: int,
    height: int,
    width: int,
    size: list[int],
    interpolation: Any = v2.InterpolationMode.BILINEAR,
    antialias: bool | None = False,
) -> Normals:
    """Bilinear crop and resize (the directions blend), then back to unit length."""
    out = F.resized_crop_image(
        normals.as_subclass(torch.Tensor),
        top,
        left,
        height,
        width,
        size,
        interpolation=v2.InterpolationMode.BILINEAR,
        antialias=antialias,
    )
    return tv_tensors.wrap(unit_normals(out), like=normals)


class RandomScaleCrop(v2.Transform):
    """MTAN's random scale-crop: ``s`` from ``scales``, an ``(H/s, W/s)`` crop at a uniformly
    random position, resized to ``size`` (default: the input's H×W); :class:`Depth` is divided
    by ``s``. Bilinear without antialiasing, like the evaluation's resize."""

    def __init__(self, scales: Sequence[float], size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.scales = [float(s) for s in scales]
        self.size = size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        scale = self.scales[int(torch.randint(len(self.scales), ()))]
        crop_h, crop_w = max(1, int(height / scale)), max(1, int(width / scale))
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        size = list(self.size) if self.size is not None else [height, width]
        return {"scale": scale, "box": (top, left, crop_h, crop_w), "size": size}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        top, left, height, width = params["box"]
        out = self._call_kernel(
            F.resized_crop,
            inpt,
            top=top,
            left=left,
            height=height,
            width=width,
            size=params["size"],
            interpolation=v2.InterpolationMode.BILINEAR,
            antialias=False,
        )
        if isinstance(inpt, Depth):
            out = tv_tensors.wrap(out.as_subclass(torch.Tensor) / params["scale"], like=inpt)
        return out


def check_scales(scales: Sequence[float] | None, dataset: str) -> tuple[float, ...]:
    """A non-empty list of finite scales >= 1 (a scale below 1 would crop outside the image)."""
    try:
        values = tuple(float(s) for s in (scales or ()))
    except (TypeError, ValueError):
        values = ()
    if not values or any(not math.isfinite(s) or s < 1.0 for s in values):
        raise ConfigError(
            f"{dataset}: scales={_plain(scales)!r} must be a non-empty list of numbers >= 1 "
            "(the zoom factors of the random scale-crop, e.g. [1.0, 1.2, 1.5])"
        )
    return values


class DenseAugment:
    """The papers' NYUv2/Cityscapes training augmentation: scale-crop, then horizontal flip.

    Args:
        scales: the zoom factors to draw from (``[1.0]`` disables the crop).
        flip: flip horizontally with probability 1/2.
        size: the output (H, W); None keeps the input's size. The crop is resized straight to
            it, so one interpolation serves both the crop and ``image_size``.
    """

    def __init__(
        self, scales: Sequence[float], flip: bool, size: tuple[int, int] | None = None
    ) -> None:
        self.scales = tuple(scales)
        self.flip = bool(flip)
        self.size = size
        transforms: list[v2.Transform] = [RandomScaleCrop(self.scales, size)]
        if self.flip:
            transforms.append(v2.RandomHorizontalFlip(p=0.5))
        self.pipeline = v2.Compose(transforms)
        #: every (scale, flipped) pair the pipeline can draw, for :meth:`cycle`
        self.choices = [(s, f) for s in self.scales for f in ((False, True) if flip else (False,))]

    def cycle(self, seed: int, index: int, count: int) -> int | None:
        """The (scale, flip) choice of the ``count``-th plain read (no ``draw``) of ``index``:
        reads walk through a permutation of :attr:`choices` drawn from ``(seed, index)``, so two
        consecutive reads of one sample never share both (a scale-1 crop with the same flip
        would repeat the sample exactly, 1 read in 2K with independent draws), while each choice
        still comes 1/K of the time. None when there is a single choice."""
        k = len(self.choices)
        if k < 2:
            return None
        order = np.random.default_rng(access_seed(seed, index, 2)).permutation(k)
        return int(order[count % k])

    def __call__(
        self,
        image: torch.Tensor,
        targets: Mapping[str, tuple[str, torch.Tensor]],
        seed: int,
        choice: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Transform a C×H×W image in [0, 1] and its ``{key: (kind, label)}`` together; kinds
        are ``classes`` (H×W ids), ``depth`` (1×H×W) and ``normals`` (3×H×W). ``choice`` (an
        index into :attr:`choices`) fixes the scale and the flip; the crop's position is still
        drawn from ``seed``."""
        wrapped: dict[str, Any] = {"image": tv_tensors.Image(image)}
        for key, (kind, label) in targets.items():
            wrapped[f"target:{key}"] = _wrap_dense(kind, label)
        pipeline = self.pipeline
        if choice is not None:
            scale, flipped = self.choices[choice]
            fixed: list[v2.Transform] = [RandomScaleCrop([scale], self.size)]
            if flipped:
                fixed.append(v2.RandomHorizontalFlip(p=1.0))
            pipeline = v2.Compose(fixed)
        with seeded(seed):
            out = pipeline(wrapped)
        return (
            out["image"].as_subclass(torch.Tensor),
            {key: out[f"target:{key}"].as_subclass(torch.Tensor) for key in targets},
        )


def _wrap_dense(kind: str, label: torch.Tensor) -> Any:
    if kind == "classes":
        return tv_tensors.Mask(label)
    if kind == "depth":
        return Depth(label)
    if kind == "normals":
        return Normals(label)
    raise ValueError(f"unknown dense label kind {kind!r}; expected one of {DENSE_KINDS}")


# --------------------------------------------------------------------------- image files
class ImageAugment:
    """Standard augmentation of an image-file source: random resized crop, flip, colour jitter.

    Args:
        crop_scale: ``[low, high]`` area fraction of a :class:`~torchvision.transforms.v2.RandomResizedCrop`
            (aspect ratio 3/4..4/3) resized to the output size; None: the whole image, resized.
        flip: a horizontal flip with probability 1/2.
        color_jitter: brightness, contrast and saturation each scaled by a factor drawn from
            ``[1 - c, 1 + c]``; 0 turns it off.
        dataset: the source's name, for error messages.
    """

    def __init__(
        self,
        crop_scale: Sequence[float] | None = (0.8, 1.0),
        flip: bool = True,
        color_jitter: float = 0.0,
        dataset: str = "augment",
    ) -> None:
        self.crop_scale = _check_crop_scale(crop_scale, dataset)
        self.flip = bool(flip)
        jitter = _number(color_jitter)
        if jitter is None or not 0.0 <= jitter < 1.0:
            raise ConfigError(
                f"{dataset}: color_jitter={color_jitter!r} must be a number in [0, 1) (the "
                "strength of the brightness, contrast and saturation jitter; 0 turns it off)"
            )
        self.color_jitter = jitter
        self._pipelines: dict[tuple[int, int], v2.Compose] = {}

    def _pipeline(self, size: tuple[int, int]) -> v2.Compose:
        if size not in self._pipelines:
            transforms: list[v2.Transform] = []
            if self.crop_scale is not None:
                transforms.append(
                    v2.RandomResizedCrop(size, scale=self.crop_scale, antialias=False)
                )
            else:
                transforms.append(v2.Resize(size, antialias=False))
            if self.flip:
                transforms.append(v2.RandomHorizontalFlip(p=0.5))
            if self.color_jitter > 0:
                c = self.color_jitter
                transforms.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c))
            self._pipelines[size] = v2.Compose(transforms)
        return self._pipelines[size]

    def __call__(
        self, image: torch.Tensor, size: tuple[int, int] | None, seed: int
    ) -> torch.Tensor:
        """The augmented C×H×W image in [0, 1] of size ``size`` (None: the input's size)."""
        target = tuple(size) if size is not None else tuple(image.shape[-2:])
        with seeded(seed):
            out = self._pipeline(target)(tv_tensors.Image(image))  # type: ignore[arg-type]
        return out.as_subclass(torch.Tensor)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _plain(value: Any) -> Any:
    """A list for messages (Hydra passes ListConfig)."""
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def _check_crop_scale(
    crop_scale: Sequence[float] | None, dataset: str
) -> tuple[float, float] | None:
    if crop_scale is None:
        return None
    values = (
        [_number(v) for v in crop_scale]
        if isinstance(crop_scale, Sequence) and not isinstance(crop_scale, str)
        else []
    )
    if len(values) != 2 or None in values or not 0 < values[0] <= values[1] <= 1:  # type: ignore[operator]
        raise ConfigError(
            f"{dataset}: crop_scale={_plain(crop_scale)!r} must be [low, high] with "
            "0 < low <= high <= 1 (the area fraction a random crop keeps), or null for no crop"
        )
    return (float(values[0]), float(values[1]))  # type: ignore[arg-type]
