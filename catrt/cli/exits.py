"""How a command's end reaches the user: a CatrtError as one escaped stderr line, SIGTERM unwound as Ctrl-C is."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


def one_line(error: BaseException) -> str:
    """An error's text as the one stderr line a command ends with: whitespace runs joined, control characters escaped."""
    return escaped(" ".join(str(error).split()))


def escaped(text: str) -> str:
    """`text` with its non-printable characters escaped (`\\x1b`): a manifest or file name is untrusted text,
    and a terminal escape sequence in it must not drive the user's terminal."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so that its cleanup runs as for Ctrl-C (staged builds and images are removed)."""


@contextlib.contextmanager
def sigterm_unwinds(command: str) -> Iterator[None]:
    """While a command other than `serve` (which drains on SIGTERM itself) runs, SIGTERM raises `Terminated`."""
    if command == "serve" or threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
