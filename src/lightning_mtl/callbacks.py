"""Callbacks of the template: the gradient-conflict heatmap for W&B."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger


class GradientConflictHeatmap(L.Callback):
    """Log the task-gradient cosine matrix as a heatmap image to W&B when it is measured.

    The module measures it every ``model.grad_monitor_every_n_steps`` steps (and logs its
    entries as scalars to every logger); this adds the picture, which shows at a glance which
    task pairs conflict (negative cosine, red) or agree (blue). Without a W&B logger it does
    nothing.
    """

    def __init__(self) -> None:
        self._last_step = -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        conflict = getattr(pl_module, "conflict", None)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if conflict is None or not loggers or not trainer.is_global_zero:
            return
        names, cosine, step = conflict
        if step == self._last_step:
            return
        self._last_step = step
        figure = conflict_figure(names, cosine.float().numpy(), step)
        for logger in loggers:
            logger.log_image(key="train/grad_conflict", images=[figure], step=trainer.global_step)
        import matplotlib.pyplot as plt

        plt.close(figure)


def conflict_figure(names: list[str], cosine: Any, step: int) -> Any:
    """A matplotlib heatmap of a task-gradient cosine matrix, annotated with its values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.0 + 0.7 * len(names)
    figure, axes = plt.subplots(figsize=(size + 1.0, size))
    image = axes.imshow(cosine, cmap="RdBu", vmin=-1, vmax=1)
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            axes.text(j, i, f"{cosine[i, j]:.2f}", ha="center", va="center", fontsize=8)
    axes.set_title(f"task-gradient cosine, step {step}")
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    return figure
