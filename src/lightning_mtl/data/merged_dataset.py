"""One split of several sources as one dataset, and the collate that makes multi-task batches.

An item of :class:`MergedDataset` is a list of ``(source, index)`` keys (the samplers yield
whole batches of them); :func:`collate_merged` stacks the samples and gives every label key a
per-sample mask, False where the sample's source does not label that key. The data module that
builds these per split is in ``merged.py``; the loaders around them in ``loaders.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils.data import Dataset

from lightning_mtl.data.bad_samples import BAD_SAMPLE_ERRORS, SKIPPED_KEY, check_finite
from lightning_mtl.errors import ConfigError, DataError

if TYPE_CHECKING:  # the sources import this package
    from lightning_mtl.data.sources.base import SourceDataset

#: a source's factory (a Hydra ``_partial_`` config), called with ``split=...``
SourceFactory = Callable[..., Dataset[Any]]
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def parse_sources(
    sources: Mapping[str, SourceFactory | Mapping[str, Any]],
) -> tuple[dict[str, SourceFactory], dict[str, dict[str, str]]]:
    """``data.sources`` as ``(factories, renames)`` by source name; a ConfigError naming the
    source for a bad name, an unknown key or a dataset that is not a factory."""
    if not sources:
        raise ConfigError("data.sources is empty: give at least one source dataset")
    factories: dict[str, SourceFactory] = {}
    renames: dict[str, dict[str, str]] = {}
    for name, spec in sources.items():
        if not _NAME.match(str(name)):
            raise ConfigError(
                f"data.sources.{name}: a source name must start with a letter and hold only "
                "letters, digits and '_' (it becomes part of metric keys)"
            )
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"dataset", "rename"}
            if "dataset" not in spec or unknown:
                raise ConfigError(
                    f"data.sources.{name}: expected a dataset factory or a mapping with "
                    f"'dataset' (and optional 'rename'), got keys {sorted(spec)}"
                )
            factories[name] = spec["dataset"]
            renames[name] = dict(spec.get("rename") or {})
        else:
            factories[name] = spec
            renames[name] = {}
        if not callable(factories[name]):
            raise ConfigError(
                f"data.sources.{name}: the dataset must be a factory called with split=..., "
                "e.g. a config with `_partial_: true`"
            )
    return factories, renames


class MergedDataset(Dataset[list[dict[str, Any]]]):
    """The sources of one split; item ``[(source, index), ...]`` is that list of samples.

    Each sample gets ``"source"`` (the source's position) and ``"index"`` (its index in that
    source), and its label keys renamed as the source's ``rename`` says. A sample that cannot be
    read (see ``bad_samples.py``) raises a DataError naming the source (``names``), ``split``
    and index, or with ``on_bad_sample="skip"`` comes back as ``{"bad": cause, "source": s,
    "index": i}``, which :func:`collate_merged` leaves out of the batch.
    """

    def __init__(
        self,
        datasets: Sequence[Dataset[Any]],
        renames: Sequence[Mapping[str, str]] | None = None,
        names: Sequence[str] | None = None,
        split: str = "train",
        on_bad_sample: str = "raise",
    ) -> None:
        self.datasets = list(datasets)
        self.renames = [dict(r) for r in (renames or [{} for _ in self.datasets])]
        self.names = list(names) if names is not None else [f"#{i}" for i in range(len(datasets))]
        self.split, self.on_bad_sample = split, on_bad_sample
        self.reads_draws = [_reads_draws(d) for d in self.datasets]

    def sizes(self) -> list[int]:
        return [len(d) for d in self.datasets]  # type: ignore[arg-type]

    def labels(self) -> dict[str, list[str]]:
        """Each source's label keys, renamed (its ``target_names``, else its first sample's)."""
        labels = {}
        for name, dataset, rename in zip(self.names, self.datasets, self.renames, strict=True):
            keys = getattr(dataset, "target_names", None)
            if keys is None:
                keys = list(dataset[0]["targets"])
            labels[name] = [rename.get(k, k) for k in keys]
        return labels

    def merged_attribute(self, attribute: str) -> dict[str, int]:
        """The sources' ``num_classes`` or ``num_labels`` by renamed key, in one dict; a
        DataError when two sources give one key different values."""
        merged: dict[str, int] = {}
        owner: dict[str, str] = {}
        for name, dataset, rename in zip(self.names, self.datasets, self.renames, strict=True):
            for key, value in (getattr(dataset, attribute, None) or {}).items():
                key = rename.get(key, key)
                if key in merged and merged[key] != value:
                    raise DataError(
                        f"label {key!r} has {attribute}={merged[key]} in source {owner[key]!r} "
                        f"but {value} in {name!r}: rename one (data.sources.{name}.rename)"
                    )
                merged[key], owner[key] = value, name
        return merged

    def sample(self, source: int, index: int, draw: int | None = None) -> dict[str, Any]:
        """Sample ``index`` of source ``source``; ``draw`` (training keys carry it, see
        :class:`~lightning_mtl.data.sampling.Key`) goes to a source that reads with
        ``load(index, draw)``, for its augmentation."""
        dataset = self.datasets[source]
        try:
            if draw is not None and self.reads_draws[source]:
                # a source that reads draws has load(index, draw): see _reads_draws
                item = cast("SourceDataset", dataset).load(index, draw)
            else:
                item = dataset[index]
            check_finite(item)
        except BAD_SAMPLE_ERRORS as error:
            if self.on_bad_sample == "skip":
                return {"bad": str(error), "source": source, "index": index}
            raise DataError(
                f"source {self.names[source]!r}, {self.split} sample {index}: {error} "
                "(data.on_bad_sample=skip would leave such samples out)"
            ) from error
        rename = self.renames[source]
        if rename:
            item = {
                **item,
                "targets": {rename.get(k, k): v for k, v in item["targets"].items()},
                "mask": {rename.get(k, k): v for k, v in item["mask"].items()},
            }
        return {**item, "source": source, "index": index}

    def good_samples(self, source: int, count: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``count`` readable samples among the first ``limit`` of ``source`` (bad ones,
        under ``on_bad_sample=skip``, passed over); a DataError if none of them is good."""
        good: list[dict[str, Any]] = []
        tried = min(self.sizes()[source], limit)
        for index in range(tried):
            item = self.sample(source, index)
            if "bad" not in item:
                good.append(item)
                if len(good) == count:
                    break
        if not good:
            raise DataError(
                f"source {self.names[source]!r}: its first {tried} {self.split} samples are all "
                "bad (see the warnings above)"
            )
        return good

    def __getitem__(self, keys: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        return [self.sample(int(k[0]), int(k[1]), getattr(k, "draw", None)) for k in keys]

    def __len__(self) -> int:
        return sum(self.sizes())


def _reads_draws(dataset: Dataset[Any]) -> bool:
    """Whether a source reads with ``load(index, draw)`` (the contract of ``sources/base.py``;
    not the base class's placeholder)."""
    from lightning_mtl.data.sources.base import SourceDataset  # the sources import this package

    load = getattr(type(dataset), "load", None)
    return callable(load) and load is not SourceDataset.load


def collate_merged(
    samples: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Stack samples of several sources into one batch with a per-sample mask per label key.

    A sample whose source lacks a key gets zeros shaped like the others' label and mask False;
    a key that no sample of the batch has is left out (the model skips that task this step).
    Images must share one size; ``names`` (the sources' names) make the error say which differ.
    Bad samples (``{"bad": cause, ...}``, under ``data.on_bad_sample=skip``) are left out and
    listed as ``batch["skipped_samples"] = [(source name, index, cause), ...]``; a batch of bad
    samples only has no sample (its image is ``torch.empty(0)``, see the data module's
    ``_collate``) and no label.
    """
    skipped = [
        (names[s["source"]] if names else f"#{s['source']}", int(s["index"]), str(s["bad"]))
        for s in samples
        if "bad" in s
    ]
    samples = [s for s in samples if "bad" not in s]
    batch = _stack(samples, names) if samples else _no_sample()
    if skipped:
        batch[SKIPPED_KEY] = skipped
    return batch


def _no_sample() -> dict[str, Any]:
    empty = torch.empty(0, dtype=torch.long)
    return {"image": torch.empty(0), "targets": {}, "mask": {}, "source": empty, "index": empty}


def _stack(samples: Sequence[Mapping[str, Any]], names: Sequence[str] | None) -> dict[str, Any]:
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) > 1:
        by_source = {
            (names[s["source"]] if names else s["source"]): tuple(s["image"].shape) for s in samples
        }
        raise DataError(
            f"a mixed batch holds images of different sizes {by_source}: give the sources one "
            "image_size, or use data.sampling.mixing=homogeneous (one source per batch)"
        )
    keys = sorted({k for s in samples for k in s["targets"]})
    targets, masks = {}, {}
    for key in keys:
        template = next(s["targets"][key] for s in samples if key in s["targets"])
        values, present = [], []
        for s in samples:
            if key in s["targets"]:
                value = torch.as_tensor(s["targets"][key])
                if value.shape != template.shape:
                    raise DataError(
                        f"label {key!r} has shape {tuple(value.shape)} in one sample and "
                        f"{tuple(template.shape)} in another of the same batch"
                    )
                values.append(value)
                present.append(bool(s["mask"].get(key, True)))
            else:
                values.append(torch.zeros_like(template))
                present.append(False)
        targets[key] = torch.stack(values)
        masks[key] = torch.tensor(present)
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "targets": targets,
        "mask": masks,
        "source": torch.tensor([int(s["source"]) for s in samples]),
        "index": torch.tensor([int(s.get("index", -1)) for s in samples]),
    }
