"""Exceptions with messages an operator can act on: each names the file, key path or value at fault."""


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


class ConfigError(EdgeAsdError):
    """A configuration value is invalid; the message names the key path and the value."""

    def __init__(self, path: str, message: str, value: object = None, source: str | None = None):
        self.path = path
        self.value = value
        self.source = source
        where = f"{source}: " if source else ""
        shown = f" (got {value!r})" if value is not None else ""
        super().__init__(f"{where}{path}: {message}{shown}")


class DatasetError(EdgeAsdError):
    """A dataset directory does not follow the DCASE layout."""
