"""Publishing a folder whole: built beside its final name, then swapped into place in one step.

`staged_folder(final)` hands out a temporary folder beside `final`; when the block completes the two
are exchanged atomically (Linux `renameat2(RENAME_EXCHANGE)`; two renames where the filesystem or
platform lacks it), so at every instant `final` is either the earlier folder or the new one, even if
the process is killed. A block that fails removes its folder. A folder left by a killed build (SIGKILL)
holds no lock any more and is removed by the next build of the same name; one a live build holds is
left alone. Two builds of one name finishing together both publish, the later replacing the earlier in one
step as any rebuild does. Something at `final` that is not a folder (a user's file) is refused, never moved; a link
to a folder there is published through (the new folder goes where it points, the link stays). The earlier folder is
removed even where it was made read-only (its write bits are given back first).

Where there is no `renameat2` exchange (Windows, macOS, NFS and other filesystems without RENAME_EXCHANGE) a publish
is two renames: the earlier folder, locked first, moved aside to `.<name>.old-*`, the new one put in place, then the
earlier removed; so for an instant `final` is missing, and a build killed while it removed the earlier folder (a
whole bundle) leaves it to the next build of the name, which removes it as it removes a killed build's staging
folder (it was left there for ever). On Windows (no `fcntl`) a killed build's temporary folder is never removed
unattended: without a lock no build can tell it from a live one's.

The lock is what tells a killed build's folder from a live one's: over NFS it reaches other hosts where the mount
has locks (NFSv4, NFSv3 with lockd); on a mount without them across hosts (`nolock`, `local_lock`) a build of one
name on two hosts at once can take the other's folder for a killed build's, and that build then fails (nothing
half-published: its folder is gone before the swap).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: publishing works without the locks (see above)
    fcntl = None

from catrt import atomic_files
from catrt.checks import writable_folder
from catrt.errors import BuildError, ConfigError, echo_path

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: Errors of a write into the staged folder that only the disk explains (full, over quota, read-only, failing): one line, not a traceback.
_WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})
#: What flock answers on a filesystem without locks (NFS without its lock daemon, some FUSE mounts): a build there was
#: a traceback before its first stage; it publishes unlocked, as where there is no fcntl.
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})
#: How long a publish waits for its folder's lock before it says it is waiting (another publish's swap takes less).
_QUIET_WAIT_S = 2.0
#: How often a publish retries when another publish of the same name changes `final` under it.
_ATTEMPTS = 5


@contextlib.contextmanager
def staged_folder(final: Path, check: Callable[[], None] | None = None) -> Iterator[Path]:
    """A temporary folder beside `final`, put in its place when the block completes.

    On an exception the temporary folder is removed and `final` is left as it was; a write the disk refused
    (full, read-only) is a BuildError naming `final` and the OS's reason, and so is `final`'s folder removed before
    the swap (`_removed`). `check` (whether what is at `final` now may
    be replaced; it raises if not) runs once the block completes, just before the swap and with the folder beside it
    locked for both: a check made only before minutes of work misses what another publish put there meanwhile.
    """
    refuse_non_folder(final, "move it away or publish under another name")
    refuse_unreplaceable(final, "publish under another name, or have its owner remove it")
    final = _link_target(final)
    writable_folder(final.parent, echo_path(final.parent), "pick another place", field="path")
    remove_abandoned(final.parent, _moved_aside_prefix(final))
    staging, lock = scratch_folder(final.parent, _staging_prefix(final))
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would carry over to the published folder
    try:
        try:
            try:
                yield staging
            except OSError as error:
                if not os.path.lexists(staging):
                    raise _removed(staging, final) from None
                if error.errno not in _WRITE_FAILURES:
                    raise
                raise BuildError(f"could not write the files of {echo_path(final)} ({error.strerror}); nothing was published "
                                 "there (an earlier folder is left as it was): free some space or pick another place",
                                 field="path", value=str(final)) from None
            # One step against another publish beside it (a second build of the name, in this process or another):
            # both checked before either swapped, and both published, the later over a bundle its check never saw.
            try:
                with held(final.parent):
                    if check is not None:
                        check()
                    _put_in_place(staging, final)
            except FileNotFoundError:  # the folder, gone, could not be opened to lock
                if os.path.lexists(staging):
                    raise
                raise _removed(staging, final) from None
        except BaseException:
            remove_tree(staging)
            raise
    finally:
        if lock is not None:
            os.close(lock)


def _removed(staging: Path, final: Path) -> BuildError:
    """The one line for a folder removed while a build ran in it (`rm -rf engines` in another terminal): its staged
    files went with it, and the build failed at its last step with a FileNotFoundError traceback."""
    gone = staging if os.path.isdir(final.parent) else final.parent
    return BuildError(f"{echo_path(gone)} was removed while {echo_path(final)} was built in it; nothing was published "
                      "there: build again (it makes the folder again), or into a folder nothing removes",
                      field="path", value=str(final))


def _link_target(final: Path) -> Path:
    """Where a link at `final` points (`engines/<name> -> /fast-disk/<name>`): the new folder is published there, beside
    the earlier one, and the link is kept. Swapped itself, the link became a hidden `.tmp-` link never removed, and the
    new folder landed on the link's disk."""
    return Path(os.path.realpath(final)) if os.path.islink(final) else final


def remove_tree(folder: Path) -> None:
    """Remove `folder`, one this process published or staged, whatever its modes (an earlier bundle made read-only,
    `chmod -R a-w`, to protect it: rmtree could not empty it and left it as a hidden `.tmp-` folder unannounced, a whole
    bundle's disk space each time); what still cannot be removed is logged, naming it."""
    if os.path.islink(folder):
        with contextlib.suppress(OSError):
            os.unlink(folder)
        return
    shutil.rmtree(folder, ignore_errors=True)
    if not os.path.lexists(folder):
        return
    for path, folders, _ in os.walk(folder):  # this user owns what it built: give its folders back their write bit
        for name in (path, *(os.path.join(path, sub) for sub in folders)):
            if os.path.islink(name):
                continue  # a link's target is not this folder's to change
            with contextlib.suppress(OSError):
                os.chmod(name, stat.S_IMODE(os.lstat(name).st_mode) | stat.S_IRWXU)
    shutil.rmtree(folder, ignore_errors=True)
    if os.path.lexists(folder):
        logger.warning("could not remove %s (an earlier folder of %s); remove it yourself", folder, folder.parent)


def refuse_non_folder(final: Path, fix: str, field: str = "path") -> None:
    """Refuse a `final` that exists but is not a folder: publishing would swap a user's file away."""
    if os.path.lexists(final) and not final.is_dir():
        kind = "a file" if final.is_file() else "not a folder"
        raise ConfigError(f"{echo_path(final)} is {kind}, so nothing is published there (it is left as it is); {fix}",
                          field=field, value=str(final))


def refuse_unreplaceable(final: Path, fix: str, field: str = "path") -> None:
    """Refuse a folder at `final` (or where a link there points) that this user may not swap away: another user's in a
    sticky folder (`--out /tmp`), which only its owner may rename or remove, so the swap failed after the whole build.
    Checked by `atomic_files.replace_refusal`, the check every writer of a user's path runs."""
    try:
        refusal = atomic_files.replace_refusal(final, fix)
    except OSError:
        return  # nothing there, and its parent takes no new file: `writable_folder` says so, naming the parent
    if refusal is not None:
        raise ConfigError(f"{echo_path(final)} cannot be replaced: {refusal}", field=field, value=str(final))


def scratch_folder(parent: Path, prefix: str) -> tuple[Path, int | None]:
    """A new temporary folder `parent/<prefix>*`, locked by this process, and the lock's descriptor to close when done.

    Folders of the same prefix that an earlier, killed process left (no live lock) are removed first, so a SIGKILL
    never leaves them to pile up.
    """
    with held(parent):  # another process's remove_abandoned cannot take the new folder before it is locked
        remove_abandoned(parent, prefix)
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        return folder, _lock(folder)


def remove_abandoned(parent: Path, prefix: str) -> None:
    """Remove the folders `parent/<prefix>*` that no live process holds (none without locks: see above)."""
    if fcntl is None:
        return
    try:  # not a glob: a name's own `[`, `*`, `?` (a link's target, `models [old]`) made it match other names or none
        names = sorted(name for name in os.listdir(parent) if name.startswith(prefix))
    except OSError:
        return  # an unreadable folder: nothing to find, as the glob found nothing
    for path in (parent / name for name in names):
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live build holds it
        else:
            remove_tree(path)
        finally:
            os.close(descriptor)


def _staging_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _moved_aside_prefix(final: Path) -> str:
    """The hidden name's start of an earlier folder moved aside by a publish of two renames (as long as a staging one's)."""
    return f".{final.name}.old-"


#: The bytes a staging folder's name adds to its bundle's (`.<name>.tmp-` and mkdtemp's 8 random characters): a bundle
#: name longer than the filesystem's limit less these cannot be staged.
STAGING_OVERHEAD = len(_staging_prefix(Path("x"))) - len("x") + 8


@contextlib.contextmanager
def held(folder: Path) -> Iterator[None]:
    """`folder` locked for the block (a flock on its descriptor, released on exit or when the process dies): publishes
    beside it, and `catrt compare` runs moving their results into it, take turns.

    A folder this user may write in but not read cannot be opened to lock: no publish can hold it then. Where another
    process holds it for over 2 s, a line says so before the wait: any user who may read a folder (`/tmp`, a shared `engines/`)
    may lock it, and the build or compare waited there without a word, at its last step.
    """
    try:
        descriptor = _lock(folder, waiting=True)
    except PermissionError:
        descriptor = None
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)


def _lock(folder: Path, waiting: bool = False) -> int | None:
    """An exclusive lock on `folder`, held while the descriptor is open (the kernel drops it when the process dies);
    None without `fcntl` (Windows, where a folder cannot be opened, and an open one could not be renamed). `waiting`:
    say so (a warning) where another holds it past `_QUIET_WAIT_S`, before waiting on for it."""
    if fcntl is None:
        return None
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        if waiting:
            if _taken_within(descriptor, _QUIET_WAIT_S):
                return descriptor
            logger.warning("waiting for the lock on %s: another catrt build is publishing there or a catrt compare "
                           "moving its results there, or another process holds it (lsof %s names it); this goes "
                           "on once it lets go", folder, folder)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
    except OSError as error:
        os.close(descriptor)
        if error.errno not in _NO_LOCKS:
            raise
        return None  # a filesystem without locks: publish as on Windows (an abandoned folder is never taken as dead)
    return descriptor


def _taken_within(descriptor: int, seconds: float) -> bool:
    """Whether the lock on `descriptor` was taken within `seconds`, tried every 50 ms: another build's swap beside this
    one lets go within that, and is waited for without a word."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _put_in_place(staging: Path, final: Path) -> None:
    """`staging` becomes `final`; an earlier `final` is swapped out to `staging` in the same step, then removed.

    Between looking at `final` and renaming, another publish of the name may put its folder there (the rename
    then fails) or swap it (the exchange then finds none): look again, and replace whatever is there now.
    """
    for _ in range(_ATTEMPTS):
        if not os.path.lexists(staging):  # removed (with its folder, say) since: the rename's ENOENT is no other build's
            raise _removed(staging, final)
        refuse_non_folder(final, "move it away and build again")
        try:
            if final.exists():
                if _swap(staging, final):
                    return
            else:
                os.rename(staging, final)
                return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise BuildError(f"could not put the new folder in place at {echo_path(final)} ({error.strerror}); nothing "
                                 "was published there", field="path", value=str(final)) from None
    raise BuildError(f"{echo_path(final)} kept changing while this one was put in place (other builds of the same name at "
                     "once?); nothing was published there: run it again", field="path", value=str(final))


def _swap(staging: Path, final: Path) -> bool:
    """Exchange `staging` and the existing folder `final`, then remove the earlier one; False if `final` went away."""
    swapped = _exchange(staging, final)
    if swapped is None:  # no renameat2 here: two renames, with an instant without `final`
        _replace_by_renames(staging, final)
        return True
    if swapped:
        remove_tree(staging)
    return swapped


def _replace_by_renames(staging: Path, final: Path) -> None:
    """Move the earlier `final` aside, put `staging` in its place and remove the earlier one. The earlier folder is
    locked before it takes its hidden name, so a build killed before it is removed leaves it to the next build's
    cleanup (`remove_abandoned`), never for ever, and no other build's cleanup takes it while this one may still put
    it back."""
    try:
        lock = _lock(final)
    except PermissionError:  # a folder this user may not read cannot be locked: moved aside unlocked, as before
        lock = None
    try:
        previous = final.with_name(f"{_moved_aside_prefix(final)}{uuid.uuid4().hex[:8]}")
        os.rename(final, previous)
        try:
            os.rename(staging, final)
        except BaseException:  # a refusal, or Ctrl-C / SIGTERM between the renames: nothing at the name otherwise
            os.rename(previous, final)  # the earlier folder back in place, not left hidden at .<name>.old-*
            raise
        remove_tree(previous)
    finally:
        if lock is not None:
            os.close(lock)


def _exchange(first: Path, second: Path) -> bool | None:
    """Swap two paths atomically with Linux renameat2: True, False if one is missing, None where it is not available."""
    if not sys.platform.startswith("linux"):  # ctypes.CDLL(None) is not even loadable on Windows
        return None
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return None
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.ENOENT:
        return False
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # a kernel or filesystem without the exchange
        return None
    raise OSError(code, os.strerror(code), str(second))
