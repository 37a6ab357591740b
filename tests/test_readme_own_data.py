"""The README's "Train on your own data" works as written.

The test reads the section itself: the CSV it shows (header and example rows), the experiment
file it shows (which must be the shipped ``configs/experiment/own_data.yaml``) and the command of
step 3. It lays out a small dataset in that layout under ``tmp_path`` and runs the command
in-process, shrunk by the FAST-style overrides of ``tests/conftest.py``.
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
import shlex
from pathlib import Path

import torch
import yaml
from PIL import Image

from lightning_mtl.train import train
from lightning_mtl.utils.setup import CONFIG_DIR
from tests.conftest import FAST, compose_config

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Train on your own data"
# FAST's non-data overrides (FAST's data.* keys are the Shapes data's), and the merged data
# module's own loader settings; the source's image size is added per source below.
SHRINK = [
    *(o for o in FAST if not o.startswith("data.")),
    "data.batch_size=4",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "++preflight.progress=false",
]
ROWS_PER_SPLIT = {"train": 16, "val": 6, "test": 6}


def readme_section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end != -1 else None]


def blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def readme_command(section: str) -> list[str]:
    """The overrides of the one ``mtl-train`` line of the section's shell blocks."""
    lines = [
        line.strip()
        for block in blocks(section, "bash")
        for line in block.splitlines()
        if line.strip().startswith("mtl-train")
    ]
    assert len(lines) == 1, lines
    words = shlex.split(lines[0], comments=True)
    assert words[0] == "mtl-train" and "-m" not in words
    return words[1:]


def write_png(path: Path, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = bytes(rng.randrange(256) for _ in range(12 * 12 * 3))
    Image.frombytes("RGB", (12, 12), pixels).save(path)


def make_dataset(root: Path, header: list[str], examples: list[list[str]], config: dict) -> dict:
    """labels.csv with the README's header and example rows, plus generated rows that give every
    split enough samples; a PNG for every row. Returns the rows per split."""
    source = next(iter(config["data"]["sources"].values()))
    columns = source["columns"]
    rng = random.Random(0)
    rows = [dict(zip(header, row, strict=True)) for row in examples]
    folder = Path(examples[0][header.index("image")]).parent
    for split, count in ROWS_PER_SPLIT.items():
        for i in range(count):
            row = {"image": f"{folder}/{split}_{i:03d}.png", "split": split}
            for name, spec in columns.items():
                if spec["kind"] == "class":
                    row[name] = str(i % spec["num_classes"])
                elif spec["kind"] == "regression":
                    row[name] = f"{rng.uniform(5, 15):.2f}"
                else:
                    row[name] = str(i % spec["num_labels"])
            if split == "train" and i % 5 == 4:  # partially labelled rows
                row[next(iter(columns))] = ""
            rows.append(row)
    for row in rows:
        write_png(root / row["image"], rng)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (root / "labels.csv").write_text(buffer.getvalue())
    return {s: [r for r in rows if r["split"] == s] for s in ROWS_PER_SPLIT}


def test_the_readme_own_data_command_trains_tests_and_checkpoints(tmp_path: Path) -> None:
    section = readme_section()
    # step 2: the experiment file the README shows is the one the project ships
    (shown,) = blocks(section, "yaml")
    experiment = readme_command(section)[0].removeprefix("experiment=")
    shipped = CONFIG_DIR / "experiment" / f"{experiment}.yaml"
    assert shown.strip() == shipped.read_text().strip()
    config = yaml.safe_load(shown)
    (source_name,) = config["data"]["sources"]
    tasks = list(config["tasks"])
    assert set(tasks) == set(config["data"]["sources"][source_name]["columns"])

    # step 1: the layout, under data/ (paths.data_dir) as the README says
    (csv_text,) = blocks(section, "csv")
    header, *examples = list(csv.reader(io.StringIO(csv_text)))
    assert header[0] == "image" and set(tasks) <= set(header)
    data_dir = tmp_path / "data"
    root_template = config["data"]["sources"][source_name]["root"]
    root = Path(root_template.replace("${paths.data_dir}", str(data_dir)))
    rows = make_dataset(root, header, examples, config)

    # step 3: the command, shrunk to seconds
    overrides = [
        *readme_command(section),
        *SHRINK,
        f"data.sources.{source_name}.image_size=32",
        f"paths.data_dir={data_dir}",
    ]
    run_dir = tmp_path / "run"
    cfg = compose_config("train", overrides, run_dir)
    assert cfg.run_name == experiment
    metrics, objects = train(cfg)

    # it read the CSV: every split's rows, the empty cells as unlabelled
    datamodule = objects["datamodule"]
    at = datamodule.names.index(source_name)
    datasets = {split: datamodule.splits[split].datasets[at] for split in ROWS_PER_SPLIT}
    for split, dataset in datasets.items():
        assert len(dataset) == len(rows[split]), split
    first = tasks[0]
    labelled = [bool(r[first]) for r in rows["train"]]
    assert datasets["train"].present[first].tolist() == labelled
    assert not all(labelled)

    # it trained (every train batch of the epoch), validated and tested both tasks
    trainer = objects["trainer"]
    assert trainer.global_step == len(rows["train"]) // 4
    for task in tasks:
        assert math.isfinite(metrics[f"val/{task}/loss"]), task
        tested = [k for k in metrics if k.startswith(f"test/{task}/") and "loss" not in k]
        assert tested, sorted(metrics)
        assert all(math.isfinite(metrics[k]) for k in tested), tested
    assert 0.0 <= metrics[f"test/{tasks[0]}/accuracy"] <= 1.0

    # it wrote its checkpoints and its metrics, for both tasks
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints and any(n.startswith("epoch_") for n in checkpoints)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert list(state["hyper_parameters"]["tasks"]) == tasks
    for task in tasks:
        assert any(f"heads.{task}." in key for key in state["state_dict"]), task
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        columns = next(csv.reader(handle))
    for task in tasks:
        assert f"train/{task}/loss" in columns and f"train/weight/{task}" in columns, task
        assert any(c.startswith(f"test/{task}/") for c in columns), task
