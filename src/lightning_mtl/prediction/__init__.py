"""What a prediction looks like for each kind of task, and where it is written.

One registry, :data:`WRITERS`, keyed by the head's ``metric_kind`` (the kind the task registry
gives every task: classification, multilabel, regression, segmentation, dense_regression,
normals), holds for each kind

* ``activate(output)``: the head's raw output in the form a user reads, applied by the
  module's ``predict_step`` (and by the exported model): class probabilities (softmax) for
  classification and, per pixel, for segmentation; label probabilities (sigmoid) for multi-label;
  the values themselves for regression, depth and normals (their heads already apply the range
  activation and the unit norm);
* a writer for ``mtl-predict``: a table (one CSV row per image) for image-level kinds, or files
  per image for dense kinds, under ``<output_dir>/predictions/``:

  =================  ====================================================================
  classification     ``<task>.csv``: ``file, class, prob_<class>...``
  multilabel         ``<task>.csv``: ``file, score_<label>..., pred_<label>...`` (pred: 0/1)
  regression         ``<task>.csv``: ``file, value`` (``value_<i>`` for several outputs)
  segmentation       ``<task>/<file>.png``: a palette PNG, one class index per pixel
  dense_regression   ``<task>/<file>.npy`` (float32 H×W, or C×H×W) and a colour-mapped ``.png``
  normals            ``<task>/<file>.npy`` (float32 3×H×W unit vectors) and an RGB ``.png``
  =================  ====================================================================

Dense outputs are resized back to each image's own size (bilinear on probabilities and values,
normals brought back to unit length) before they are written, so a mask lies on its image.

:class:`PredictionWriter` is the Lightning callback that feeds the writers batch by batch. Under
DDP every rank writes the per-image files of its own batches (each sample once, written
atomically, so a sample that two ranks hold is still one complete file), and the table rows are
gathered on rank 0, which writes each CSV once, one row per file, sorted by file.

Its modules: :mod:`~lightning_mtl.prediction.writers` (the registry, the table kinds),
:mod:`~lightning_mtl.prediction.dense` (the dense kinds), :mod:`~lightning_mtl.prediction.callback`
(the callback), :mod:`~lightning_mtl.prediction.files` (atomic CSV and JSON files),
:mod:`~lightning_mtl.prediction.inputs` (what the model is fed: normalisation and size, taken
from the checkpoint's training) and :mod:`~lightning_mtl.prediction.images` (the image folder and
data-split inputs of ``mtl-predict``).
"""

from lightning_mtl.prediction.callback import PredictionWriter, batch_samples, gather
from lightning_mtl.prediction.dense import (
    DenseRegressionWriter,
    DenseWriter,
    NormalsWriter,
    SegmentationWriter,
    colour_map,
    palette,
)
from lightning_mtl.prediction.files import write_summary, write_table
from lightning_mtl.prediction.images import ImageFolder, SplitData, image_files
from lightning_mtl.prediction.inputs import (
    BACKBONE,
    DATA,
    INPUT_SETTINGS,
    PREPARATION,
    InputSpec,
    adopt_trained_preparation,
    data_inputs,
    reads_data,
    resolve_inputs,
    trained_datamodule,
    warn_if_data_differs,
)
from lightning_mtl.prediction.writers import (
    DEFAULT_THRESHOLD,
    WRITERS,
    ClassificationWriter,
    MultiLabelWriter,
    RegressionWriter,
    Sample,
    TaskWriter,
    WriterOptions,
    metric_threshold,
    predicted,
    writer_class,
)

__all__ = [
    "BACKBONE",
    "DATA",
    "DEFAULT_THRESHOLD",
    "INPUT_SETTINGS",
    "PREPARATION",
    "WRITERS",
    "ClassificationWriter",
    "DenseRegressionWriter",
    "DenseWriter",
    "ImageFolder",
    "InputSpec",
    "MultiLabelWriter",
    "NormalsWriter",
    "PredictionWriter",
    "RegressionWriter",
    "Sample",
    "SegmentationWriter",
    "SplitData",
    "TaskWriter",
    "WriterOptions",
    "adopt_trained_preparation",
    "batch_samples",
    "colour_map",
    "data_inputs",
    "gather",
    "image_files",
    "metric_threshold",
    "palette",
    "predicted",
    "reads_data",
    "resolve_inputs",
    "trained_datamodule",
    "warn_if_data_differs",
    "write_summary",
    "write_table",
    "writer_class",
]
