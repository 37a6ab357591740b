"""Per-step cost of the template against a hand-written PyTorch loop, side by side.

Both train the same network (the default experiment's backbone and heads) with the same
losses and the same AdamW optimizer on the same batches, held in memory so that data
generation is not measured. The template runs as configured by default (Lightning's loop,
per-task train metrics, logging, the weighting module); the hand-written loop does forward,
sum of losses, backward, step. Rounds alternate between the two so that machine noise hits
both alike; the median time per step of each is compared.

    uv run python benchmarks/overhead.py [--steps 30] [--rounds 3] [--batch-size 32] [overrides ...]

Prints the ratio template / hand-written (target: at most 1.05).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lightning_mtl.optim import build_optimizer
from lightning_mtl.utils.setup import CONFIG_DIR, configure_environment


class StepTimer(L.Callback):
    """Wall time from the first measured step's start to the last step's end."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def template_step_time(cfg, batches, warmup: int, tmp: Path) -> float:
    model = hydra.utils.instantiate(cfg.model)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        limit_val_batches=0,
        logger=L.pytorch.loggers.CSVLogger(tmp, name="bench"),
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
    )
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(model, train_dataloaders=loader)
    return (timer.end - timer.start) / (len(batches) - warmup)


def hand_written_step_time(cfg, batches, warmup: int) -> float:
    module = hydra.utils.instantiate(cfg.model)
    net, losses, tasks = module.net, module.losses, module.tasks
    # the implementation training uses (fused AdamW where torch supports it), for a fair ratio
    optimizer = build_optimizer(
        module.make_optimizer, [{"params": list(net.parameters())}], module.hparams.optimizer_impl
    )
    net.train()
    start = 0.0
    for index, batch in enumerate(batches):
        if index == warmup:
            start = time.perf_counter()
        outputs = net(batch["image"])
        loss = sum(losses[t.name](outputs[t.name], batch["targets"][t.target]) for t in tasks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / (len(batches) - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=25, help="measured steps per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. model.backbone.name=convnext_atto"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    configure_environment()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=[f"data.batch_size={args.batch_size}", *args.overrides])
    with open_dict(cfg):
        cfg.model.scheduler = None  # the hand-written loop has none either
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    scenes = datamodule.splits["train"].datasets[0]  # the Shapes data module's one source
    loader = DataLoader(scenes, batch_size=args.batch_size, shuffle=False)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == args.warmup + args.steps:
            break
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "mtl_overhead"
    template, hand = [], []
    for round_index in range(args.rounds):
        # Alternate which one runs first: a drift of the machine then hits both alike.
        runs = [
            lambda: hand.append(hand_written_step_time(cfg, copy.copy(batches), args.warmup)),
            lambda: template.append(template_step_time(cfg, copy.copy(batches), args.warmup, tmp)),
        ]
        for run in runs if round_index % 2 == 0 else reversed(runs):
            torch.manual_seed(round_index)  # the same initial weights for both
            run()
        print(
            f"round {round_index + 1}: hand-written {hand[-1] * 1e3:7.1f} ms/step, "
            f"template {template[-1] * 1e3:7.1f} ms/step",
            flush=True,
        )
    hand_ms, template_ms = statistics.median(hand) * 1e3, statistics.median(template) * 1e3
    print(
        f"backbone={cfg.model.backbone.name} tasks={len(cfg.tasks)} batch={args.batch_size} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"median ms/step: hand-written {hand_ms:.1f}, template {template_ms:.1f}")
    paired = statistics.median(t / h for t, h in zip(template, hand, strict=True))
    print(f"median of per-round ratios: {paired:.3f}")
    print(f"ratio template / hand-written: {template_ms / hand_ms:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
