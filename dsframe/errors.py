"""Errors that end a run with one clear line instead of a traceback."""
from __future__ import annotations


class DsframeError(Exception):
    """Bad input: a config value, a file, a checkpoint, a plugin. The CLI prints it and exits 1."""


class ConfigError(DsframeError):
    """A config value that is not allowed. Names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")


class CheckpointError(DsframeError):
    """A checkpoint or model artifact that is missing, corrupt or of another architecture."""
