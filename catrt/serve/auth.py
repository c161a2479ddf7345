"""The optional API key: where it comes from and how a request's `Authorization` header is checked.

The key is read from a file (so it never shows in `ps` or shell history) or from the environment,
and compared in constant time, so the time a wrong key takes to refuse says nothing about the key.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping

from catrt.errors import ConfigError
from catrt.key_files import read_key_file, read_key_variable

API_KEY_ENV = "CATRT_API_KEY"


def load_api_key(path: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The key in `path` (surrounding whitespace dropped), else `$CATRT_API_KEY`, else None (no auth).

    An explicit file wins over the environment; an unreadable or empty file, or the variable set but
    blank, is refused, never taken to mean "no key".
    """
    if path is not None:
        data = read_key_file(path, "api_key_file", "API key file")  # bounded: no hang on a FIFO or /dev/zero
        try:
            key = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"the API key file {path} is not UTF-8 text; write the key in ASCII", field="api_key_file") from None
        return _sendable(key, f"the API key file {path}", "api_key_file")
    key = read_key_variable(environ, API_KEY_ENV, "api_key", "the key clients send", "serve without a key")
    return None if key is None else _sendable(key, f"${API_KEY_ENV}", "api_key")


def _sendable(key: str, source: str, field: str) -> str:
    """A key a client can send: printable ASCII, as HTTP clients write headers (a line break inside never arrives)."""
    for index, char in enumerate(key):
        if not (char.isascii() and char.isprintable()):
            raise ConfigError(
                f"{source} holds {ascii(char)} at character {index} of the key; an Authorization header carries "
                "printable ASCII only: write the key on one line, in ASCII",
                field=field,
            )
    return key


class BearerCheck:
    """Whether an `Authorization` header value carries the key (`Bearer <key>`, scheme case-insensitive,
    spaces or tabs around and between them)."""

    def __init__(self, key: str) -> None:
        self._key = key.encode("utf-8")

    def __call__(self, header: bytes | None) -> bool:
        if header is None:
            return False
        parts = header.split(None, 1)
        if len(parts) != 2 or parts[0].lower() != b"bearer":
            return False
        return hmac.compare_digest(parts[1].strip(), self._key)
