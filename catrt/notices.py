"""Log records a catrt program drops from its own process: notices that say nothing actionable to its user.

The library never changes global logging; the programs call `quiet_known_notices` first thing: the CLI in
`main`, and each Ray Serve model replica of `catrt serve --ray` (a process of its own) as it starts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# diffusers' warning when a hub lookup fails before it tries the local cache: while catrt loads a published
# model it is dropped, because a failed load ends in one line of its own that says what to do.
HUB_NOTICE: tuple[str, str] = ("diffusers.pipelines.pipeline_utils", "Couldn't connect to the Hub")

# transformers notes on import that torchvision is missing and it falls back to the PIL image processors,
# which catrt never uses.
QUIET_LOG_RECORDS: dict[str, str] = {"transformers.utils.import_utils": "requires torchvision (not installed)"}


def quiet_known_notices() -> None:
    """Drop the import-time notices listed in QUIET_LOG_RECORDS, for this process only.

    Set before anything heavy is imported so they never print; idempotent.
    """
    for name, text in QUIET_LOG_RECORDS.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.text == text for f in target.filters):
            target.addFilter(DropMessage(text))


class DropMessage(logging.Filter):
    """A logging filter that drops records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def hub_notices_dropped() -> Iterator[None]:
    """Load without diffusers' "Couldn't connect to the Hub" notice: a failed download of a published model is
    already one catrt error saying what to do (`load_pipeline`, through `catrt.hub_errors`). Process-wide while the
    block runs (a model may load on another thread)."""
    notices = logging.getLogger(HUB_NOTICE[0])
    drop = DropMessage(HUB_NOTICE[1])
    notices.addFilter(drop)
    try:
        yield
    finally:
        notices.removeFilter(drop)
