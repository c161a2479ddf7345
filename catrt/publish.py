"""Publishing a folder whole: built beside its final name, then swapped into place in one step.

`staged_folder(final)` hands out a temporary folder beside `final`; when the block completes the two
are exchanged atomically (Linux `renameat2(RENAME_EXCHANGE)`; two renames where the filesystem or
platform lacks it), so at every instant `final` is either the earlier folder or the new one, even if
the process is killed. A block that fails removes its folder. A folder left by a killed build (SIGKILL)
holds no lock any more and is removed by the next build of the same name; one a live build holds is
left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """A temporary folder beside `final`, put in its place when the block completes.

    On an exception the temporary folder is removed and `final` is left as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(final)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(final), dir=final.parent))
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would carry over to the published folder
    lock = _lock(staging)
    try:
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _put_in_place(staging, final)
    finally:
        os.close(lock)


def remove_abandoned(final: Path) -> None:
    """Remove the temporary folders of earlier builds of `final` that no live process holds."""
    for path in final.parent.glob(f"{_staging_prefix(final)}*"):
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live build holds it
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(descriptor)


def _staging_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _lock(folder: Path) -> int:
    """An exclusive lock on `folder`, held while the descriptor is open (the kernel drops it when the process dies)."""
    descriptor = os.open(folder, os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    return descriptor


def _put_in_place(staging: Path, final: Path) -> None:
    """`staging` becomes `final`; an earlier `final` is swapped out to `staging` in the same step, then removed."""
    if not final.exists():
        staging.rename(final)
        return
    if not _exchange(staging, final):
        previous = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")  # never removed unattended
        final.rename(previous)
        staging.rename(final)
        staging = previous
    shutil.rmtree(staging, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with Linux renameat2; False where it is not available."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    return done == 0
