"""NYUv2 in the preprocessed ``.npy`` layout of MTAN, the copy most multi-task papers train on.

MTAN, LibMTL, Nash-MTL and FAMO all report on the same 288×384 release: 795 training and 654
validation images of indoor scenes, each labelled for three dense tasks. Reading that exact
release keeps results comparable with those papers.

========================  ====================  =====================================  ==========
target key                on disk               sample                                  missing
========================  ====================  =====================================  ==========
``segmentation``          ``label/<i>.npy``     int64 H×W, 13 classes 0..12             -1
``depth``                 ``depth/<i>.npy``     float32 1×H×W, metres                   0
``normals``               ``normal/<i>.npy``    float32 3×H×W, unit surface normals     0-vector
========================  ====================  =====================================  ==========

The release has no test split: ``split="test"`` reads ``val`` (see ``split_folders``), as the
papers do. The missing-label markers are kept as they are, so the task configs must skip them:
``cross_entropy`` with ``ignore_index: -1`` (not its default -100), ``l1`` with
``ignore_value: 0`` for depth, and the ``cosine`` loss, which ignores all-zero normals
(``configs/task/nyuv2_*.yaml`` do all three).
"""

from __future__ import annotations

from typing import ClassVar

from lightning_mtl.data.sources.npy_folders import NpyFolderDataset, NpyTarget

NYUV2_SOURCE = (
    "the preprocessed NYUv2 (288×384 .npy) linked from the MTAN repository, "
    "https://github.com/lorenmt/mtan; extract it so that <root>/train and <root>/val exist"
)
NYUV2_LAYOUT = """\
  <root>/train/image/<i>.npy    288×384×3 float, RGB in [0, 1]
  <root>/train/label/<i>.npy    288×384 semantic ids 0..12, -1 = unlabelled
  <root>/train/depth/<i>.npy    288×384×1 float depth, 0 = missing
  <root>/train/normal/<i>.npy   288×384×3 float unit normals, 0-vector = missing
  <root>/val/...                the same four folders (the test split reads val)
  (795 train / 654 val samples, <i> = 0, 1, 2, ...)"""


class NYUv2(NpyFolderDataset):
    """NYUv2 from ``root`` (MTAN's preprocessed release): segmentation, depth and normals.

    ``image_size`` (an int, ``[height, width]``, ``backbone`` for the backbone's input size, or
    None for the native 288×384) resizes every array as its values allow (see :mod:`~lightning_mtl.data.sources.npy_folders`).
    ``targets`` loads a subset of ``target_names``. ``augment`` (train split only, on by
    default) is the papers' random scale-crop over ``scales`` and horizontal ``flip``, drawn
    anew at every access: depth is divided by the scale and the normals' x component negated
    by a flip (see :mod:`lightning_mtl.data.augment`).
    """

    dataset_name: ClassVar[str] = "NYUv2"
    layout: ClassVar[str] = NYUV2_LAYOUT
    source: ClassVar[str] = NYUV2_SOURCE
    target_names: tuple[str, ...] = ("segmentation", "depth", "normals")
    num_classes: dict[str, int] = {"segmentation": 13}
    num_labels: dict[str, int] = {}

    def target_specs(self) -> dict[str, NpyTarget]:
        return {
            "segmentation": NpyTarget("label", "classes", num_classes=13),
            "depth": NpyTarget("depth", "depth"),
            "normals": NpyTarget("normal", "normals"),
        }
