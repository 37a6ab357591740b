"""One exception type for every configuration mistake the template can detect before training."""


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the key, the value and what was expected."""
