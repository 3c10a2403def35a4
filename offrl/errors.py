"""The one error type for user mistakes.

Anything a user can get wrong (a bad YAML key, a missing file, a corrupt dataset, an unknown env id,
NaN losses) raises :class:`OffrlError` with a one-line message that names the problem. The CLI turns
it into that line on stderr and exit status 2, with no traceback.
"""


class OffrlError(Exception):
    """A user-facing error: the message is one line that names the problem."""


class ConfigError(OffrlError):
    """A configuration mistake; the message starts with the offending key path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"config key '{path}': {message}" if path else f"config: {message}")
