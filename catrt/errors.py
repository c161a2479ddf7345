"""Every exception catrt raises on purpose.

Each carries the field or file it is about, so callers (the CLI, the server) can report it
without parsing messages.
"""

from __future__ import annotations


class CatrtError(Exception):
    """Base class: a problem catrt detected and can explain."""

    def __init__(self, message: str, *, field: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class ConfigError(CatrtError, ValueError):
    """A configuration or request value is out of range or inconsistent."""


class UnsupportedModelError(CatrtError, TypeError):
    """A pipeline class or transformer layout that catrt has no adapter for."""


class UnknownModelError(CatrtError, ValueError):
    """A model name that is neither a known name nor an existing folder."""
