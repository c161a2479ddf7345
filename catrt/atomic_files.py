"""A file replaced whole: written to a temporary file beside it, flushed to disk, then renamed onto it.

A kill, Ctrl-C, a full disk or a failing writer mid-write leaves the earlier file (or none) and no temporary file,
never a half-written one (`Path.write_text` truncates first). The temporary file is in the target's folder, so the
rename stays on one filesystem and is atomic; it is made as `open` makes a file (0o666 less the umask), not
`mkstemp`'s owner-only 0o600, and a file it replaces passes on its permission bits, so the file keeps the permissions
a plain write gave it (a report made owner-only stays so). A link at the target is written through, as a plain write
writes: the file it points to is replaced, beside it (on its filesystem), and the link stays. The temporary file's name
is cut to fit the filesystem's name limit, so any name a plain write takes is taken. Torch-free.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path


#: The longest file name where the filesystem cannot say (POSIX's NAME_MAX on Linux and macOS).
NAME_MAX = 255


def target(path: Path) -> Path:
    """The file a write of `path` writes: where a link at `path` points (relative links from the link's folder, chains
    to their end), else `path` itself. Renamed onto, the link itself was replaced by a file."""
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


def stage(path: Path) -> Path:
    """A new empty file beside `path`'s target (`.<name>.<random>.tmp`, made exclusively; the name cut to fit the
    filesystem's limit) to write `path`'s new content to.

    The OSError of a folder that is missing or cannot be written is raised here, before any work."""
    temporary = beside(target(path), f".{uuid.uuid4().hex[:8]}.tmp")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return temporary


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
        _flush(temporary)  # else a crash soon after the rename can leave `path` empty (ext4, xfs)
        with contextlib.suppress(FileNotFoundError):  # after the flush: a read-only mode passed on may be 0o000, 0o200
            os.chmod(temporary, stat.S_IMODE(os.stat(path).st_mode) & 0o777)  # a new file keeps the umask's
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


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
        with contextlib.suppress(OSError):
            temporary.unlink()
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
