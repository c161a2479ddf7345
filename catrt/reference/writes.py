"""A file the reference training or the probe writes that the disk refused (full, over quota, failing), as one line
naming the file and the OS's reason, not a traceback (torch's RuntimeError, safetensors' SafetensorError)."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

from catrt.errors import CatrtError, echo_path

#: The OS's reasons for a refused write that freeing space fixes (a full disk, a quota, a file-size limit).
SPACE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class WriteError(CatrtError, OSError):
    """A file training writes that the disk refused (full, over quota, failing): names the file and the OS's reason.
    An OSError still, as the failed write was to callers of `save_checkpoint`, `save_weights` and `publish`."""


@contextlib.contextmanager
def written(
    path: Path, fix: str = "free some space or train into another --out", elsewhere: str = "train into another --out"
) -> Iterator[None]:
    """A failed write of `path` in the block (a full disk, a quota, a failing device) as one WriteError naming the file
    and the OS's reason, not a traceback; an atomic write inside it has left the earlier file as it was. `fix` ends the
    line where space is what ran out (`SPACE_ERRORS`), `elsewhere` where it is not (a folder made read-only, another
    user's file put there since the up-front check): "free some space" was no fix for those."""
    try:
        yield
    except Exception as error:
        cause = _os_error(error)
        if cause is None:
            raise
        advice = fix if cause.errno in SPACE_ERRORS else elsewhere
        raise WriteError(f"could not write {echo_path(path)} ({cause.strerror or type(cause).__name__}); the earlier "
                         f"{path.name}, if any, is left as it was: {advice}", field="out", value=str(path)) from None


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError `error` is or arose from: torch's writer, failing on a full disk, closes its archive by writing
    again, and that write's RuntimeError ("unexpected pos ...") is raised with the OSError as its context."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
