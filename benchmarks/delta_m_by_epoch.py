"""Δm on the validation metrics after every epoch: is a multi-task run catching up with its
single-task baselines as training goes on, or falling behind?

The results table (``mtl-report``) gives Δm at the end of training. When it is positive (the
multi-task model is worse), the question is whether sharing hurts or the budget is too short
for one network to learn every task: a Δm that shrinks epoch after epoch points to the budget,
one that stays or grows to a real conflict (or to capacity). This reads the run folders'
``csv/metrics.csv`` (``val/<task>/<metric>`` per epoch), averages the single-task runs of each
task per epoch, and prints each method's Δm per epoch (mean over its runs), with the same Δm
as the table (:func:`lightning_mtl.results.delta_m`).

    python benchmarks/delta_m_by_epoch.py logs/single_task/multiruns/<date> logs/train/multiruns/<date>
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path

from lightning_mtl.compare.table import higher_is_better
from lightning_mtl.diagnostics.history import read_history
from lightning_mtl.results.delta_m import delta_m
from lightning_mtl.results.record import read_run_folder, run_folders
from lightning_mtl.results.report import method_label

Curve = dict[int, dict[str, dict[str, float]]]  # epoch -> task -> metric -> value


def val_curve(folder: Path, tasks: list[str]) -> Curve:
    """The run's validation metrics per epoch (losses left out)."""
    history = read_history(folder)
    curve: Curve = defaultdict(lambda: defaultdict(dict))
    for column in history.columns:
        parts = column.split("/")
        if len(parts) != 3 or parts[0] != "val" or parts[1] not in tasks or parts[2] == "loss":
            continue
        series = history[column].finite()
        for epoch, value in zip(series.epochs, series.values, strict=True):
            if math.isfinite(epoch):
                curve[int(epoch)][parts[1]][parts[2]] = float(value)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", type=Path, nargs="+", help="run folders, or folders holding them")
    args = parser.parse_args()
    baselines: dict[int, dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    methods: dict[str, list[Curve]] = defaultdict(list)
    for folder in run_folders(args.paths):
        record = read_run_folder(folder)
        curve = val_curve(folder, record.tasks)
        if record.is_single_task:
            for epoch, tasks in curve.items():
                for task, metrics in tasks.items():
                    for metric, value in metrics.items():
                        baselines[epoch][task][metric].append(value)
        else:
            methods[method_label(record)].append(curve)
    epochs = sorted(baselines)
    print("Δm % on validation metrics, per epoch (mean over each method's runs)\n")
    print("| method | " + " | ".join(f"epoch {e}" for e in epochs) + " |")
    print("| :--- | " + " | ".join("---:" for _ in epochs) + " |")
    for label, curves in methods.items():
        cells = []
        for epoch in epochs:
            stl = {
                task: {m: statistics.fmean(v) for m, v in metrics.items()}
                for task, metrics in baselines[epoch].items()
            }
            values = [
                delta_m(curve[epoch], stl, higher_is_better).value
                for curve in curves
                if epoch in curve
            ]
            finite = [v for v in values if v is not None]
            cells.append(f"{statistics.fmean(finite):+.2f}" if finite else "—")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
