"""A file replaced whole: written to a temporary file beside it, flushed to disk, then renamed onto it.

Ctrl-C, SIGTERM, a full disk or a failing writer mid-write leaves the earlier file (or none) and no temporary file,
never a half-written one (`Path.write_text` truncates first). The temporary file is in the target's folder, so the
rename stays on one filesystem and is atomic; it is made as `open` makes a file (0o666 less the umask), not
`mkstemp`'s owner-only 0o600, and a file it replaces passes on its permission bits, so the file keeps the permissions
a plain write gave it (a report made owner-only stays so), and its owner and group where this user may set them. A link at the target is written through, as a plain write
writes: the file it points to is replaced, beside it (on its filesystem), and the link stays (not a link another user
made in a sticky folder such as /tmp, which a plain write does not follow there either: `target`); a device or FIFO there
(`/dev/null`) is written into, as a plain write writes, never replaced by a file. The temporary file's name
is cut to fit the filesystem's name limit, so any name a plain write takes is taken. Torch-free.

A SIGKILL or a power loss mid-write leaves the temporary file, which no `finally` removes. Its name says whose it is:
`.<target's name>.catrt-<host>-<random>.tmp` (`<host>`: 8 hex digits of the writer's host name), and its writer holds
a lock on it (flock) until it is renamed or removed, which the kernel drops when the writer dies. The next write of the
same target removes each such file of this host that no live writer holds. One of another host is left alone (it is
found by its name): over NFS a lock may be held only on its own host (`nolock`, `local_lock`), and another host's
process ids mean nothing here, so nothing here can tell whether its writer is gone; its own host removes it at its
next write of that file.
Where there are no locks (Windows, a filesystem without them) nothing is taken as abandoned.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no locks, so no temporary file is ever taken as abandoned
    fcntl = None


#: The longest file name where the filesystem cannot say (POSIX's NAME_MAX on Linux and macOS).
NAME_MAX = 255
#: This host in a temporary file's name: a leftover is removed only by a writer of the host that made it.
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
#: A temporary file's tag after the target's name: `.catrt-<host>-<8 random hex digits>.tmp`.
_TAG = re.compile(r"\.catrt-([0-9a-f]{8})-[0-9a-f]{8}\.tmp")
#: The lock each staged temporary file's writer holds until it is renamed or removed (its descriptor, by path).
_HELD: dict[Path, int] = {}


def target(path: Path) -> Path:
    """The file a write of `path` writes: where a link at `path` points (relative links from the link's folder, chains
    to their end), else `path` itself. Renamed onto, the link itself was replaced by a file.

    A link another user made in a sticky, world-writable folder (`/tmp`) is not followed: PermissionError, as a plain
    write gets where Linux's fs.protected_symlinks is on (most distributions' default). Resolved here, such a link
    (`/tmp/report.md` -> `~/.bashrc`, planted before the victim's `--out /tmp/report.md`) had the victim's own
    writer replace the file of the planter's choosing."""
    if not os.path.islink(path):
        return path
    resolved, planted = _walk(path)
    if planted is not None:
        link, owner, folder = planted
        raise PermissionError(errno.EACCES, f"{link} is a link another user (uid {owner}) made in the sticky folder "
                                            f"{folder}, not followed", str(path))
    return path if resolved is None else resolved


def planted_link(path: Path) -> tuple[Path, int, Path] | None:
    """The first link followed to reach `path` (its own, a folder's on the way, and theirs in turn) that a user other
    than this one and its folder's owner made in a sticky, world-writable folder, with that user and folder; None where
    there is none (fs.protected_symlinks' rule)."""
    return _walk(path)[1]


#: The kernel's limit on the links one lookup follows (ELOOP past it).
_MOST_LINKS = 40


def _walk(path: Path) -> tuple[Path | None, tuple[Path, int, Path] | None]:
    """`path` resolved name by name as the kernel resolves it (each `..` from the folder a link led to, not the link's
    name: `os.path.abspath` took `proj/report.md -> ../x` through `proj -> /tmp/sub` for `proj/../x`), checking every
    link followed, as `os.path.realpath` follows them; with the first planted link (`planted_link`), or None. The path
    is None past the kernel's limit on links (a loop), where a write fails (ELOOP). A name that is missing is kept as it
    is, as realpath keeps it."""
    if not hasattr(os, "geteuid"):  # Windows: no sticky folders (and drive letters)
        return Path(os.path.realpath(path)), None
    resolved, names = os.path.abspath(os.sep), os.fspath(path).split(os.sep)
    if not os.path.isabs(path):
        names = [*os.getcwd().split(os.sep), *names]
    followed = 0
    while names:
        name = names.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, name)
        try:
            found = os.lstat(candidate)
        except OSError:
            found = None  # a write there says why
        if found is None or not stat.S_ISLNK(found.st_mode):
            resolved = candidate
            continue
        followed += 1
        if followed > _MOST_LINKS:
            return None, None
        try:
            folder = os.stat(resolved)
            pointed = os.readlink(candidate)
        except OSError:  # gone since its lstat: kept as a name, as a missing one is
            resolved = candidate
            continue
        shared = folder.st_mode & stat.S_ISVTX and folder.st_mode & stat.S_IWOTH
        if shared and found.st_uid not in (os.geteuid(), folder.st_uid):
            return None, (Path(candidate), found.st_uid, Path(resolved))
        if os.path.isabs(pointed):
            resolved = os.path.abspath(os.sep)
        names[:0] = pointed.split(os.sep)
    return Path(resolved), None


def stage(path: Path) -> Path:
    """A new empty file beside `path`'s target (`.<name>.catrt-<host>-<random>.tmp`, made exclusively and locked; the
    name cut to fit the filesystem's limit) to write `path`'s new content to; `commit` or `discard` ends it. The
    temporary files of the same target that killed writers of this host left are removed first.

    The OSError of a folder that is missing or cannot be written is raised here, before any work."""
    final = target(path)
    remove_abandoned(final)
    while True:
        temporary = beside(final, f".catrt-{HOST}-{uuid.uuid4().hex[:8]}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        if fcntl is None:  # Windows: nothing to hold (and a file open there cannot be renamed)
            os.close(descriptor)
            return temporary
        try:
            locked = _locked(descriptor, temporary)
        except BaseException:  # Ctrl-C while the lock waited on a cleanup's: neither the file nor its descriptor kept
            os.close(descriptor)
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        if locked:
            _HELD[temporary] = descriptor
            return temporary
        os.close(descriptor)  # another write's cleanup took it between its making and its lock: make another


def _locked(descriptor: int, temporary: Path) -> bool:
    """Lock the new `temporary` (through its descriptor); False if it is no longer at its name once locked. A
    filesystem without locks leaves it unlocked, and no cleanup takes an unlocked file as abandoned there."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # a cleanup that took it first holds it for an instant only
    except OSError:
        return True  # no locks here (ENOLCK, EOPNOTSUPP)
    try:
        return os.stat(temporary).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False


def remove_abandoned(path: Path) -> None:
    """Remove the temporary files beside `path` (a target) of a write of it that this host's killed writer left: each
    `.<name>.catrt-<this host>-*.tmp` whose lock no live writer holds."""
    if fcntl is None:
        return
    prefix = beside(path, ".catrt-00000000-00000000.tmp").name[: -len(".catrt-00000000-00000000.tmp")]
    try:
        names = os.listdir(path.parent)
    except OSError:
        return  # a missing or unreadable folder: the write's own open says why
    for name in names:
        tag = _TAG.fullmatch(name, len(prefix)) if name.startswith(prefix) else None
        if tag is not None and tag.group(1) == HOST:
            _remove_if_abandoned(path.parent / name)


def _remove_if_abandoned(temporary: Path) -> None:
    """Remove `temporary` if its lock can be taken (its writer is gone), while holding that lock."""
    descriptor = None
    for access in (os.O_WRONLY, os.O_RDONLY):  # NFS locks (F_WRLCK) only through a descriptor that may write; a file
        try:                                   # its writer made read-only before the rename, only through another
            descriptor = os.open(temporary, access | os.O_NOFOLLOW | os.O_NONBLOCK)  # never a link's, nor wait on a FIFO
            break
        except PermissionError:
            continue
        except OSError:
            return
    if descriptor is None:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        found = os.fstat(descriptor)
        if stat.S_ISREG(found.st_mode) and os.lstat(temporary).st_ino == found.st_ino:
            temporary.unlink()
    except OSError:
        pass  # a live writer holds it, no locks here, or it is gone already
    finally:
        os.close(descriptor)


#: A folder's refusal of a new file: no write permission, or a read-only filesystem (a file there may be writable).
_FOLDER_REFUSALS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def folder_refusal(path: Path, error: OSError, fix: str = "pick another folder") -> str | None:
    """Why `path` cannot be replaced where `error` is its folder's refusal of the temporary file (`stage`) while the
    file itself is there and writable, which alone does not explain it: "its folder F is not writable (reason): ...;
    make F writable or <fix>". None for any other error. A write is never made in place instead: an interrupted one
    would leave the file half-written."""
    final = target(path)
    if error.errno not in _FOLDER_REFUSALS or not os.path.isfile(final) or not os.access(final, os.W_OK):
        return None
    folder = final.parent.absolute()
    return (f"its folder {folder} is not writable ({error.strerror or type(error).__name__}), though the file is: a "
            f"file is replaced by a new one written beside it and renamed onto it, never rewritten in place (an "
            f"interrupted write would leave it half-written); make {folder} writable or {fix}")


def sticky_refusal(path: Path, fix: str = "write it under another name, or have its owner remove it") -> str | None:
    """Why `path` cannot be replaced where it is another user's file in a sticky folder (`/tmp`): there only the file's
    owner, the folder's owner or root may rename onto it or remove it, while anyone may make the temporary file beside
    it, so the write failed only at its last step, after the work. None where it can be replaced, or nothing is there.
    A folder there (a bundle `catrt build` publishes whole) is refused as a file is; a device or FIFO there is
    written into, not replaced, and is not refused."""
    if not hasattr(os, "geteuid"):  # Windows: no sticky folders
        return None
    final = target(path)
    try:
        found, folder = os.lstat(final), os.stat(final.parent)
    except OSError:
        return None  # nothing there (a new file), or the write itself says why
    me = os.geteuid()
    if not (stat.S_ISREG(found.st_mode) or stat.S_ISDIR(found.st_mode)) or not folder.st_mode & stat.S_ISVTX or me in (0, found.st_uid, folder.st_uid):
        return None
    return (f"it belongs to another user (uid {found.st_uid}) and its folder {final.parent.absolute()} is sticky (as /tmp "
            f"is): only the file's owner may replace or remove it there; {fix}")


def replace_refusal(path: Path, fix: str | None = None, file: bool = False) -> str | None:
    """Why `path` (a file, or a folder published whole) cannot be replaced, found before the work, not at the final
    rename after it: another user's file or folder in a sticky folder (`sticky_refusal`), or a writable file whose
    folder takes no new file (`folder_refusal`, found by making and removing a temporary file beside it). None where
    the write may go on; any other OSError of that temporary file (a missing folder, a full disk) is raised, for the
    caller's own message. The one check every writer of a user's path (`--out`, `--publish`) runs up front; `fix`,
    where given, ends the message in place of each check's own. `file`: `path` is written as a file, so a folder at
    its name (or a link to one) is refused too: the rename onto it failed after the work (IsADirectoryError)."""
    planted = planted_link(path)
    if planted is not None:
        link, owner, folder = planted
        return (f"{link} is a link another user (uid {owner}) made in the sticky folder {folder} (as /tmp is), which a "
                f"write does not follow there (Linux's fs.protected_symlinks): remove the link or "
                f"{fix or 'write it under another name'}")
    sticky = sticky_refusal(path) if fix is None else sticky_refusal(path, fix)
    if sticky is not None:
        return sticky
    if os.path.isdir(target(path)):
        if file:
            return (f"it is a folder, where a file is written (renamed onto its name); move the folder away or "
                    f"{fix or 'write it under another name'}")
        return None  # a folder is published by `catrt.publish`, which checks its parent itself
    try:
        discard(stage(path))
    except OSError as error:
        refusal = folder_refusal(path, error) if fix is None else folder_refusal(path, error, fix)
        if refusal is None:
            raise
        return refusal
    return None


def file_refusal(path: Path, fix: str) -> str | None:
    """`replace_refusal` of a file written at `path`, any other failure of its temporary file (a missing folder, a
    full disk) as "<reason>; <fix>": the line a CLI's up-front check of its output file prints."""
    try:
        return replace_refusal(path, fix, file=True)
    except OSError as error:
        return f"{error.strerror or type(error).__name__}; {fix}"


def discard(temporary: Path) -> None:
    """Remove a staged `temporary` unwritten (its write failed or was interrupted) and let go of its lock."""
    with contextlib.suppress(OSError):
        temporary.unlink()
    _release(temporary)


def _release(temporary: Path) -> None:
    descriptor = _HELD.pop(temporary, None)
    if descriptor is not None:
        os.close(descriptor)


def beside(path: Path, tag: str) -> Path:
    """The hidden file `.<name><tag>` beside `path`, its name cut (whole characters) to the filesystem's limit: a name
    of up to NAME_MAX bytes, which a plain write takes, has no room for the dot and the tag too. A name over the limit,
    or a `path` still a link (a loop of links, where `target` stops), is the OSError a plain write raises (ENAMETOOLONG,
    ELOOP), raised now: the rename would fail only after the work."""
    if os.path.islink(path):
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
    most = name_limit(path.parent)
    if len(os.fsencode(path.name)) > most:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))
    name, limit = path.name, most - len(os.fsencode(tag)) - 1
    while len(os.fsencode(name)) > limit:
        name = name[:-1]
    return path.with_name(f".{name}{tag}")


def commit(temporary: Path, path: Path) -> None:
    """Flush `temporary` to disk and rename it onto `path` (its target, where a link); on any failure `temporary` is
    removed and `path` kept. A file replaced passes its permission bits on (a plain write keeps them)."""
    path = target(path)
    try:
        if _special(path):
            _write_into(temporary, path)
            discard(temporary)
            return
        _flush(temporary)  # else a crash soon after the rename can leave `path` empty (ext4, xfs)
        with contextlib.suppress(FileNotFoundError):  # after the flush: a read-only mode passed on may be 0o000, 0o200
            earlier = os.stat(path)
            _own_as(temporary, earlier)  # before the mode: a chown clears set-id bits
            os.chmod(temporary, stat.S_IMODE(earlier.st_mode) & 0o777)  # a new file keeps the umask's
        os.replace(temporary, path)
    except BaseException:
        discard(temporary)
        raise
    _release(temporary)


def _own_as(temporary: Path, earlier: os.stat_result) -> None:
    """Give `temporary` the replaced file's owner and group where this user may (root: both; an owner: a group it is in),
    as a plain write keeps them: a file of a shared group (0o660) became the writer's group, shut to the others, and
    one a root container wrote into a user's bind mount became root's."""
    if not hasattr(os, "chown"):  # Windows
        return
    try:
        os.chown(temporary, earlier.st_uid, earlier.st_gid)
    except OSError:
        with contextlib.suppress(OSError):
            os.chown(temporary, -1, earlier.st_gid)


def _special(path: Path) -> bool:
    """Whether `path` is a device, a FIFO or a socket (`/dev/null`, perhaps through a link): renamed onto, it was
    replaced by a plain file (as root, /dev/null itself), where a plain write writes into it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # none there (a new file), or the rename says why
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _write_into(temporary: Path, path: Path) -> None:
    """The staged content written into the special file `path` as a plain write writes it (whole or not: a device
    has no earlier content to keep)."""
    with open(temporary, "rb") as source, open(path, "wb") as sink:
        while block := source.read(1 << 20):
            sink.write(block)


def _flush(temporary: Path) -> None:
    """fsync `temporary` through a read-only descriptor (POSIX flushes through any, and its owner may not write it under
    an odd umask), else through one that may write: Windows' FlushFileBuffers refuses a read-only handle (EBADF)."""
    for flags in (os.O_RDONLY, os.O_WRONLY):
        descriptor = os.open(temporary, flags)
        try:
            os.fsync(descriptor)
            return
        except OSError as error:
            if flags == os.O_WRONLY or error.errno not in (errno.EBADF, errno.EACCES):
                raise
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A staged temporary file for the block to write (by path: `torch.save`, safetensors, PIL), put in `path`'s
    place when the block completes; if the block fails or is interrupted it is removed and `path` is left as it was."""
    temporary = stage(path)
    try:
        yield temporary
    except BaseException:
        discard(temporary)
        raise
    commit(temporary, path)


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """`path`'s content replaced by `data` (bytes or any buffer, e.g. TensorRT's serialized plan) whole."""
    with replacing(path) as temporary:
        temporary.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    """`path`'s content replaced by `text` (UTF-8, newlines as `Path.write_text` writes them) whole."""
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def name_limit(folder: Path) -> int:
    """The longest file name, in bytes, `folder`'s filesystem takes (NAME_MAX where it cannot say)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # a missing folder (refused by the open after), or no pathconf (Windows)
        return NAME_MAX
