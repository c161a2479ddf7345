"""Every exception catrt raises on purpose.

Each carries the field or file it is about, so callers (the CLI, the server) can report it
without parsing messages.
"""

from __future__ import annotations

#: Longest user value an error message echoes whole. A longer one (a 10,000-character prompt pasted as a
#: flag, a huge list) would bury the message; it is echoed as its start and end around an ellipsis.
ECHO_LIMIT = 80
#: The same for a path (or a model that may be a folder): the user must find that file, so the paths people
#: use are echoed whole, and only a runaway one (a pasted text, a 10,000-character mistake) is shortened.
PATH_ECHO_LIMIT = 240


def shorten(text: str, limit: int = ECHO_LIMIT, length: int | None = None) -> str:
    """`text` whole if at most `limit` characters, else its start and end around "…" and its `length` (default:
    its own), in `limit` characters: the one rule for every user value a catrt error message echoes."""
    if len(text) <= limit:
        return text
    note = f" ({len(text) if length is None else length} characters)"
    kept = max(limit - len(note) - 1, 2)
    head = kept - kept // 3  # the start says most about a mistake; the end keeps a path's file name or a closing quote
    return f"{text[:head]}…{text[len(text) - (kept - head):]}{note}"


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """A user's value as an error message quotes it: its repr, shortened by `shorten` (a string's length is its own,
    without the quotes)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit printing limit
        return f"<{type(value).__name__} too large to print>"
    return shorten(text, limit, len(value) if isinstance(value, str) else None)


def echo_path(path: object) -> str:
    """A path as an error message prints it (unquoted), shortened by `shorten` past PATH_ECHO_LIMIT."""
    return shorten(str(path), PATH_ECHO_LIMIT)


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


class BuildError(CatrtError):
    """An engine build failed: an export, an engine compiler, or the built engine's accuracy check."""


class EngineMismatchError(CatrtError):
    """A built engine does not fit this machine or installation (catrt or backend version, device)."""


class CorruptBundleError(CatrtError):
    """A file of a built engine is missing or does not match the digest its manifest recorded."""


class QueueFullError(CatrtError):
    """The server's request queue is full; the client may retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: int, field: str | None = None, value: object = None) -> None:
        super().__init__(message, field=field, value=value)
        self.retry_after = retry_after


class RequestTimeoutError(CatrtError):
    """A request was not answered within the server's timeout (queue wait plus generation)."""


class ServiceUnavailableError(CatrtError):
    """The server cannot take the request: still loading, shutting down, or its worker has died."""


class GenerationError(CatrtError):
    """A generation failed inside the model; only the requests of that generation see it."""


class EngineRuntimeError(CatrtError):
    """A loaded engine refused a call: a context it could not create, a tensor it could not bind, a failed enqueue."""
