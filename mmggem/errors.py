"""Errors the user can fix, told apart from bugs.

The command line prints a :class:`UserError` as one line that says what to
change and exits with its ``exit_code``; any other exception is a bug or a
failure of the environment, and Python's traceback is kept for it. So a wrong
config key, a missing file or unusable data reads as a message, while a
``ValueError`` from deep inside torch still shows where it came from.

Each class also derives from the built-in exception it refines (``ValueError``,
``FileNotFoundError``, ``FileExistsError``), so code that catches those keeps
working.
"""
from __future__ import annotations


class UserError(ValueError):
    """Input the user can fix: data that cannot be used, weights that do not fit, a bad file."""

    exit_code = 1


class UsageError(UserError):
    """A command-line option or config value that cannot be used; raised before any work is done."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration key, type or value that cannot be used (the CLI prints it as one line, exit 2)."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a named folder must hold) does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """An output the user named is already there and would be overwritten."""
