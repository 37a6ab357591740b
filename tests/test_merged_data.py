"""Merged heterogeneous data: sampling strategies, masks, per-source metrics, DDP and resume."""

from __future__ import annotations

import collections
import contextlib
import csv
import json
import logging
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from lightning_mtl.data import MergedDataModule, MultiSourceSampler, ShapesSource, collate_merged
from lightning_mtl.data.sampling import source_counts
from lightning_mtl.errors import ConfigError, DataError
from lightning_mtl.metrics import R2Score
from lightning_mtl.train import train
from lightning_mtl.weighting import WEIGHTINGS
from tests.conftest import DDP_WARNINGS, FAST, compose_config, run_ddp_sim
from tests.test_data import Killed

SMALL = [
    "experiment=shapes_heterogeneous",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.sources.scenes.sizes={train:40,val:16,test:8}",
    "data.sources.objects.sizes={train:16,val:8,test:8}",
    "data.sources.scenes.image_size=32",
    "data.sources.objects.image_size=32",
]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


def fast(*more: str) -> list[str]:
    return [*(o for o in FAST if not o.startswith("data.")), *SMALL, *more]


def config(out: Path, *more: str) -> DictConfig:
    return compose_config("train", fast(*more), out)


def lean_config(out: Path, *more: str) -> DictConfig:
    """``config`` without the default callbacks (no checkpoint files, no monitors): for the
    resume tests, which write the one checkpoint they resume from themselves."""
    overrides = [o for o in fast(*more) if not o.startswith("callbacks.")]
    return compose_config("train", ["callbacks=none", *overrides], out)


def epoch_items(sampler: MultiSourceSampler, world_size: int) -> list[list[tuple[int, int]]]:
    """Every rank's batches of the sampler's epoch (ranks built like the given one)."""
    ranks = []
    for rank in range(world_size):
        other = MultiSourceSampler(
            sampler.sizes,
            sampler.batch_size,
            strategy=sampler.strategy,
            mixing=sampler.mixing,
            tau=sampler.tau,
            steps_per_epoch=sampler.steps_per_epoch,
            drop_last=sampler.drop_last,
            seed=sampler.seed,
            rank=rank,
            world_size=world_size,
        )
        other.set_epoch(sampler.epoch)
        ranks.append(list(other))
    return ranks


def test_proportional_mixed_sees_every_sample_once_per_epoch_across_ranks() -> None:
    sizes = [10, 6]
    sampler = MultiSourceSampler(sizes, batch_size=3, world_size=2, seed=5, drop_last=False)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        ranks = epoch_items(sampler, 2)
        assert len(ranks[0]) == len(ranks[1]) == len(sampler) == 3  # 16 samples, 6 per step
        seen = collections.Counter(item for rank in ranks for batch in rank for item in batch)
        # 16 = 2 full global batches of 6 + a tail of 4 split 2/2: every sample exactly once
        assert seen == collections.Counter(
            {(s, i): 1 for s, n in enumerate(sizes) for i in range(n)}
        )
        assert [len(b) for b in ranks[0]] == [3, 3, 2]
        assert any(len({s for s, _ in b}) == 2 for b in ranks[0])  # batches mix sources
    # deterministic from the seed; a new epoch is a new order
    again = MultiSourceSampler(sizes, batch_size=3, world_size=2, seed=5, drop_last=False)
    assert list(again) == epoch_items(again, 2)[0]
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(MultiSourceSampler(sizes, 3, seed=6, world_size=2, drop_last=False)) != first


def test_padding_and_drop_last_of_the_final_global_batch() -> None:
    sampler = MultiSourceSampler([7], batch_size=2, world_size=2, drop_last=False)  # 7 = 4 + 3
    ranks = epoch_items(sampler, 2)
    seen = collections.Counter(item for rank in ranks for batch in rank for item in batch)
    assert sum(seen.values()) == 8 and set(seen) == {(0, i) for i in range(7)}  # 1 padded
    assert max(seen.values()) == 2
    dropped = MultiSourceSampler([7], batch_size=2, world_size=2, drop_last=True)
    ranks = epoch_items(dropped, 2)
    seen = collections.Counter(item for rank in ranks for batch in rank for item in batch)
    assert sum(seen.values()) == 4 and max(seen.values()) == 1 and len(dropped) == 1


def test_round_robin_homogeneous_alternates_sources_and_cycles_the_small_one() -> None:
    sampler = MultiSourceSampler(
        [12, 4], batch_size=4, strategy="round_robin", mixing="homogeneous", seed=1
    )
    batches = list(sampler)
    sources = [{s for s, _ in b} for b in batches]
    assert all(len(s) == 1 for s in sources)  # one source per batch
    assert [s.pop() for s in sources] == [0, 1, 0, 1, 0, 1]
    seen = collections.Counter(item for b in batches for item in b)
    assert all(seen[(0, i)] == 1 for i in range(12))  # the largest source: once
    assert all(seen[(1, i)] == 3 for i in range(4))  # the small one: three full passes
    assert source_counts([12, 4], "round_robin") == [12, 12]


def test_temperature_shares_and_streams_that_continue_across_epochs() -> None:
    assert source_counts([90, 10], "temperature", tau=1.0) == [90, 10]
    assert source_counts([90, 10], "temperature", tau=2.0) == [75, 25]  # √90 : √10 = 3 : 1
    assert source_counts([90, 10], "temperature", tau=1e6) == [50, 50]
    sampler = MultiSourceSampler([90, 10], batch_size=10, strategy="temperature", tau=2.0)
    small = []
    for epoch in range(2):  # 2 × 25 = 50 draws of the small source: exactly 5 passes
        sampler.set_epoch(epoch)
        drawn = collections.Counter(i for b in sampler for s, i in b if s == 1)
        assert sum(drawn.values()) == 25 and set(drawn.values()) <= {2, 3}  # 2.5 passes
        small.append(drawn)
    assert small[0] + small[1] == collections.Counter({i: 5 for i in range(10)})
    big = [i for b in sampler for s, i in b if s == 0]  # epoch 1: items 75..149 of its stream
    assert len(big) == 75 and len(set(big)) < 75  # the second pass began within this epoch


def test_steps_per_epoch_skip_and_bad_settings() -> None:
    sampler = MultiSourceSampler([30, 10], batch_size=4, steps_per_epoch=5, world_size=2)
    assert len(sampler) == 5 and all(len(b) == 4 for b in sampler)
    full = list(sampler)
    sampler.skip(3)
    assert list(sampler) == full[3:]  # resume: the rest of the same epoch
    assert list(sampler) == full[3:]  # every iterator of that epoch skips them
    assert len(sampler) == 5  # the length stays the epoch's (Lightning counts from 3)
    sampler.set_epoch(1)
    assert len(list(sampler)) == 5  # the next epoch is whole
    with pytest.raises(ConfigError, match=r"strategy='size'.*proportional, round_robin"):
        MultiSourceSampler([3], 1, strategy="size")
    with pytest.raises(ConfigError, match="tau must be positive"):
        MultiSourceSampler([3], 1, strategy="temperature", tau=0)
    with pytest.raises(ConfigError, match="mixing='both'"):
        MultiSourceSampler([3], 1, mixing="both")


def test_collate_masks_missing_labels_and_refuses_mixed_sizes() -> None:
    a = ShapesSource("train", {"train": 4}, targets=["segmentation"], seed=1, image_size=16)
    b = ShapesSource("train", {"train": 4}, targets=["count"], seed=2, image_size=16)
    samples = [{**a[0], "source": 0}, {**b[0], "source": 1}, {**a[1], "source": 0}]
    batch = collate_merged(samples, ["a", "b"])
    assert batch["mask"]["segmentation"].tolist() == [True, False, True]
    assert batch["mask"]["count"].tolist() == [False, True, False]
    assert batch["targets"]["segmentation"].shape == (3, 16, 16)
    assert float(batch["targets"]["count"][0]) == 0.0  # placeholder under a False mask
    assert batch["source"].tolist() == [0, 1, 0]
    only_a = collate_merged([{**a[0], "source": 0}])
    assert set(only_a["targets"]) == {"segmentation"}  # no sample labels count: key absent
    big = ShapesSource("train", {"train": 1}, targets=["count"], seed=2, image_size=24)
    with pytest.raises(DataError, match=r"different sizes.*'a'.*'b'.*homogeneous"):
        collate_merged([{**a[0], "source": 0}, {**big[0], "source": 1}], ["a", "b"])


def test_data_module_merges_labels_and_refuses_conflicts() -> None:
    def source(targets, seed, **kw):
        def make(split):
            return ShapesSource(split, {"train": 8, "val": 4, "test": 4}, targets, seed, 16, **kw)

        return make

    dm = MergedDataModule(
        {"a": source(["segmentation", "depth"], 1), "b": {"dataset": source(["count"], 2)}},
        batch_size=4,
    )
    dm.setup("fit")
    assert dm.target_names == ("segmentation", "depth", "count")
    assert dm.num_classes == {"segmentation": 4}
    assert dm.eval_sources == {"a": ["segmentation", "depth"], "b": ["count"]}
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 4  # 16 samples, batch 4 (one process)
    for batch in batches:  # a label's mask is exactly "the sample's source labels it"
        assert batch["mask"]["count"].tolist() == (batch["source"] == 1).tolist()
    val = dm.val_dataloader()
    assert [len(v) for v in val] == [1, 1]
    assert next(iter(val[1]))["source"].tolist() == [1] * 4
    assert [set(b["targets"]) for b in dm.example_batch()] == [{"segmentation", "depth"}, {"count"}]

    clash = MergedDataModule(
        {"a": source(["segmentation"], 1), "b": {"dataset": source(["dominant_color"], 2)}},
        batch_size=4,
    )
    clash.renames["b"] = {"dominant_color": "segmentation"}  # 6 colours vs 4 shape classes
    with pytest.raises(DataError, match=r"'segmentation' has num_classes=4 in source 'a'.*6"):
        _ = clash.num_classes
    with pytest.raises(ConfigError, match=r"data\.sources\.bad-name"):
        MergedDataModule({"bad-name": source(["count"], 1)})
    with pytest.raises(ConfigError, match=r"data\.sampling has unknown keys"):
        MergedDataModule({"a": source(["count"], 1)}, sampling={"temperature": 2})


def kill_after_10(out: Path) -> list[str]:
    """Overrides that save ``out/step10.ckpt`` after step 10 and then end training abruptly."""
    path = out / "step10.ckpt"
    return [
        f"+callbacks.kill={{_target_: tests.test_data.KillAfterStep, step: 10, path: '{path}'}}"
    ]


class SampleRecorder(L.Callback):
    """Writes each training step's (epoch, step, [(source, index)]) per rank to a JSON file."""

    def __init__(self, path: str) -> None:
        self.path, self.rows = path, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        pairs = list(zip(batch["source"].tolist(), batch["index"].tolist(), strict=True))
        self.rows.append([trainer.current_epoch, trainer.global_step, pairs])

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        Path(f"{self.path}.{trainer.global_rank}").write_text(json.dumps(self.rows))

    def on_exception(
        self, trainer: L.Trainer, module: L.LightningModule, error: BaseException
    ) -> None:
        self.on_train_end(trainer, module)


def test_heterogeneous_experiment_trains_with_metrics_per_source_and_task(tmp_path: Path) -> None:
    record = tmp_path / "seen"
    cfg = config(
        tmp_path,
        "trainer.max_epochs=2",
        f"+callbacks.recorder={{_target_: tests.test_merged_data.SampleRecorder, path: {record}}}",
    )
    metrics, objects = train(cfg)
    for name in ("val", "test"):
        for key in ("segmentation/miou", "depth/rmse", "count/mae", "colors/map"):
            assert f"{name}/{key}" in metrics
        assert f"{name}/scenes/segmentation/miou" in metrics
        assert f"{name}/objects/count/mae" in metrics
        assert f"{name}/scenes/count/mae" not in metrics  # scenes does not label count
        assert metrics[f"{name}/scenes/depth/rmse"] == pytest.approx(metrics[f"{name}/depth/rmse"])
    rows = json.loads(Path(f"{record}.0").read_text())
    assert len(rows) == 14  # 56 samples, batch 8, 2 epochs
    for epoch in (0, 1):  # proportional: each sample once per epoch
        seen = [tuple(p) for e, _, pairs in rows if e == epoch for p in pairs]
        assert sorted(seen) == sorted([(0, i) for i in range(40)] + [(1, i) for i in range(16)])
    assert objects["trainer"].global_step == 14


def test_resume_mid_epoch_continues_the_same_sampling_sequence(tmp_path: Path) -> None:
    def run(out: Path, *more: str) -> list:
        record = out / "seen"
        out.mkdir(parents=True, exist_ok=True)
        cfg = lean_config(
            out,
            "trainer.max_epochs=2",
            "trainer.limit_val_batches=1",
            "test=false",
            "data.sampling.mixing=homogeneous",
            f"+callbacks.recorder={{_target_: tests.test_merged_data.SampleRecorder, path: {record}}}",
            *more,
        )
        with contextlib.suppress(Killed):  # the first part ends killed after step 10
            train(cfg)
        return json.loads(Path(f"{record}.0").read_text())

    whole = run(tmp_path / "whole")
    first = run(tmp_path / "first", *kill_after_10(tmp_path))  # mid-epoch 1 (7 steps per epoch)
    rest = run(tmp_path / "rest", f"ckpt_path={tmp_path / 'step10.ckpt'}")
    assert [r[2] for r in first] == [r[2] for r in whole[:10]]
    assert [r[2] for r in rest] == [r[2] for r in whole[10:]]  # no batch repeated or skipped


def test_ddp_sim_ranks_share_each_epoch_exactly(tmp_path: Path) -> None:
    """The default suite's one real 2-process run (``mtl-train trainer=ddp_sim``, gloo): each
    sample once per epoch across the ranks, in a different order on each; FAMO's all-reduced
    losses train; validation, test and the conflict monitor log from rank 0; and none of DDP's
    warnings (unused parameters, unsynchronised logging) is printed."""
    record = tmp_path / "seen"
    output = run_ddp_sim(
        tmp_path,
        "trainer.max_epochs=2",
        "data.sources.scenes.sizes={train:44,val:8,test:8}",  # 60 = 3 global batches of 16 + 12
        "data.sampling.drop_last=false",  # the 12 are kept: each sample exactly once
        "weighting=famo",
        "callbacks.gradient_conflict.every_n_steps=2",
        "test=true",
        f"+callbacks.recorder={{_target_: tests.test_merged_data.SampleRecorder, path: {record}}}",
        base=fast(),
        timeout=300,
    )
    ranks = [json.loads(Path(f"{record}.{r}").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 8  # 4 steps per epoch on each rank
    everything = sorted([(0, i) for i in range(44)] + [(1, i) for i in range(16)])
    for epoch in (0, 1):
        seen = [tuple(p) for rows in ranks for e, _, pairs in rows if e == epoch for p in pairs]
        assert sorted(seen) == everything  # once per epoch, across both ranks
    order = [[r[2] for r in rows] for rows in ranks]
    assert order[0] != order[1]
    rows = read_rows(tmp_path / "csv" / "metrics.csv")
    assert max(int(row["step"]) for row in rows if row.get("train/loss")) == 7
    assert any(row.get("val/scenes/segmentation/miou") for row in rows)
    assert any(row.get("test/objects/count/mae") for row in rows)
    cosines = [row for row in rows if row.get("train/grad_cos/segmentation/depth")]
    assert [int(row["step"]) for row in cosines] == [0, 2, 4, 6]
    weights = {float(row["train/weight/depth"]) for row in rows if row.get("train/weight/depth")}
    assert len(weights) > 1  # FAMO's weights move, the same on both ranks (one log, rank 0)
    for warning in DDP_WARNINGS:
        assert warning not in output, warning


def test_homogeneous_batches_put_one_source_on_every_rank_at_each_step() -> None:
    sampler = MultiSourceSampler(
        [24, 8], batch_size=2, strategy="round_robin", mixing="homogeneous", world_size=2
    )
    ranks = epoch_items(sampler, 2)
    for step in zip(*ranks, strict=True):
        assert len({s for batch in step for s, _ in batch}) == 1  # the same source on both
    seen = collections.Counter(item for rank in ranks for batch in rank for item in batch)
    assert all(seen[(0, i)] == 1 for i in range(24)) and all(seen[(1, i)] == 3 for i in range(8))


ONE_OF_EACH = {"equal", "dwa", "famo", "uncertainty", "upgrad", "nash_mtl", "graddrop", "gradnorm"}


@pytest.mark.parametrize(
    "method",
    [
        m if m in ONE_OF_EACH else pytest.param(m, marks=pytest.mark.slow)
        for m in sorted(WEIGHTINGS.names())
    ],
)
def test_every_method_steps_on_batches_of_one_source_and_leaves_absent_tasks_out(
    method: str, tmp_path: Path
) -> None:
    """Homogeneous merged batches: each step labels only one source's tasks. Every method gives
    finite losses and gradients, weights only the tasks present, and leaves the others' heads
    with a zero gradient."""
    cfg = config(
        tmp_path, f"weighting={method}", *(["weighting.warmup_steps=1"] if method == "stch" else [])
    )
    module = hydra.utils.instantiate(cfg.model)
    data = hydra.utils.instantiate(cfg.data)
    data.setup("fit")
    groups = {0: ["segmentation", "depth"], 1: ["count", "dominant_color", "colors"]}
    captured = []
    original = module.weighting.forward

    def capture(losses, context=None):
        captured.append(original(losses, context))
        return captured[-1]

    module.weighting.forward = capture
    # then batches of single-task sources: one task present (no bargaining, no crash)
    schedule = [(0, None), (1, None), (0, None), (1, None), (0, "depth"), (1, "count")]
    for step, (source, only) in enumerate(schedule):
        batch = collate_merged(data.splits["train"][[(source, i) for i in range(4)]])
        if only is not None:
            batch["targets"] = {only: batch["targets"][only]}
            batch["mask"] = {k: v for k, v in batch.get("mask", {}).items() if k == only}
        present = groups[source] if only is None else [only]
        module.zero_grad()
        loss = module.training_step(batch, step)
        loss.backward()
        assert torch.isfinite(loss), (method, step)
        shown = captured[-1].weights
        assert set(shown) == set(present), (method, shown)
        assert all(torch.isfinite(w) for w in shown.values()), (method, shown)
        for name, p in module.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (method, name)
        for task in set(groups[0] + groups[1]) - set(present):
            head = module.net.heads[task]
            assert all(float(p.grad.abs().sum()) == 0.0 for p in head.parameters()), task
        if only is not None:  # the backbone still learns from the one task
            backbone = module.net.architecture.backbone.parameters()
            assert sum(float(p.grad.abs().sum()) for p in backbone if p.grad is not None) > 0


@pytest.mark.parametrize(
    "method",
    ["famo", *(pytest.param(m, marks=pytest.mark.slow) for m in ("dwa", "nash_mtl", "gradvac"))],
)
def test_a_resumed_run_continues_with_exactly_the_weights_of_an_uninterrupted_one(
    method: str, tmp_path: Path
) -> None:
    """Balancer state, model, optimizer and the sampling position all come back: from a
    mid-epoch checkpoint, every later step logs the same task weights as a run that never
    stopped."""

    def weights(out: Path, *more: str) -> dict[int, dict[str, str]]:
        cfg = lean_config(
            out,
            f"weighting={method}",
            "trainer.max_epochs=3",  # DWA's weights move from the third epoch
            "trainer.limit_val_batches=1",
            "test=false",
            *more,
        )
        train(cfg)
        rows = read_rows(out / "csv" / "metrics.csv")
        return {
            int(r["step"]): {k: v for k, v in r.items() if k.startswith("train/weight/") and v}
            for r in rows
            if r.get("train/loss")
        }

    whole = weights(tmp_path / "whole")
    with pytest.raises(Killed):
        weights(tmp_path / "first", *kill_after_10(tmp_path))
    rest = weights(tmp_path / "rest", f"ckpt_path={tmp_path / 'step10.ckpt'}")
    assert sorted(rest) == list(range(10, 21))
    assert rest == {step: whole[step] for step in rest}
    assert len({tuple(w.values()) for w in rest.values()}) > 1  # the weights do move


def test_debug_switches_work_on_merged_data(tmp_path: Path) -> None:
    """debug=overfit makes Lightning replace the training sampler with a sequential one (the
    data module then hands it a fixed list of batches to read in order); debug=fdr runs one
    batch of each stage."""
    metrics, objects = train(
        config(tmp_path, "debug=overfit", "trainer.max_epochs=2", "test=false")
    )
    assert objects["trainer"].global_step == 6  # 3 batches, 2 epochs
    assert metrics["train/loss"] == metrics["train/loss"]
    # one batch of 8 mixed samples: a task may have a single labelled sample, and R² over one
    # sample is NaN instead of an error that would end the run
    metrics, _ = train(config(tmp_path / "fdr", "debug=fdr"))
    assert "test/objects/count/mae" in metrics
    r2 = R2Score()
    r2.update(torch.tensor([1.0]), torch.tensor([2.0]))
    assert torch.isnan(r2.compute())
    r2.update(torch.tensor([3.0]), torch.tensor([2.5]))
    assert float(r2.compute()) == pytest.approx(1 - (1 + 0.25) / 0.125, rel=1e-5)


def test_exact_steps_per_epoch_and_sources_that_would_never_train_are_refused() -> None:
    for sizes, batch, steps in (([10, 10], 4, 3), ([1000, 1000, 1000], 8, 4)):
        sampler = MultiSourceSampler(sizes, batch, mixing="homogeneous", steps_per_epoch=steps)
        assert len(sampler) == steps == len(list(sampler))
    with pytest.raises(ConfigError, match=r"data\.sources\.tiny gives 3 samples.*never be trained"):
        MultiSourceSampler([100, 3], 4, mixing="homogeneous", names=["big", "tiny"])
    with pytest.raises(ConfigError, match=r"data\.sources\.rare gives 0 samples"):
        MultiSourceSampler([10000, 10], 8, steps_per_epoch=10, names=["common", "rare"])
    with pytest.raises(ConfigError, match="steps_per_epoch must be positive"):
        MultiSourceSampler([10], 2, steps_per_epoch=0)
    # a source smaller than the padding a 4-rank final batch needs: padded by cycling
    sampler = MultiSourceSampler([1, 16], 4, mixing="homogeneous", drop_last=False, world_size=4)
    ranks = epoch_items(sampler, 4)
    assert all(len(batch) >= 1 for rank in ranks for batch in rank)
    assert {item for rank in ranks for b in rank for item in b} >= {(0, 0)}


def test_evaluation_batches_are_read_once_across_ranks_and_resume_adapts_to_a_new_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def make(split):
        return ShapesSource(split, {"train": 16, "val": 5, "test": 3}, ["count"], 1, 16)

    dm = MergedDataModule({"a": make, "b": make}, batch_size=4)
    dm.setup("fit")
    for split, n in (("val", 5), ("test", 3)):
        seen = collections.Counter()
        for rank in range(2):
            dm._rank = lambda rank=rank: (rank, 2)
            for loader in dm._eval_loaders(split):
                assert len(loader) >= 1  # Lightning refuses a rank without a batch
                for batch in loader:
                    seen.update(zip(batch["source"].tolist(), batch["index"].tolist(), strict=True))
        assert seen == collections.Counter({(s, i): 1 for s in (0, 1) for i in range(n)})
    dm._rank = lambda: (0, 1)
    dm.load_state_dict({"epoch": 0, "batches": 2, "global_batch": 8})
    with caplog.at_level(logging.WARNING):
        loader = dm.train_dataloader()
    assert loader.sampler._resume == (0, 4)  # 16 samples seen = 4 steps of 4
    assert "instead of the checkpoint's 8" in caplog.text


class Drawn(torch.utils.data.Dataset):
    """A source with training augmentation: its ``count`` label is the draw it was read with
    (-1: a plain ``dataset[i]``, as evaluation reads)."""

    target_names = ("count",)

    def __init__(self, split: str = "train") -> None:
        self.split = split

    def __len__(self) -> int:
        return 12

    def load(self, index: int, draw: int | None = None) -> dict:
        value = torch.tensor([float(-1 if draw is None else draw)])
        return {"image": torch.zeros(3, 4, 4), "targets": {"count": value}, "mask": {}}

    def __getitem__(self, index: int) -> dict:
        return self.load(index, None)


def test_training_reads_carry_draws_the_same_in_workers_and_after_a_resume() -> None:
    """Each training access gets its own draw (its position in the source's stream), passed to
    ``load(index, draw)``: augmentation is reproducible in DataLoader workers and resumes."""
    dm = MergedDataModule({"a": Drawn}, batch_size=4, num_workers=1)  # keys pickled to a worker
    loader = dm.train_dataloader()
    draws = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        draws += [batch["targets"]["count"].flatten().tolist() for batch in loader]
    assert sorted(d for batch in draws for d in batch) == list(range(24))
    resumed = MergedDataModule({"a": Drawn}, batch_size=4)
    resumed.load_state_dict({"epoch": 1, "batches": 1, "global_batch": 4})
    assert [b["targets"]["count"].flatten().tolist() for b in resumed.train_dataloader()] == draws[
        4:
    ]
    assert next(iter(dm.val_dataloader()[0]))["targets"]["count"].flatten().tolist() == [-1.0] * 4


def test_a_single_task_baseline_on_merged_data_reads_only_the_sources_of_its_task(
    tmp_path: Path,
) -> None:
    from lightning_mtl.data.inputs import share_task_targets

    cfg = config(tmp_path, "task=[depth]")
    data, model = hydra.utils.instantiate(cfg.data), hydra.utils.instantiate(cfg.model)
    assert data.names == ["scenes", "objects"]
    assert share_task_targets(data, model) == ["depth"]
    assert data.names == ["scenes"]  # the objects source labels no depth: left out
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert bool(batch["mask"]["depth"].all())  # every sample of every batch labels depth

    both = config(tmp_path, "task=[depth,count]")
    data = hydra.utils.instantiate(both.data)
    share_task_targets(data, hydra.utils.instantiate(both.model))
    assert data.names == ["scenes", "objects"]  # a multi-task run keeps both
    with pytest.raises(ConfigError, match="labels any of the tasks' targets"):
        data.use_targets(["nothing"])
