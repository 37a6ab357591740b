"""What happens to a sample that cannot be read: ``data.on_bad_sample`` and ``data.max_bad_fraction``.

A source's ``__getitem__`` that fails with a :class:`~lightning_mtl.errors.DataError` (a
corrupt file, named by the source), an ``OSError`` (PIL's ``UnidentifiedImageError``, a
truncated file), an ``EOFError`` or a ``ValueError``, or that returns an image or a label
holding NaN or inf, gives a *bad sample*. With ``raise`` (the default) the run stops with a
``DataError`` naming the source, the split, the index and the cause. With ``skip`` the sample is
left out of its batch, and :class:`BadSampleCount` (in the main process, where the batches
arrive even with ``num_workers > 0``) warns about each one, counts them per split and stops the
run once more than ``max_bad_fraction`` of the samples read are bad (counted over at least
:data:`MIN_SAMPLES`, so a single bad sample among the first few does not stop it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from lightning_mtl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

POLICIES = ("raise", "skip")
#: what a source's ``__getitem__`` may raise for an unreadable sample (DataError is a ValueError;
#: PIL's UnidentifiedImageError an OSError)
BAD_SAMPLE_ERRORS = (OSError, EOFError, ValueError)
#: the fraction is taken over at least this many samples: early on, max_bad_fraction × 100 bad
#: samples are tolerated (1 at the default 0.01)
MIN_SAMPLES = 100
#: the key of a collated batch that lists its skipped samples (removed before the model sees it)
SKIPPED_KEY = "skipped_samples"


def check_policy(on_bad_sample: str, max_bad_fraction: float) -> tuple[str, float]:
    """The checked settings (ConfigError naming the key otherwise)."""
    if on_bad_sample not in POLICIES:
        raise ConfigError(f"data.on_bad_sample={on_bad_sample!r}; accepted: {', '.join(POLICIES)}")
    try:
        fraction = float(max_bad_fraction)
    except (TypeError, ValueError):
        fraction = math.nan
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(
            f"data.max_bad_fraction={max_bad_fraction!r}: expected a number in [0, 1] (the "
            "largest share of bad samples tolerated under data.on_bad_sample=skip)"
        )
    return on_bad_sample, fraction


def check_finite(item: Mapping[str, Any]) -> None:
    """A DataError if the image or a present label of a sample holds NaN or inf."""
    image = item["image"]
    if torch.is_floating_point(image) and not bool(torch.isfinite(image).all()):
        raise DataError("the image holds NaN or inf")
    masks = item.get("mask", {})
    for key, value in item["targets"].items():
        if not bool(masks.get(key, True)):
            continue  # a missing label's placeholder is never read
        value = torch.as_tensor(value)
        if torch.is_floating_point(value) and not bool(torch.isfinite(value).all()):
            raise DataError(f"label {key!r} holds NaN or inf")


class BadSampleCount:
    """Per split: samples read and samples skipped; warns about each skipped one and stops the
    run (``DataError``) when they exceed ``max_bad_fraction``."""

    def __init__(self, max_bad_fraction: float) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.read: dict[str, int] = {}
        self.skipped: dict[str, int] = {}

    def update(self, split: str, kept: int, skipped: list[tuple[str, int, str]]) -> None:
        """Count a batch of ``kept`` samples and the ``skipped`` ones (source, index, cause)."""
        for source, index, cause in skipped:
            log.warning("skipped %s sample %d of source %r: %s", split, index, source, cause)
        read = self.read.get(split, 0) + kept + len(skipped)
        bad = self.skipped.get(split, 0) + len(skipped)
        self.read[split], self.skipped[split] = read, bad
        if bad > self.max_bad_fraction * max(read, MIN_SAMPLES):
            raise DataError(
                f"{bad} of the {read} {split} samples read so far are bad ({bad / read:.1%}), "
                f"more than data.max_bad_fraction={self.max_bad_fraction} allows (over at least "
                f"{MIN_SAMPLES} samples): repair or remove the files named in the warnings above, "
                "or raise data.max_bad_fraction"
            )

    def state_dict(self) -> dict[str, int]:
        """The training split's counts (checkpointed: a resumed run keeps counting)."""
        return {"read": self.read.get("train", 0), "skipped": self.skipped.get("train", 0)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.read["train"] = int(state.get("read", 0))
        self.skipped["train"] = int(state.get("skipped", 0))
