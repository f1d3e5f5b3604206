"""Errors a user can cause. Each message names the file, column or config key and what to do.

The CLI prints ``str(err)`` as one line and exits non-zero; anything else is a bug in tsssm.
"""

from __future__ import annotations


class TsssmError(Exception):
    """Base class of every error caused by user input (data, config, models)."""

    exit_code = 2


class DataError(TsssmError):
    """A data file is missing, unreadable, or fails validation."""


class ConfigError(TsssmError):
    """A config key, group or value is unknown or invalid."""


class ModelError(TsssmError):
    """A model or checkpoint cannot be loaded or used as asked."""


class NumericalError(TsssmError):
    """A computation produced non-finite values (e.g. a diverging likelihood)."""


class StorageError(TsssmError):
    """A tracking store, artifact store or output folder cannot be reached or written."""
