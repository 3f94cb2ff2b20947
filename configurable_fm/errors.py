"""The one base class of errors a user can fix by changing an input, shared by every layer.

    class CheckpointError(UserError, ValueError): ...

A `UserError` names the problem (the file, tensor, key or path) in its message, so the command-line scripts
print that message alone, without a Python traceback, and exit non-zero (configurable_fm/cli); any other
exception is a bug and keeps its traceback. Subclasses also derive from the builtin type that fits
(ValueError, FileNotFoundError, FileExistsError, ImportError), so `except ValueError` keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input (a file, config key, model reference, tensor shape): the message says what and where."""


class OutputExists(UserError, FileExistsError):
    """An output path already exists and overwriting was not asked for."""


class OutputNotWritable(UserError, OSError):
    """An output path that cannot be created (a parent that is a file, a read-only location)."""


class SourceNotFound(UserError, FileNotFoundError):
    """A model, data or config source that does not exist or cannot be read as what it claims to be."""


class ConfigError(UserError, ValueError):
    """An experiment, stage or operation config holds a value that cannot be used (the message names the key)."""
