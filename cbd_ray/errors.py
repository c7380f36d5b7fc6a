"""Error types shared by the project. All derive from ValueError so callers and the CLI
can treat bad input uniformly; the message always names the bad value and what is allowed."""
from __future__ import annotations


class CBDError(ValueError):
    """Bad input detected before any expensive work."""


class ConfigError(CBDError):
    """A config value is unknown or impossible; the message names its dotted path."""


class CheckpointError(CBDError):
    """A checkpoint directory is missing files, corrupt or of an unsupported kind."""


class IncompatibleModelsError(CBDError):
    """Two models cannot be combined (different families or vocabularies)."""
