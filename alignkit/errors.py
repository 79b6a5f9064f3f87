"""User-facing errors: what was wrong, where, and what to do.

Every error a user can cause is raised as :class:`AlignkitError`; the command line prints it
without a traceback and exits non-zero. Anything else escaping is a bug in alignkit.
"""

from __future__ import annotations


class AlignkitError(Exception):
    """An error caused by the user's input, with a hint on how to fix it."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        parts = []
        if self.where:
            parts.append(f"{self.where}: {self.message}")
        else:
            parts.append(self.message)
        if self.hint:
            parts.append(f"  -> {self.hint}")
        return "\n".join(parts)


class ConfigError(AlignkitError):
    """A configuration key or value is wrong."""


class DataError(AlignkitError):
    """A data file cannot be read or does not fit the method."""


class ModelError(AlignkitError):
    """A model cannot be found or loaded."""
