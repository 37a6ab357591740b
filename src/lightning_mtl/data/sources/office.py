"""Office-31 and Office-Home: object classification in several visual domains.

The multi-input multi-task setting of LibMTL: every *domain* (photo style) is its own task,
with its own images and its own classifier head over the same class list. One
:class:`OfficeDomain` reads one domain; merging the domains' datasets gives one classification
target per domain (the target key is the domain name), each sample labelled for its own domain
only.

Layouts, as the archives unpack::

    Office-31 (variant "office31"; domains amazon, dslr, webcam; 31 classes, 4,110 images)
      root/<domain>/images/<class>/<image>.jpg
    Office-Home (variant "office_home"; domains Art, Clipart, Product, Real_World;
                 65 classes, 15,588 images)
      root/<domain>/<class>/<image>.jpg

``variant=None`` detects the layout from the domain folder: an ``images/`` subfolder means
Office-31. Get Office-31 from https://faculty.cc.gatech.edu/~judy/domainadapt/
(``domain_adaptation_images.tar.gz``) and Office-Home from
https://www.hemanthdv.org/officeHomeDataset.html (``OfficeHomeDataset_10072016.zip``; rename
the ``Real World`` folder to ``Real_World``, or pass ``domain="Real World"``).

Classes are the sorted class folder names, and every domain of the dataset found under ``root``
must have the same class set (otherwise class index 3 would mean different objects in
different tasks). Neither dataset has an official split: each class's images are shuffled with
``numpy.random.default_rng((seed, class index))`` and cut by ``split_fractions``, so the split
is stratified, deterministic, and train/val/test never share an image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_mtl.data.inputs import (
    InputConfig,
    NormalizationSpec,
    resolve_image_size,
    resolve_normalization,
)
from lightning_mtl.data.sources.base import (
    SPLITS,
    SourceDataset,
    as_size,
    check_seed,
    check_split,
    make_sample,
    require,
)
from lightning_mtl.data.sources.images import (
    image_augment,
    is_image_file,
    load_image,
    verify_image,
)
from lightning_mtl.errors import ConfigError, DataError

NAME = "Office"
VARIANTS: dict[str, dict[str, Any]] = {
    "office31": {
        "title": "Office-31",
        "domains": ("amazon", "dslr", "webcam"),
        "classes": 31,
        "subdir": "images",
        "layout": "  root/<domain>/images/<class>/<image>.jpg   (domains amazon, dslr, webcam)",
        "source": "https://faculty.cc.gatech.edu/~judy/domainadapt/",
    },
    "office_home": {
        "title": "Office-Home",
        "domains": ("Art", "Clipart", "Product", "Real_World"),
        "classes": 65,
        "subdir": "",
        "layout": "  root/<domain>/<class>/<image>.jpg   (domains Art, Clipart, Product, Real_World)",
        "source": "https://www.hemanthdv.org/officeHomeDataset.html",
    },
}
BOTH_LAYOUTS = "\n".join(f"{v['title']}:\n{v['layout']}" for v in VARIANTS.values())
BOTH_SOURCES = " or ".join(f"{v['title']}: {v['source']}" for v in VARIANTS.values())


class OfficeDomain(SourceDataset):
    """One split of one domain of Office-31 or Office-Home; the label is the class index.

    Args:
        root: the folder holding the domain folders.
        domain: the domain folder name (``amazon``, ``Art``, ...); other folders with the same
            layout work too.
        split: ``train``, ``val`` or ``test`` of the seeded per-class split.
        image_size: output size (int or (H, W)); None keeps each file's size (not batchable);
            ``backbone``: the backbone's input size (from ``inputs``).
        split_fractions: train/val/test fractions of each class, summing to 1.
        seed: the seed of the split (the same seed for all three splits).
        target: the target key; None uses the domain name, one task per domain.
        variant: ``office31`` or ``office_home``; None detects it from the layout.
        normalization: ``backbone`` (its mean and std), or ``{mean, std}``; see
            :mod:`lightning_mtl.data.inputs`.
        inputs: the backbone's input config, passed by the data module (None: used alone).
        augment: augment the train split (off by default: LibMTL's Office protocol resizes
            the images and nothing else); val and test never augment.
        crop_scale, flip, color_jitter: the augmentation's options, see
            :class:`~lightning_mtl.data.augment.ImageAugment`; ``seed`` seeds it too.
    """

    def __init__(
        self,
        root: str | Path,
        domain: str,
        split: str = "train",
        image_size: int | Sequence[int] | str | None = 64,
        split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
        seed: int = 0,
        target: str | None = None,
        variant: str | None = None,
        normalization: NormalizationSpec = "backbone",
        inputs: InputConfig | None = None,
        augment: bool = False,
        crop_scale: Sequence[float] | None = (0.8, 1.0),
        flip: bool = True,
        color_jitter: float = 0.0,
    ) -> None:
        self.root = Path(root)
        self.domain = domain
        self.split = check_split(split, SPLITS, NAME)
        self.size = as_size(resolve_image_size(image_size, inputs, NAME))
        self.normalization = resolve_normalization(normalization, inputs, NAME)
        self.seed = check_seed(seed, NAME)
        self.augmenter = image_augment(augment, split, NAME, crop_scale, flip, color_jitter)
        fractions = check_fractions(split_fractions, NAME)
        require(self.root, NAME, BOTH_LAYOUTS, BOTH_SOURCES)
        domain_dir = self.root / domain
        if not domain_dir.is_dir():
            found = sorted(p.name for p in self.root.iterdir() if _is_data_dir(p))
            raise DataError(
                f"{NAME}: domain folder {domain_dir} not found. Domains found in {self.root}: "
                f"{', '.join(found) or 'none'}.\nExpected layout:\n{BOTH_LAYOUTS}\n"
                f"Get the data: {BOTH_SOURCES}"
            )
        self.variant = _variant(domain_dir, variant)
        spec = VARIANTS[self.variant]
        self.classes: tuple[str, ...] = tuple(_class_names(domain_dir, spec))
        _check_same_classes(self.root, domain, self.classes, spec)

        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            class_dir = domain_dir / spec["subdir"] / name
            files = sorted(p for p in class_dir.iterdir() if p.is_file() and is_image_file(p))
            if not files:
                raise DataError(
                    f"{NAME}: class folder {class_dir} holds no images.\nExpected layout:\n"
                    f"{spec['layout']}\nGet the data: {spec['source']}"
                )
            chosen = seeded_split(len(files), fractions, (self.seed, label))[SPLITS.index(split)]
            self.samples.extend((files[i], label) for i in chosen)

        self.target = target if target is not None else domain
        self.target_names = (self.target,)
        self.num_classes = {self.target: len(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, draw: int | None = None) -> dict[str, Any]:
        index = index % len(self.samples)
        path, label = self.samples[index]
        seed = self.access_seed(index, draw) if self.augmenter is not None else 0
        name = f"{NAME} {self.domain}"
        image = load_image(path, self.size, name, self.normalization, self.augmenter, seed)
        return make_sample(image, {self.target: torch.tensor(label, dtype=torch.int64)})

    def verify(self, index: int) -> None:
        verify_image(self.samples[index][0], f"{NAME} {self.domain}")

    def label_values(self, key: str) -> torch.Tensor | None:
        """The split's class indices, int64 (N,), from the class folder names."""
        if key != self.target:
            return None
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)


def _is_data_dir(path: Path) -> bool:
    """A visible folder (skips ``.DS_Store``-like entries and the zip's ``__MACOSX``)."""
    return path.is_dir() and not path.name.startswith((".", "__"))


def _variant(domain_dir: Path, variant: str | None) -> str:
    if variant is None:
        return "office31" if (domain_dir / "images").is_dir() else "office_home"
    if variant not in VARIANTS:
        raise ConfigError(
            f"{NAME}: variant={variant!r} is not one of {', '.join(VARIANTS)} (or null to detect)"
        )
    return variant


def _class_names(domain_dir: Path, spec: dict[str, Any]) -> list[str]:
    """The sorted class folder names of one domain; DataError when there are none."""
    class_root = domain_dir / spec["subdir"]
    names = (
        sorted(p.name for p in class_root.iterdir() if _is_data_dir(p))
        if class_root.is_dir()
        else []
    )
    if not names:
        raise DataError(
            f"{NAME}: no class folders in {class_root}.\nExpected layout ({spec['title']}):\n"
            f"{spec['layout']}\nGet the data: {spec['source']}"
        )
    return names


def _check_same_classes(
    root: Path, domain: str, classes: Sequence[str], spec: dict[str, Any]
) -> None:
    """The known domains present under ``root`` must share ``domain``'s class list."""
    for other in spec["domains"]:
        other_dir = root / other
        if other == domain or not other_dir.is_dir():
            continue
        other_classes = set(_class_names(other_dir, spec))
        if other_classes != set(classes):
            missing = sorted(set(classes) - other_classes)
            extra = sorted(other_classes - set(classes))
            raise DataError(
                f"{NAME}: domain {other} in {root} has a different class set from {domain}: "
                f"{other} lacks {missing or 'none'} and adds {extra or 'none'}. Every domain of "
                f"{spec['title']} has the same {spec['classes']} class folders.\n"
                f"Expected layout:\n{spec['layout']}\nGet the data: {spec['source']}"
            )


def check_fractions(fractions: Sequence[float], dataset: str) -> tuple[float, float, float]:
    """Three non-negative train/val/test fractions summing to 1, else a ConfigError."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or min(values) < 0 or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ConfigError(
            f"{dataset}: split_fractions={list(values)} must be three non-negative train/val/test "
            "fractions summing to 1"
        )
    return values  # the length check above narrows it to three floats


def seeded_split(
    count: int, fractions: Sequence[float], seed: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded permutation of ``range(count)`` cut into train/val/test by ``fractions``.

    The cuts round the cumulative fractions, so the three parts always cover every index once.
    Also used by :class:`~lightning_mtl.data.sources.csv_folder.CsvImageFolder`.
    """
    order = np.random.default_rng(seed).permutation(count)
    first = round(count * fractions[0])
    second = min(count, round(count * (fractions[0] + fractions[1])))
    return order[:first], order[first:second], order[second:]
