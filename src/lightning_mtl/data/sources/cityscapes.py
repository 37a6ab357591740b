"""Cityscapes in the preprocessed ``.npy`` layout of MTAN (128×256), as multi-task papers use it.

MTAN, LibMTL, Nash-MTL and FAMO train on the same down-sampled release of Cityscapes: 2975
training and 500 validation street scenes, each labelled for semantic segmentation (7 coarse
or 19 fine classes) and depth. Reading that exact release keeps results comparable.

========================  ===========================  ============================  =======
target key                on disk                      sample                        missing
========================  ===========================  ============================  =======
``segmentation``          ``label_7/`` or              int64 H×W, ids 0..6 or 0..18  -1
                          ``label_19/<i>.npy``
``depth``                 ``depth/<i>.npy``            float32 1×H×W (disparity)     0
========================  ===========================  ============================  =======

``num_classes`` (7 or 19) picks the label folder; only that one has to exist. The release has
no test split: ``split="test"`` reads ``val`` (see ``split_folders``). The missing-label
markers are kept, so the task configs must use ``cross_entropy`` with ``ignore_index: -1`` and
``l1`` with ``ignore_value: 0`` (``configs/task/cityscapes_*.yaml`` do).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from lightning_mtl.data.inputs import InputConfig, NormalizationSpec
from lightning_mtl.data.sources.npy_folders import PAPER_SCALES, NpyFolderDataset, NpyTarget
from lightning_mtl.errors import DataError

CITYSCAPES_SOURCE = (
    "the preprocessed Cityscapes (128×256 .npy) linked from the MTAN repository, "
    "https://github.com/lorenmt/mtan; extract it so that <root>/train and <root>/val exist"
)
CITYSCAPES_LAYOUT = """\
  <root>/train/image/<i>.npy      128×256×3 float, RGB in [0, 1]
  <root>/train/label_7/<i>.npy    128×256 ids 0..6, -1 = unlabelled   (num_classes=7)
  <root>/train/label_19/<i>.npy   128×256 ids 0..18, -1 = unlabelled  (num_classes=19)
  <root>/train/depth/<i>.npy      128×256×1 float disparity, 0 = missing
  <root>/val/...                  the same folders (the test split reads val)
  (2975 train / 500 val samples, <i> = 0, 1, 2, ...)"""
LABEL_FOLDERS = {7: "label_7", 19: "label_19"}


class Cityscapes(NpyFolderDataset):
    """Cityscapes from ``root`` (MTAN's preprocessed release): segmentation and depth.

    ``num_classes`` selects the 7-class (``label_7``) or 19-class (``label_19``) labels; any
    other value is a :class:`~lightning_mtl.errors.DataError`. ``image_size``, ``targets``,
    ``augment``, ``scales``, ``flip``, ``seed``, ``normalization`` and ``inputs`` work as in
    :class:`~lightning_mtl.data.sources.nyuv2.NYUv2` (the scale-crop divides the disparity by
    the scale too, as the papers' code does).
    """

    dataset_name: ClassVar[str] = "Cityscapes"
    layout: ClassVar[str] = CITYSCAPES_LAYOUT
    source: ClassVar[str] = CITYSCAPES_SOURCE
    target_names: tuple[str, ...] = ("segmentation", "depth")
    num_classes: dict[str, int] = {"segmentation": 7}  # the default; set per instance

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: int | Sequence[int] | str | None = None,
        targets: Sequence[str] | None = None,
        num_classes: int = 7,
        augment: bool = True,
        seed: int = 0,
        normalization: NormalizationSpec = "backbone",
        inputs: InputConfig | None = None,
        scales: Sequence[float] = PAPER_SCALES,
        flip: bool = True,
    ) -> None:
        if num_classes not in LABEL_FOLDERS:
            raise DataError(
                f"Cityscapes: num_classes={num_classes!r} is not available; the release has "
                f"labels for {' or '.join(str(n) for n in LABEL_FOLDERS)} classes "
                f"({', '.join(LABEL_FOLDERS.values())})"
            )
        self.num_classes = {"segmentation": int(num_classes)}
        super().__init__(
            root,
            split,
            image_size,
            targets,
            augment,
            seed,
            normalization=normalization,
            inputs=inputs,
            scales=scales,
            flip=flip,
        )

    def target_specs(self) -> dict[str, NpyTarget]:
        classes = self.num_classes["segmentation"]
        return {
            "segmentation": NpyTarget(LABEL_FOLDERS[classes], "classes", num_classes=classes),
            "depth": NpyTarget("depth", "depth"),
        }
