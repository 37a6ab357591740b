"""One problem found by the pre-flight check, and the single error that reports them all.

Every check appends :class:`Problem` records instead of raising, so a run with three mistakes
learns about all three at once (not one per attempt). :func:`raise_problems` turns the list into
one :class:`~lightning_mtl.errors.DataError` (when a file or a label on disk is at fault) or
:class:`~lightning_mtl.errors.ConfigError` (the config alone is wrong).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_mtl.errors import ConfigError, DataError

# More lines than this of one error stop being read; the rest is counted.
MAX_LISTED = 30


@dataclass(frozen=True)
class Problem:
    """``where`` (a config key, a file or a sample) holds ``value``; ``expected`` says what fits.

    ``data``: the data on disk is at fault (a DataError), not the config. ``sample``: one bad
    sample (unreadable, or NaN / inf in a label), which ``data.on_bad_sample=skip`` leaves out
    during training, so the pre-flight only warns about it then.
    """

    where: str
    value: str
    expected: str
    data: bool = False
    sample: bool = False

    def __str__(self) -> str:
        return f"{self.where}: {self.value}; expected {self.expected}"


def problem_from_error(
    where: str, error: BaseException, expected: str, sample: bool = False
) -> Problem:
    """A problem from an exception a check or a data source raised (its message is the value);
    ``sample``: it came from reading one sample."""
    data = isinstance(error, DataError) or not isinstance(error, ConfigError)
    message = " ".join(str(error).split()) or type(error).__name__
    return Problem(where, message, expected, data=data, sample=sample)


def format_problems(problems: Sequence[Problem]) -> str:
    """The problems as one numbered message, at most :data:`MAX_LISTED` of them listed."""
    count = len(problems)
    lines = [f"pre-flight check: {count} problem{'s' if count > 1 else ''} found before training"]
    lines += [f"  {i}. {p}" for i, p in enumerate(problems[:MAX_LISTED], start=1)]
    if count > MAX_LISTED:
        lines.append(f"  ... and {count - MAX_LISTED} more")
    if any(p.data for p in problems):
        lines.append("(preflight.mode=exhaustive reads every sample; skip leaves the data out)")
    return "\n".join(lines)


def raise_problems(problems: Sequence[Problem]) -> None:
    """Raise one error listing every problem (none: return). A DataError when any problem lies
    in the data (a DataError is a ConfigError too), else a ConfigError."""
    if not problems:
        return
    error = DataError if any(p.data for p in problems) else ConfigError
    raise error(format_problems(problems))
