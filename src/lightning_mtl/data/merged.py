"""The data module that merges datasets, each labelling a subset of the tasks, into
multi-task batches.

Each *source* is a dataset of the contract in ``data/sources/base.py`` (its own files, its own
transforms and input size) built once per split into a :class:`MergedDataset`
(``merged_dataset.py``). Training batches come from
:class:`~lightning_mtl.data.sampling.MultiSourceSampler` (strategy, mixed or homogeneous
batches, DDP sharding, resume); :func:`collate_merged` stacks the samples and gives every label
key of the batch a per-sample mask (False where the sample's source does not label it). Losses
then leave those samples out, a task with no labelled sample leaves the step's weighting, and
evaluation runs one loader per source so metrics come per source and per task. A sample that
cannot be read follows ``data.on_bad_sample`` (see ``bad_samples.py``): the run stops naming it,
or it is left out of its batch and counted.

The sources' inputs follow the backbone: :meth:`MergedDataModule.use_backbone_inputs` receives
the backbone's mean, std and input size (from ``train.py``, before any source is built), and
every source factory that takes ``inputs`` (and ``normalization``, when ``data.normalization``
is set) is called with them; see :mod:`lightning_mtl.data.inputs`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader

from lightning_mtl.data.bad_samples import SKIPPED_KEY, BadSampleCount, check_policy
from lightning_mtl.data.inputs import (
    InputConfig,
    Normalization,
    NormalizationSpec,
    accepted_keywords,
    parse_normalization,
    plain_normalization,
)
from lightning_mtl.data.loaders import Batches, TrainLoader, eval_loaders
from lightning_mtl.data.merged_dataset import (
    MergedDataset,
    SourceFactory,
    collate_merged,
    parse_sources,
)
from lightning_mtl.data.sampling import SAMPLING_OPTIONS, MultiSourceSampler
from lightning_mtl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: how many samples of a source are tried for a good one (example batch, an all-bad batch)
EXAMPLE_TRIES = 1000


class MergedDataModule(L.LightningDataModule):
    """Several source datasets, each labelling some tasks, as one multi-task data module.

    Args:
        sources: ``{name: factory}`` or ``{name: {"dataset": factory, "rename": {...}}}``; a
            factory (a Hydra ``_partial_`` config) is called with ``split="train"|"val"|"test"``.
            ``rename`` maps the source's label keys to the keys the tasks read (e.g. two sources
            that both call their label ``segmentation`` but with different classes).
        batch_size: samples per step per rank.
        sampling: ``strategy`` (proportional | round_robin | temperature), ``mixing`` (mixed |
            homogeneous), ``tau``, ``steps_per_epoch`` and ``drop_last``; see ``sampling.py``.
        seed: the sampling order's seed (the same on every rank, after a resume, in every run).
        on_bad_sample: ``raise`` (stop, naming the source, split, index and file) or ``skip``
            (leave the sample out of its batch, warn and count); see ``bad_samples.py``.
        max_bad_fraction: under ``skip``, the run stops once more than this share of the
            samples read (of a split) are bad.
        normalization: None (each source keeps its own ``normalization`` setting: the
            backbone's statistics for natural images, the generated data's own for Shapes), or
            ``backbone`` | ``dataset`` | ``{mean: [...], std: [...]}`` for every source,
            overriding theirs.
    """

    def __init__(
        self,
        sources: Mapping[str, SourceFactory | Mapping[str, Any]],
        batch_size: int = 32,
        sampling: Mapping[str, Any] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        normalization: NormalizationSpec | None = None,
        on_bad_sample: str = "raise",
        max_bad_fraction: float = 0.01,
    ) -> None:
        super().__init__()
        self.on_bad_sample, fraction = check_policy(on_bad_sample, max_bad_fraction)
        #: samples read and skipped per split (under on_bad_sample=skip)
        self.bad_samples = BadSampleCount(fraction)
        self.normalization: str | Normalization | None = None
        if normalization is not None:  # None: each source's own setting
            self.normalization = parse_normalization(normalization, "data.normalization")
        self.inputs: InputConfig | None = None
        self.factories, self.renames = parse_sources(sources)
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {batch_size}")
        self.sampling = dict(sampling or {})
        unknown = set(self.sampling) - set(SAMPLING_OPTIONS)
        if unknown:
            raise ConfigError(
                f"data.sampling has unknown keys {sorted(unknown)}; accepted: "
                f"{', '.join(SAMPLING_OPTIONS)}"
            )
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.seed = int(seed)
        self.splits: dict[str, MergedDataset] = {}
        self._sampler: MultiSourceSampler | None = None
        self._resume: dict[str, int] | None = None
        self._image_shapes: dict[tuple[str, int], tuple[int, ...]] = {}

    # ------------------------------------------------------------------ checkpointed position
    def state_dict(self) -> dict[str, int]:
        """The training position, saved in every checkpoint: the epoch, how many of its batches
        were trained on and the global batch size; and the training samples read and skipped.
        This is the only resume path (see :class:`TrainLoader`): Lightning restores the data
        module first, before or after it builds the loaders."""
        if self._sampler is None:
            return {}
        size = self._sampler.batch_size * self._sampler.num_replicas
        position = {"epoch": self._sampler.epoch, "batches": self._position()}
        bad = {f"bad_{k}": v for k, v in self.bad_samples.state_dict().items()}
        return {**position, "global_batch": size, **bad}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state:
            self._resume = {k: int(v) for k, v in state.items() if not k.startswith("bad_")}
            self.bad_samples.load_state_dict(
                {k[4:]: int(v) for k, v in state.items() if k.startswith("bad_")}
            )
            if self._sampler is not None:  # the loader exists already
                self._apply_resume(self._sampler)

    def _apply_resume(self, sampler: MultiSourceSampler) -> None:
        """Continue the checkpoint's epoch after the batches it trained on. With another global
        batch size (batch_size × world_size) the epoch is cut differently: the samples already
        seen are skipped as nearly as whole batches allow, with a warning."""
        assert self._resume is not None
        batches = self._resume["batches"]
        saved = self._resume.get("global_batch")
        size = sampler.batch_size * sampler.num_replicas
        if saved is not None and saved != size:
            batches = batches * saved // size
            log.warning(
                "resuming with %d samples per step (batch_size × world_size) instead of the "
                "checkpoint's %d: the epoch continues after %d of its steps, so the samples seen "
                "before the checkpoint are skipped only approximately",
                size,
                saved,
                batches,
            )
        sampler.set_epoch(self._resume["epoch"])
        sampler.skip(batches)

    @property
    def names(self) -> list[str]:
        return list(self.factories)

    # ------------------------------------------------------------------ the backbone's inputs
    def use_backbone_inputs(self, config: InputConfig) -> None:
        """The backbone's mean, std and input size, for the sources built from now on (call it
        before setup; splits built earlier are dropped and rebuilt with it)."""
        self.inputs = config
        self.splits.clear()

    def use_targets(self, targets: Sequence[str]) -> None:
        """Keep only the sources that label at least one of ``targets`` (the label keys the
        run's tasks read; :func:`~lightning_mtl.data.inputs.share_task_targets`). A source that
        labels none of them would only add batches without a label of the run: a single-task
        baseline on merged data trains on its task's labelled samples, as the multi-task run
        trains that task. Call before training (the splits are rebuilt)."""
        wanted = set(targets)
        labels = self._split("train").labels()
        unused = [name for name, keys in labels.items() if not wanted & set(keys)]
        if not unused:
            return
        if len(unused) == len(labels):
            raise ConfigError(
                f"no source of data.sources labels any of the tasks' targets {sorted(wanted)}; "
                f"the sources label: {labels}"
            )
        for name in unused:
            log.info(
                "data.sources.%s labels none of the tasks' targets %s (it labels %s): left out",
                name,
                sorted(wanted),
                labels[name],
            )
            del self.factories[name], self.renames[name]
        self.splits.clear()

    def _source_kwargs(self, name: str) -> dict[str, Any]:
        """What a source factory is called with besides ``split``: the backbone's input config
        and ``data.normalization``, each only when set and when the factory takes it."""
        accepted = accepted_keywords(self.factories[name])
        kwargs: dict[str, Any] = {}
        if self.inputs is not None and "inputs" in accepted:
            kwargs["inputs"] = self.inputs
        if self.normalization is not None:
            if "normalization" not in accepted:
                raise ConfigError(
                    f"data.normalization={plain_normalization(self.normalization)!r} is set but "
                    f"the factory of data.sources.{name} takes no normalization argument (it "
                    "normalises its images itself): unset data.normalization and set the others' "
                    "data.sources.<name>.normalization instead"
                )
            kwargs["normalization"] = self.normalization
        return kwargs

    # ------------------------------------------------------------------ datasets and labels
    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for split in wanted.get(stage or "", ("train", "val", "test")):
            self._split(split)

    def _split(self, split: str) -> MergedDataset:
        if split not in self.splits:
            datasets = [
                self.factories[name](split=split, **self._source_kwargs(name))
                for name in self.names
            ]
            for name, dataset in zip(self.names, datasets, strict=True):
                if len(dataset) == 0:  # type: ignore[arg-type]
                    raise DataError(
                        f"data.sources.{name}: the {split} split has no sample (every source "
                        "needs train, val and test samples; check its root and split settings)"
                    )
            renames = [self.renames[name] for name in self.names]
            self.splits[split] = MergedDataset(
                datasets, renames, self.names, split, self.on_bad_sample
            )
        return self.splits[split]

    @property
    def eval_sources(self) -> dict[str, list[str]]:
        """Each source (in evaluation-loader order) and the label keys it provides."""
        return self._split("val").labels()

    @property
    def target_names(self) -> tuple[str, ...]:
        labels = self._split("train").labels().values()
        return tuple(dict.fromkeys(k for keys in labels for k in keys))

    @property
    def num_classes(self) -> dict[str, int]:
        return self._split("train").merged_attribute("num_classes")

    @property
    def num_labels(self) -> dict[str, int]:
        return self._split("train").merged_attribute("num_labels")

    def example_batch(self, size: int = 2) -> list[dict[str, Any]]:
        """One small batch per source (from the val split), to check the tasks. Under
        ``on_bad_sample=skip`` bad samples are passed over (a DataError if none of a source's
        first :data:`EXAMPLE_TRIES` samples is good)."""
        dataset = self._split("val")
        return [
            collate_merged(dataset.good_samples(source, size, EXAMPLE_TRIES), self.names)
            for source in range(len(dataset.datasets))
        ]

    # ------------------------------------------------------------------ loaders
    def _rank(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _trainer_or_none(self) -> L.Trainer | None:
        return getattr(self, "trainer", None)

    def _position(self) -> int:
        """Batches of the current epoch trained on so far (for a mid-epoch checkpoint)."""
        trainer = self._trainer_or_none()
        if trainer is None:
            return 0
        # a _ProcessedTracker at run time; Lightning declares its base class there
        current = trainer.fit_loop.epoch_loop.batch_progress.current
        return int(current.processed)  # type: ignore[attr-defined]

    def train_sampler(self) -> MultiSourceSampler:
        rank, world_size = self._rank()
        return MultiSourceSampler(
            self._split("train").sizes(),
            self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            names=self.names,
            **self.sampling,
        )

    def _collate(self, split: str, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = collate_merged(samples, self.names)
        if batch["image"].dim() == 1:  # every sample bad: an empty batch of the right shape
            source = self.names.index(batch[SKIPPED_KEY][0][0])
            batch["image"] = torch.empty((0, *self._image_shape(split, source)))
        return batch

    def _image_shape(self, split: str, source: int) -> tuple[int, ...]:
        """The shape of the first good image of a source (for a batch of bad samples only)."""
        if (split, source) not in self._image_shapes:
            (item,) = self._split(split).good_samples(source, 1, EXAMPLE_TRIES)
            self._image_shapes[split, source] = tuple(item["image"].shape)
        return self._image_shapes[split, source]

    # ------------------------------------------------------------------ bad samples
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count (and warn about) the samples a batch left out, in the main process: a
        DataError once they exceed ``max_bad_fraction`` (see ``bad_samples.py``)."""
        if isinstance(batch, dict):
            skipped = batch.pop(SKIPPED_KEY, [])
            if self.on_bad_sample == "skip":
                self.bad_samples.update(self._stage_split(), len(batch["image"]), skipped)
        return batch

    def _stage_split(self) -> str:
        trainer = self._trainer_or_none()
        stage = trainer.state.stage if trainer is not None else None
        if stage == RunningStage.TESTING:
            return "test"
        if stage in (RunningStage.VALIDATING, RunningStage.SANITY_CHECKING):
            return "val"
        return "train" if stage in (RunningStage.TRAINING, None) else str(stage.value)

    def train_dataloader(self) -> DataLoader[Any]:
        sampler = self.train_sampler()
        if self._resume is not None:  # restored from a checkpoint: continue where it stopped
            self._apply_resume(sampler)
            self._resume = None
        self._sampler = sampler
        trainer = self._trainer_or_none()
        # overfit_batches: set by Lightning's data connector, not declared on Trainer
        if trainer is not None and trainer.overfit_batches:  # type: ignore[attr-defined]
            # Lightning swaps the sampler for a sequential one when overfitting: hand it a fixed
            # list of this rank's batches (the first epoch's) to read in order
            batches = [sampler.rank_slice(b) for b in sampler.global_batches(0)]
            return DataLoader(
                Batches(self._split("train"), batches),
                batch_size=None,
                collate_fn=functools.partial(self._collate, "train"),
                num_workers=self.num_workers,
            )
        counts = sampler.describe(self.names)
        log.info("samples per epoch by source: %s; %d steps", counts, len(sampler))
        return TrainLoader(
            self._split("train"),
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches of (source, index)
            collate_fn=functools.partial(self._collate, "train"),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def _eval_loaders(self, split: str) -> list[DataLoader[Any]]:
        rank, world_size = self._rank()
        return eval_loaders(
            self._split(split),
            self.batch_size,
            rank,
            world_size,
            functools.partial(self._collate, split),
            self.num_workers,
            self.pin_memory,
        )

    def val_dataloader(self) -> list[DataLoader[Any]]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader[Any]]:
        return self._eval_loaders("test")
