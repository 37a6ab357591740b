"""``mtl-report`` (or ``python -m lightning_mtl.results``): the results table, adding runs to the
store, and a run's plots.

    mtl-report                                  # the table of logs/results.sqlite -> logs/report/
    mtl-report table --metrics segmentation/miou,depth/abs_rel --experiment train
    mtl-report add logs/train/multiruns/2026-11-30_10-00-00     # runs made before the store
    mtl-report plot logs/train/runs/2026-11-30_10-00-00         # PNGs in <run>/plots/
    mtl-report table --wandb my-entity/lightning-mtl            # runs recorded in a W&B project
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_mtl.results.output import markdown, write_csv
from lightning_mtl.results.record import (
    STORE_ENV,
    load_run_config,
    read_run_folder,
    records_from_wandb,
    run_folders,
    unrecordable,
)
from lightning_mtl.results.report import build_report
from lightning_mtl.results.store import ResultsStore

COMMANDS = ("table", "add", "plot")


def default_store() -> Path:
    """``$MTL_RESULTS_STORE``, else ``logs/results.sqlite`` of the project (as in train.yaml)."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    from lightning_mtl.utils.setup import PROJECT_ROOT

    return PROJECT_ROOT / "logs" / "results.sqlite"


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="mtl-report",
        description="Results across methods and seeds (Δm against single-task baselines), "
        "adding run folders to the results store, and a run's plots.",
    )
    commands = main.add_subparsers(dest="command")
    table = commands.add_parser("table", help="build the table (the default command)")
    table.add_argument("--store", type=Path, default=None, help="the SQLite results store")
    table.add_argument("--out", type=Path, default=None, help="folder of results.md/.csv")
    table.add_argument("--split", default="test", help="the metrics' split (test or val)")
    table.add_argument(
        "--metrics", default="", help="task/metric columns of the Markdown table, comma-separated"
    )
    table.add_argument("--experiment", default=None, help="only multi-task runs of this run_name")
    table.add_argument(
        "--wandb", default=None, help="read the runs of this W&B project (entity/project)"
    )
    add = commands.add_parser("add", help="add finished run folders (or folders holding them)")
    add.add_argument("paths", type=Path, nargs="+")
    add.add_argument("--store", type=Path, default=None)
    plot = commands.add_parser("plot", help="draw a run's PNG plots from its csv/metrics.csv")
    plot.add_argument("run_dir", type=Path)
    plot.add_argument("--steps", default="", help="steps of the conflict heatmaps, e.g. 100,400")
    return main


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] not in (*COMMANDS, "-h", "--help"):
        arguments.insert(0, "table")
    args = parser().parse_args(arguments)
    try:
        if args.command == "add":
            return _add(args.paths, args.store or default_store())
        if args.command == "plot":
            from lightning_mtl.diagnostics.plots import plot_run

            steps = [int(s) for s in args.steps.split(",") if s.strip()] or None
            for path in plot_run(args.run_dir, steps):
                print(path)
            return 0
        return _table(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _add(paths: list[Path], store_path: Path) -> int:
    folders = run_folders(paths)
    if not folders:
        print(f"error: no run folder (.hydra/ and csv/metrics.csv) under {paths}", file=sys.stderr)
        return 2
    store = ResultsStore(store_path)
    known = {r.run_dir: r.git_commit for r in store.records()} if store_path.is_file() else {}
    added = 0
    for folder in folders:
        try:
            record = read_run_folder(folder)
            why = unrecordable(load_run_config(folder / ".hydra" / "config.yaml"), record.values)
        except (OSError, ValueError) as error:
            print(f"skipped {folder}: {error}")
            continue
        if why:
            print(f"skipped {folder}: {why}")
            continue
        record.git_commit = known.get(record.run_dir, record.git_commit)  # recorded at its end
        store.add(record)
        added += 1
        print(f"added {folder}")
    print(f"{added} runs added to {store_path}")
    return 0 if added else 1


def _table(args: argparse.Namespace) -> int:
    store_path = args.store or default_store()
    records = records_from_wandb(args.wandb) if args.wandb else ResultsStore(store_path).records()
    comparisons = build_report(records, args.split, args.experiment)
    metrics = [m for m in args.metrics.split(",") if m.strip()]
    text = markdown(comparisons, metrics)
    out = args.out or store_path.parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    write_csv(comparisons, out / "results.csv")
    print(text)
    print(f"written: {out / 'results.md'}\n         {out / 'results.csv'}")
    if args.wandb:
        _log_wandb_table(args.wandb, out / "results.csv")
    return 0 if comparisons else 1


def _log_wandb_table(project: str, table_csv: Path) -> None:
    """The table as a W&B Table in a ``report`` run of ``project`` (skipped when offline)."""
    import wandb

    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        print("W&B offline: the table was not logged to W&B")
        return
    with open(table_csv, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    entity, _, name = project.rpartition("/")
    with wandb.init(project=name, entity=entity or None, job_type="report") as run:
        run.log({"results": wandb.Table(columns=[*header], data=rows)})
