"""peftlab's one error type for bad input, below every module that raises or checks it."""


class ConfigError(ValueError):
    """A bad config value or input file; the message, one line, names the key or file and the fix."""
