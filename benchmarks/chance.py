"""Print the chance level of every task of an experiment (see lightning_mtl/baselines.py).

uv run python benchmarks/chance.py [overrides ...]     # e.g. task=[depth,count]
"""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from lightning_mtl.baselines import chance_metrics
from lightning_mtl.utils.setup import CONFIG_DIR, configure_environment


def main(overrides: list[str]) -> None:
    warnings.filterwarnings("ignore")
    configure_environment()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=overrides)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    model = hydra.utils.instantiate(cfg.model)
    datamodule.setup("test")
    # the Shapes scenes themselves (the data module's one source)
    fit = list(DataLoader(datamodule.splits["train"].datasets[0], batch_size=64))
    test = list(DataLoader(datamodule.splits["test"].datasets[0], batch_size=64))
    for task, values in chance_metrics(model.tasks, fit, test).items():
        print(f"{task:16s} " + "  ".join(f"{name}={value:.3f}" for name, value in values.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
