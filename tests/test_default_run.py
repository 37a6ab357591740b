"""The default experiment, exactly as `make train` runs it, beats chance on every task (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from lightning_mtl.baselines import chance_metrics
from lightning_mtl.train import train
from tests.conftest import compose_config


@pytest.mark.slow
def test_default_experiment_beats_chance_on_every_task(tmp_path: Path) -> None:
    cfg = compose_config("train", ["callbacks.rich_progress_bar=null"], tmp_path)
    metrics, objects = train(cfg)
    datamodule, model = objects["datamodule"], objects["model"]
    fit = list(DataLoader(datamodule.splits["train"].datasets[0], batch_size=64))
    test = list(DataLoader(datamodule.splits["test"].datasets[0], batch_size=64))
    chance = chance_metrics(model.tasks, fit, test)

    def got(task: str, metric: str) -> float:
        return metrics[f"test/{task}/{metric}"]

    assert got("segmentation", "miou") > chance["segmentation"]["miou"] + 0.25
    assert got("depth", "abs_rel") < 0.5 * chance["depth"]["abs_rel"]
    assert got("depth", "mae") < 0.5 * chance["depth"]["mae"]
    assert got("count", "mae") < 0.5 * chance["count"]["mae"]
    assert got("count", "r2") > 0.6
    assert got("dominant_color", "accuracy") > chance["dominant_color"]["accuracy"] + 0.5
    assert got("colors", "map") > chance["colors"]["map"] + 0.4
