"""A library's logger held at ERROR for one block: notices a build triggers itself are noise in its output."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def errors_only(logger_name: str) -> Iterator[None]:
    """Only errors from `logger_name` (and the loggers under it) inside the block; its level is put back after."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
