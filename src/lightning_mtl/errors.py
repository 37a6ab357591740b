"""The template's own errors: its messages name the key, file or value and what was expected,
so the entry points print them without a trace and exit 1."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the key, the value and what was expected."""


class TrainingError(RuntimeError):
    """Training stopped on purpose (e.g. NaN losses many steps in a row). The message names what
    happened, where, and the setting that governs it."""


class DataError(ConfigError):
    """Data on disk is missing or malformed. The message names the file, the problem, the layout
    that was expected and where to get the data."""


class ExportError(RuntimeError):
    """An exported model does not reproduce the checkpoint's outputs, or cannot be run. The
    message names the format, the output and the difference against the tolerance."""


def config_error_in(error: BaseException) -> BaseException | None:
    """The template's own error (a ConfigError, DataError, TrainingError or ExportError) that ``error`` is or
    wraps (Hydra wraps what a ``_target_`` raises in an InstantiationException); None if there
    is none."""
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, ConfigError | TrainingError | ExportError):
            return current
        current = current.__cause__
    return None


def report_error(error: BaseException) -> None:
    """A template error for a user: its message on stderr and in the run's log file, no trace
    (the message names the key or file and what was expected)."""
    message = f"{type(error).__name__}: {error}"
    print(message, file=sys.stderr)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
