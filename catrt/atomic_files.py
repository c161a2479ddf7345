"""A file replaced whole: written to a temporary file beside it, flushed to disk, then renamed onto it.

A kill, Ctrl-C, a full disk or a failing writer mid-write leaves the earlier file (or none) and no temporary file,
never a half-written one (`Path.write_text` truncates first). The temporary file is in the target's folder, so the
rename stays on one filesystem and is atomic; it is made as `open` makes a file (0o666 less the umask), not
`mkstemp`'s owner-only 0o600, so the file keeps the permissions a plain write gave it. Torch-free.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def stage(path: Path) -> Path:
    """A new empty file beside `path` (`.<name>.<random>.tmp`, made exclusively) to write `path`'s new content to.

    The OSError of a folder that is missing or cannot be written is raised here, before any work."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return temporary


def commit(temporary: Path, path: Path) -> None:
    """Flush `temporary` to disk and rename it onto `path`; on any failure `temporary` is removed and `path` kept."""
    try:
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # else a crash soon after the rename can leave `path` empty (ext4, xfs)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


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
