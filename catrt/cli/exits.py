"""How a command's end reaches the user: a CatrtError as one escaped stderr line, SIGTERM unwound as Ctrl-C is."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from collections.abc import Iterator
from typing import Any

from catrt.errors import ConfigError  # stdlib only


def one_line(error: BaseException) -> str:
    """An error's text as the one stderr line a command ends with: whitespace runs joined, control characters escaped."""
    return escaped(" ".join(str(error).split()))


def flag_prefix(error: BaseException, argv: list[str]) -> str:
    """`argument --alpha: ` when `error` is a config field's range check (`CATConfig.alpha must be in (0, 1], got 2.0`)
    and the user gave that field's flag (or a prefix argparse accepted): the line then names the flag to fix, as
    argparse's own errors do. Empty otherwise (e.g. `--steps 4` failing the default t0's check names no flag of t0),
    and for any error but a ConfigError: a bundle's manifest holding an alpha out of range is the bundle's fault
    (CorruptBundleError), never the `--alpha` the user gave beside `--engines`."""
    if not isinstance(error, ConfigError):
        return ""
    match = re.search(r"\b[A-Z]\w*Config\.(\w+) must be ", str(error))
    if not match:
        return ""
    flag = "--" + match.group(1).replace("_", "-")
    given = (word.partition("=")[0] for word in argv if word.startswith("--") and len(word) > 2)
    return f"argument {flag}: " if any(flag.startswith(word) for word in given) else ""


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
