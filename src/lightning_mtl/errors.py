"""The template's own errors: its messages name the key, file or value and what was expected,
so the entry points print them without a trace and exit 1."""


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the key, the value and what was expected."""


class TrainingError(RuntimeError):
    """Training stopped on purpose (e.g. NaN losses many steps in a row). The message names what
    happened, where, and the setting that governs it."""


class DataError(ConfigError):
    """Data on disk is missing or malformed. The message names the file, the problem, the layout
    that was expected and where to get the data."""
