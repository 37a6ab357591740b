"""The real-dataset experiments from a Hydra command, on tiny files in each native format."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_mtl.errors import DataError
from lightning_mtl.train import train
from tests.conftest import FAST, compose_config
from tests.test_sources_images import OFFICE31_CLASSES, write_image
from tests.test_sources_npy import write_layout

RUN = [
    *(o for o in FAST if not o.startswith("data.")),
    "data.batch_size=2",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=1",
    "callbacks.model_checkpoint=null",
]


def test_nyuv2_experiment_trains_on_the_npy_layout(tmp_path: Path) -> None:
    write_layout(tmp_path / "data" / "nyuv2", {"label": 13}, with_normals=True)
    cfg = compose_config(
        "train", [*RUN, "experiment=nyuv2", f"paths.data_dir={tmp_path / 'data'}"], tmp_path
    )
    metrics, _ = train(cfg)
    for key in ("segmentation/miou", "depth/rmse", "normals/loss"):
        assert f"val/{key}" in metrics and f"test/{key}" in metrics, key
    assert all(value == value for value in metrics.values())  # no NaN from the ignore markers


def test_office31_experiment_reports_each_domain_as_source_and_task(tmp_path: Path) -> None:
    for d, domain in enumerate(("amazon", "dslr", "webcam")):
        for c, name in enumerate(OFFICE31_CLASSES):
            for i in range(5):
                path = tmp_path / "data" / "office31" / domain / "images" / name / f"{i}.jpg"
                write_image(path, (c * 80, d * 60, i * 40))
    cfg = compose_config(
        "train", [*RUN, "experiment=office31", f"paths.data_dir={tmp_path / 'data'}"], tmp_path
    )
    metrics, _ = train(cfg)
    for domain in ("amazon", "dslr", "webcam"):
        assert f"val/{domain}/accuracy" in metrics
        assert f"val/{domain}/{domain}/accuracy" in metrics  # per source
    assert "val/amazon/dslr/accuracy" not in metrics  # amazon labels only its own task


def test_missing_data_stops_before_training_with_where_to_get_it(tmp_path: Path) -> None:
    for experiment, link in (("celeba", "mmlab.ie.cuhk.edu.hk"), ("nyuv2", "lorenmt/mtan")):
        cfg = compose_config(
            "train", [*RUN, f"experiment={experiment}", f"paths.data_dir={tmp_path}"], tmp_path
        )
        with pytest.raises(DataError, match=link) as excinfo:
            train(cfg)
        assert str(tmp_path / experiment) in str(excinfo.value)
