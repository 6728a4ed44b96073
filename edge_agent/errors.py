"""Exceptions with messages an operator can act on: each names the file, key path or value at fault."""

from __future__ import annotations


class EdgeAsdError(Exception):
    """Base class for errors the CLI reports as one clear line (no traceback)."""


class ModelMetadataError(EdgeAsdError):
    """An ONNX model lacks or has malformed edge-asd metadata."""


class ModelMismatchError(EdgeAsdError):
    """A memory bank was built with a different model than the one it is used with."""


class BankError(EdgeAsdError):
    """A memory bank directory is missing, truncated, corrupt or inconsistent."""


class AudioError(EdgeAsdError):
    """An audio file or stream cannot be read or has an unsupported format."""


SHOWN_CHARS = 60  # the most of a refused value that an error (and so an answer or a log line) repeats


def shorten(value: object) -> object:
    """A value fit to repeat in an error: short scalars as they are, anything long cut short."""
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**18 else f"<integer of {len(str(abs(value)))} digits>"
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= SHOWN_CHARS:
        return value if isinstance(value, (str, list, tuple, dict)) else text
    return text[: SHOWN_CHARS - 3] + "..."


class ConfigError(EdgeAsdError):
    """A configuration value is invalid: where (`source` file, key `path`), what (`message`), and the `value`
(shortened: an error never repeats a whole hostile payload).

    A nested config validates with paths relative to itself; whoever placed it puts its location in
    front with `under` (and names the file with `in_source`), so nothing is re-parsed from the text.
    """

    def __init__(self, path: str, message: str, value: object = None, source: str | None = None):
        self.path = path
        self.message = message
        self.value = shorten(value)
        self.source = source
        super().__init__(path, message, value, source)

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        shown = f" (got {self.value!r})" if self.value is not None else ""
        return f"{where}{self.path}: {self.message}{shown}"

    def under(self, prefix: str) -> ConfigError:
        """The same error for a config that sits at key path `prefix`."""
        if not prefix:
            return self
        joined = f"{prefix}{self.path}" if self.path.startswith("[") else f"{prefix}.{self.path}"
        return ConfigError(joined, self.message, self.value, self.source)

    def relocated(self, section: str, prefix: str) -> ConfigError:
        """The same error for config section `section` (the first part of `path`) found at `prefix` instead."""
        if self.path == section or self.path.startswith((f"{section}.", f"{section}[")):
            return ConfigError(prefix + self.path[len(section):], self.message, self.value, self.source)
        return self.under(prefix)

    def in_source(self, source: str) -> ConfigError:
        """The same error, naming the file (or message) the config came from."""
        return ConfigError(self.path, self.message, self.value, source)


class DatasetError(EdgeAsdError):
    """A dataset directory does not follow the DCASE layout."""
