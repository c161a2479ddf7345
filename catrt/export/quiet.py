"""A library's logger held at ERROR for one block: notices a build triggers itself are noise in its output."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_held: dict[str, tuple[int, int]] = {}  # logger name -> (blocks inside, the level before the first)


@contextlib.contextmanager
def errors_only(logger_name: str) -> Iterator[None]:
    """Only errors from `logger_name` (and the loggers under it) inside the block; its level is put back after.

    Counted per logger: builds in two threads of one process overlap their blocks, and the second saving the first's
    ERROR as "the level before" would leave the logger at ERROR once both ended. The last block out restores."""
    logger = logging.getLogger(logger_name)
    with _lock:
        count, level = _held.get(logger_name, (0, logger.level))
        _held[logger_name] = (count + 1, level)
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        with _lock:
            count, level = _held.pop(logger_name)
            if count > 1:
                _held[logger_name] = (count - 1, level)
            else:
                logger.setLevel(level)
