"""One exception type for every configuration mistake the template can detect before training."""


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the key, the value and what was expected."""


class DataError(ConfigError):
    """Data on disk is missing or malformed. The message names the file, the problem, the layout
    that was expected and where to get the data."""
