"""The results workflow: Δm against hand-computed values, the store, the report's comparisons
and notes, and the whole path from tiny trainings to `mtl-report`'s table."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from lightning_mtl.compare.table import higher_is_better
from lightning_mtl.results import (
    ResultsStore,
    RunRecord,
    build_report,
    delta_m,
    markdown,
    record_from_config,
)
from lightning_mtl.results.cli import main as report_main
from lightning_mtl.results.identity import differences
from lightning_mtl.results.record import read_run_folder


# ------------------------------------------------------------------------------------ Δm
def test_delta_m_against_hand_computed_values() -> None:
    mtl = {
        "segmentation": {"miou": 0.5, "pixel_accuracy": 0.9},  # ↑: +25 %, 0 %
        "depth": {"abs_rel": 0.1, "delta1": 0.8},  # ↓: 25 % worse; ↑: 0.05/0.85 worse
    }
    stl = {
        "segmentation": {"miou": 0.4, "pixel_accuracy": 0.9},
        "depth": {"abs_rel": 0.08, "delta1": 0.85},
    }
    result = delta_m(mtl, stl, higher_is_better)
    expected_terms = {
        ("segmentation", "miou"): -25.0,
        ("segmentation", "pixel_accuracy"): 0.0,
        ("depth", "abs_rel"): 25.0,
        ("depth", "delta1"): 100 * 0.05 / 0.85,
    }
    assert result.terms == pytest.approx(expected_terms)
    # the mean over all four metrics (not over the two tasks: (−12.5 + 15.44) / 2 would differ)
    assert result.value == pytest.approx((-25 + 0 + 25 + 500 / 85) / 4)
    assert result.missing == [] and result.skipped == {}

    # one task better on everything: negative Δm
    better = delta_m(
        {"count": {"mae": 0.3, "r2": 0.9}}, {"count": {"mae": 0.4, "r2": 0.6}}, higher_is_better
    )
    assert better.value == pytest.approx((-25.0 - 50.0) / 2)
    # a negative baseline (R² can be): the sign still says better or worse
    assert delta_m({"c": {"r2": 0.1}}, {"c": {"r2": -0.2}}, higher_is_better).value == (
        pytest.approx(-150.0)
    )


def test_delta_m_refuses_a_missing_baseline_and_reports_what_it_leaves_out() -> None:
    stl = {"segmentation": {"miou": 0.4, "custom": 1.0, "pixel_accuracy": 0.0}}
    mtl = {
        "segmentation": {"miou": 0.5, "custom": 2.0, "pixel_accuracy": 0.5, "f1": 0.3},
        "depth": {"abs_rel": 0.1},
    }
    result = delta_m(mtl, stl, higher_is_better)
    assert result.value is None and result.missing == ["depth"]
    assert result.skipped == {
        ("segmentation", "custom"): "direction unknown",
        ("segmentation", "pixel_accuracy"): "baseline value 0 (no relative change)",
        ("segmentation", "f1"): "no baseline value",
    }
    assert result.terms == {("segmentation", "miou"): pytest.approx(-25.0)}
    # every task has a baseline: Δm over the metrics that can be compared
    assert delta_m({"segmentation": mtl["segmentation"]}, stl, higher_is_better).value == (
        pytest.approx(-25.0)
    )
    # a diverged run: no Δm
    diverged = delta_m({"segmentation": {"miou": math.nan}}, stl, higher_is_better)
    assert diverged.value is None


# ---------------------------------------------------------------------------- records, store
TASKS = ["task=[count,colors]"]


def _record(
    make_cfg: Callable[..., DictConfig],
    values: dict[str, float],
    *overrides: str,
    run: str,
) -> RunRecord:
    cfg = make_cfg(*overrides)
    return record_from_config(cfg, f"/runs/{run}", values, "abc123")


def _values(count_mae: float, colors_map: float, step_ms: float = 100.0) -> dict[str, float]:
    return {
        "test/count/mae": count_mae,
        "test/colors/map": colors_map,
        "test/count/loss": 9.0,  # losses are not metrics of the table
        "perf/step_ms": step_ms,
    }


def test_identity_fingerprints_separate_seed_recipe_setup_and_tasks(
    make_cfg: Callable[..., DictConfig],
) -> None:
    base = _record(make_cfg, {}, *TASKS, "seed=1", run="a")
    other_seed = _record(make_cfg, {}, *TASKS, "seed=2", run="b")
    other_method = _record(make_cfg, {}, *TASKS, "seed=1", "weighting=famo", run="c")
    other_lr = _record(make_cfg, {}, *TASKS, "seed=1", "model.optimizer.lr=0.01", run="d")
    other_budget = _record(make_cfg, {}, *TASKS, "seed=1", "trainer.max_epochs=2", run="e")
    single = _record(make_cfg, {}, "task=[count]", "seed=1", run="f")
    moved = _record(make_cfg, {}, *TASKS, "seed=1", "data.num_workers=2", run="g")

    assert base.tasks == ["count", "colors"] and base.weighting == "equal"
    assert base.level == "loss" and base.architecture == "hard" and base.seed == 1
    assert base.recipe_hash == other_seed.recipe_hash and base.config_hash != other_seed.config_hash
    # the seed reaches the data's sampling order and PCGrad's seed as ${seed}: not the setup
    assert base.setup_hash == other_seed.setup_hash
    assert other_method.setup_hash == base.setup_hash != other_budget.setup_hash
    assert other_method.recipe_hash != base.recipe_hash != other_lr.recipe_hash
    assert other_lr.setup_hash != base.setup_hash  # the optimizer is part of the setup
    assert (
        single.setup_hash == base.setup_hash
        and single.task_specs["count"] == (base.task_specs["count"])
    )
    assert moved.config_hash == base.config_hash  # loader settings are not the recipe
    assert differences(other_budget.setup, base.setup) == ["trainer.max_epochs: 2 vs 1"]
    assert other_budget.budget["trainer.max_epochs"] == 2


def test_store_round_trip_and_replacement(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    store = ResultsStore(tmp_path / "deep" / "results.sqlite")
    with pytest.raises(FileNotFoundError, match="mtl-report add"):
        store.records()
    first = _record(make_cfg, _values(0.5, 0.8), *TASKS, "seed=1", run="a")
    store.add(first)
    store.add(_record(make_cfg, _values(0.6, 0.7), *TASKS, "seed=2", run="b"))
    again = _record(make_cfg, _values(0.4, 0.9), *TASKS, "seed=1", run="a")  # resumed, finished
    store.add(again)
    records = {r.run_dir: r for r in store.records()}
    assert sorted(records) == ["/runs/a", "/runs/b"]
    assert records["/runs/a"].values == again.values
    assert records["/runs/a"].setup == first.setup and records["/runs/a"].tasks == first.tasks
    assert records["/runs/a"].recorded_at
    assert store.remove(["/runs/b"]) == 1 and len(store.records()) == 1


# --------------------------------------------------------------------------------- the report
def test_report_groups_methods_seeds_baselines_and_says_what_is_missing(
    make_cfg: Callable[..., DictConfig],
) -> None:
    records = [
        _record(make_cfg, _values(0.50, 0.80, 100), *TASKS, "seed=1", run="eq1"),
        _record(make_cfg, _values(0.40, 0.90, 110), *TASKS, "seed=2", run="eq2"),
        _record(make_cfg, _values(0.30, 0.85, 150), *TASKS, "seed=1", "weighting=famo", run="f1"),
        _record(make_cfg, _values(0.32, 0.95, 150), *TASKS, "seed=2", "weighting=famo", run="f2"),
        # the same method with another learning rate: its own row, labelled by the difference
        _record(
            make_cfg, _values(0.9, 0.5, 100), *TASKS, "seed=1", "model.optimizer.lr=0.01", run="lr"
        ),
        # baselines: count twice (seeds), colors once
        _record(make_cfg, {"test/count/mae": 0.40, "perf/step_ms": 60}, "task=[count]", run="c1"),
        _record(
            make_cfg,
            {"test/count/mae": 0.60, "perf/step_ms": 60},
            "task=[count]",
            "seed=2",
            run="c2",
        ),
        _record(make_cfg, {"test/colors/map": 0.80, "perf/step_ms": 70}, "task=[colors]", run="k1"),
    ]
    # only two metric columns: restrict each run's values to mae and map
    comparisons = build_report(records)
    assert len(comparisons) == 2  # lr=0.01 changes the optimizer: another setup
    main = next(c for c in comparisons if len(c.rows) == 2)
    assert main.columns == ["test/count/mae", "test/colors/map"]
    rows = {r.label: r for r in main.rows}
    assert set(rows) == {"equal", "famo"}
    baseline = main.baseline
    assert baseline is not None and baseline.metrics["test/count/mae"].mean == pytest.approx(0.5)
    assert baseline.step_ms == pytest.approx(130)  # one step of each single-task network

    # Δm per run, by hand: count mae ↓ against 0.5, colors map ↑ against 0.8
    def by_hand(mae: float, map_: float) -> float:
        return (100 * (mae - 0.5) / 0.5 - 100 * (map_ - 0.8) / 0.8) / 2

    assert rows["equal"].deltas == pytest.approx([by_hand(0.5, 0.8), by_hand(0.4, 0.9)])
    assert rows["famo"].delta.mean == pytest.approx((by_hand(0.3, 0.85) + by_hand(0.32, 0.95)) / 2)
    assert rows["famo"].delta.std == pytest.approx(
        abs(by_hand(0.3, 0.85) - by_hand(0.32, 0.95)) / math.sqrt(2)
    )
    assert rows["famo"].rank == 1.0 and rows["equal"].rank == 2.0  # better on both columns
    assert rows["famo"].time_ratio == pytest.approx(150 / 105)
    assert rows["famo"].metrics["test/count/mae"].text() == "0.3100 ± 0.0141"

    # the other setup (lr=0.01): no baseline of that setup, and why
    other = next(c for c in comparisons if c is not main)
    assert other.baseline is None and other.rows[0].deltas == [None]
    assert any("model.optimizer.lr: 0.002 vs 0.01" in n for n in other.notes), other.notes
    text = markdown(comparisons, ["count/mae"])
    assert "| famo | 1,2 | " in text and " ± 0." in text and "± +" not in text
    assert "| famo | 1,2 |" in text and "colors/map" not in text.split("note")[0]


def test_report_splits_recipes_and_notes_seeds_and_commits(
    make_cfg: Callable[..., DictConfig],
) -> None:
    a = _record(make_cfg, _values(0.5, 0.8), *TASKS, "seed=1", "weighting=famo", run="a")
    b = _record(
        make_cfg, _values(0.5, 0.8), *TASKS, "seed=1", "weighting=famo", "weighting.lr=0.1", run="b"
    )
    c = _record(make_cfg, _values(0.5, 0.8), *TASKS, "seed=3", run="c")
    c.git_commit = "def456"
    (comparison,) = build_report([a, b, c])
    labels = sorted(r.label for r in comparison.rows)
    assert labels == ["equal", "famo (weighting.lr=0.025)", "famo (weighting.lr=0.1)"]
    notes = " ".join(comparison.notes)
    assert "no single-task baseline of 'count'" in notes and "task=count" in notes
    assert "different seeds" in notes and "2 commits: abc123, def456" in notes


# -------------------------------------------------------------------------------- end to end
def test_trainings_to_table_and_one_more_run_updates_it(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two single-task baselines and a multi-task run, each recorded at the end of its training;
    `mtl-report` gives Δm; one more run (another seed) and the table has it."""
    from lightning_mtl.train import train

    store = tmp_path / "results.sqlite"
    common = [
        f"results.store={store}",
        "callbacks.gradient_conflict=null",
        "callbacks.model_checkpoint=null",
        "callbacks.last_checkpoint=null",
        "callbacks.model_report=null",
        "preflight.mode=skip",
        "trainer.limit_val_batches=1",
    ]

    def run(name: str, *overrides: str) -> None:
        cfg = make_cfg(*common, *overrides, out=tmp_path / name)
        train(cfg)
        (tmp_path / name / ".hydra").mkdir()
        OmegaConf.save(cfg, tmp_path / name / ".hydra" / "config.yaml")  # as Hydra saves it

    run("stl_count", "task=[count]")
    run("stl_colors", "task=[colors]")
    run("mtl_1", *TASKS, "seed=1")
    out = tmp_path / "report"
    assert report_main(["--store", str(store), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "single-task" in printed and "| equal | 1 |" in printed
    with open(out / "results.csv", newline="") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"single-task", "equal"}
    delta = float(rows["equal"]["delta_m"])
    assert math.isfinite(delta) and rows["equal"]["runs"] == "1"
    records = {Path(r.run_dir).name: r for r in ResultsStore(store).records()}
    assert records["mtl_1"].git_commit not in ("", "unknown")
    assert records["mtl_1"].values["perf/step_ms"] > 0  # the step timer's figure

    run("mtl_2", *TASKS, "seed=2")
    assert report_main(["table", "--store", str(store), "--out", str(out)]) == 0
    with open(out / "results.csv", newline="") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert rows["equal"]["runs"] == "2" and rows["equal"]["seeds"] == "1;2"
    assert len(rows["equal"]["delta_m_per_run"].split(";")) == 2
    assert "| equal | 1,2 |" in (out / "results.md").read_text()

    # a run folder read back gives the same identity as the record made at its end
    folder = read_run_folder(tmp_path / "mtl_1")
    assert folder.config_hash == records["mtl_1"].config_hash
    assert folder.values["test/count/mae"] == pytest.approx(
        records["mtl_1"].values["test/count/mae"]
    )
    # `add` of a folder into another store
    other = tmp_path / "other.sqlite"
    assert report_main(["add", str(tmp_path / "stl_count"), "--store", str(other)]) == 0
    assert [Path(r.run_dir).name for r in ResultsStore(other).records()] == ["stl_count"]
    assert report_main(["--store", str(tmp_path / "none.sqlite")]) == 2


def test_records_put_in_a_wandb_summary_are_read_back(
    make_cfg: Callable[..., DictConfig],
) -> None:
    """`mtl-report --wandb` reads the record each run puts in its W&B summary (a fake API here:
    the real one needs the network)."""
    import json
    from dataclasses import asdict

    from lightning_mtl.results.record import WANDB_KEY, records_from_wandb

    record = _record(make_cfg, _values(0.5, 0.8), *TASKS, "seed=1", run="w")

    class Run:
        def __init__(self, summary: dict) -> None:
            self.summary = summary

    class Api:
        def runs(self, project: str) -> list[Run]:
            assert project == "me/lightning-mtl"
            return [Run({WANDB_KEY: json.dumps(asdict(record), default=str)}), Run({})]

    (read,) = records_from_wandb("me/lightning-mtl", api=Api())
    assert read == record


def test_baselines_take_one_recipe_repeats_count_once_and_ranks_share_ties(
    make_cfg: Callable[..., DictConfig],
) -> None:
    from lightning_mtl.results.record import unrecordable

    count = {"test/count/mae": 0.5, "perf/step_ms": 60}
    colors = {"test/colors/map": 0.8, "perf/step_ms": 70}
    records = [
        _record(make_cfg, _values(0.5, 0.8), *TASKS, "seed=1", run="eq"),
        _record(make_cfg, _values(0.5, 0.8), *TASKS, "seed=1", run="eq_again"),  # same config
        _record(make_cfg, _values(0.4, 0.8), *TASKS, "seed=1", "weighting=famo", run="famo"),
        _record(make_cfg, count, "task=[count]", run="c_plain"),
        # a single-task run with uncertainty weighting (rescales its loss): not mixed in
        _record(
            make_cfg, {"test/count/mae": 9.0}, "task=[count]", "weighting=uncertainty", run="c_uw"
        ),
        _record(make_cfg, colors, "task=[colors]", run="k"),
    ]
    (comparison,) = build_report(records)
    assert comparison.baseline is not None
    assert sorted(r.run_dir for r in comparison.baseline.runs) == ["/runs/c_plain", "/runs/k"]
    assert comparison.baseline.metrics["test/count/mae"].mean == 0.5
    rows = {r.label: r for r in comparison.rows}
    assert [r.run_dir for r in rows["equal"].runs] == ["/runs/eq_again"]  # the later one
    notes = " ".join(comparison.notes)
    assert "other recipes left out (they differ in weighting" in notes
    assert "repeat the config and seed of a later run" in notes and "/runs/eq" in notes
    # colors/map ties (0.8 both): rank 1.5 each; count/mae: famo 1, equal 2
    assert rows["famo"].rank == pytest.approx((1 + 1.5) / 2)
    assert rows["equal"].rank == pytest.approx((2 + 1.5) / 2)
    assert rows["equal"].deltas == [pytest.approx(0.0)] and comparison.baseline.seeds == [42]

    # an evaluation of a checkpoint is not a training; a run without final metrics neither
    assert "not a training" in unrecordable({"train": False}, {"test/a/mae": 1.0})
    assert "no final" in unrecordable({"train": True}, {"perf/step_ms": 1.0})
    # still training (val metrics, no test yet) unless the run does not test
    assert "no final test/" in unrecordable({"train": True}, {"val/a/mae": 1.0})
    assert unrecordable({"train": True, "test": False}, {"val/a/mae": 1.0}) is None


def test_baselines_without_metrics_and_recipes_beyond_the_shown_keys_are_reported(
    make_cfg: Callable[..., DictConfig],
) -> None:
    runs = [
        _record(make_cfg, _values(0.5, 0.8), *TASKS, "seed=1", run="a"),
        _record(make_cfg, {"test/count/mae": math.nan}, "task=[count]", run="c"),
        _record(make_cfg, {"test/colors/map": 0.8}, "task=[colors]", run="k"),
    ]
    (comparison,) = build_report(runs)
    assert comparison.rows[0].deltas == [None]
    assert "single-task runs of 'count' have no finite test/ metric" in " ".join(comparison.notes)

    # famo variants in 4 varying keys; the label shows 3 (sorted): the first two variants
    # differ only in the 4th, weighting.weight_decay, and are told apart by their recipe hash
    variants = [
        _record(
            make_cfg,
            _values(0.5, 0.8),
            *TASKS,
            "weighting=famo",
            f"tasks.count.weight={w}",
            f"weighting.lr={lr}",
            f"weighting.min_losses={m}",
            f"weighting.weight_decay={wd}",
            run=f"v{i}",
        )
        for i, (w, lr, m, wd) in enumerate([(1, 0.1, 0, 0.1), (1, 0.1, 0, 0.2), (2, 0.2, -1, 0.1)])
    ]
    (comparison,) = build_report(variants)
    labels = [r.label for r in comparison.rows]
    assert len(labels) == len(set(labels)) == 3
    assert sum("; recipe " in label for label in labels) == 1, labels
