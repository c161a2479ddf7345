"""A bundle file read in blocks, in any order, with every byte served bound to the sha256 its verified manifest records.

Why: `catrt.integrity` hashes each file before a backend runs, but a backend that reads a file afterwards (TensorRT
streaming a plan through an `IStreamReaderV2`, which may seek) could be handed bytes written in place since that
check. A streamed read cannot be verified before the consumer has seen it, so `finish()` verifies it after, and the
caller refuses what the consumer made of it (TensorRT's engine is dropped before any context is made or run).

How: the file is hashed in order, a block at a time, the first time each block is reached (a forward seek hashes the
blocks it skips). For each block the whole-file hash is kept as it was before the block (a copy of its state) and as
it ends after it, so a block served again after a backward seek is read again, hashed from that state and must end
the same (a different block ending the same would be a sha256 collision); no block is hashed twice unless it is read
twice. `finish()` hashes what the consumer did not read and compares the whole digest and size with the record.
Every byte served thus lies in a block whose bytes are those the whole-file digest was taken over, so when
`finish()` passes, the consumer read exactly the verified file. Host memory held: one block.

Every byte served is hashed as it is read, also of a file the bundle check of this process hashed a moment before:
a file's stat cannot vouch for its bytes. A store into a page of a shared mapping its writer dirtied before the check
changes no stat field (the kernel stamps a mapped file at the first store into a clean page only), and a FUSE file
system (sshfs: its change time is the mtime) reports what its daemon says; the check's digest, trusted here for an
unchanged stat, served such an edit to TensorRT unhashed.

A consumer that takes one buffer (TensorRT before 10.7; the weights and index catrt hands ONNX Runtime) gets the
file read whole into memory of this process (`whole`, `verified_bytes`), hashed as read and verified before it is used:
what is used is then those bytes, whatever happens to the file afterwards. Where this read is the file's only
sha256 check (`first_check`: `catrt.load` leaves weights.bin's digest to it, `catrt.file_checks.VERIFIED_AS_READ`),
a mismatch is refused as the bundle's check refuses one. A consumer that reads the file by its path
itself (ONNX Runtime: its graphs, and the weights its optimizations fold) gets it hashed just before (`hashed_file`), and
what it made of it is refused unless the path still names that file, unwritten, once it is done (`check_unchanged`:
same device, inode and change time, which every write or rename sets and no user call sets back).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from catrt.errors import CorruptBundleError
from catrt.file_checks import digest_mismatch, stat_identity, written_since_unhashed_check

#: Bytes read, hashed and held at a time (a module constant: tests shrink it to exercise many blocks).
BLOCK = 16 << 20


def verified_bytes(path: Path, record: Mapping[str, Any] | None) -> bytearray:
    """The file's bytes, read once and checked against `record` (a CorruptBundleError naming the file where they differ)."""
    with VerifiedFile(path, record) as source:
        data = source.whole()
        source.finish()
    return data


def hashed_file(path: Path, record: Mapping[str, Any] | None) -> VerifiedFile:
    """The file checked against `record` now, whole (a CorruptBundleError naming it where it differs), for a consumer that
    reads it by path next: `check_unchanged` once that consumer is done."""
    with VerifiedFile(path, record) as source:
        source.finish()
    return source


class VerifiedFile:
    """`read` / `seek` over a file opened once (no links followed), checked against `record` ({"sha256", "size"})
    by `finish()`; without a record (a build loading the files it has just written) nothing is compared.
    `first_check`: no sha256 of the file was checked before this read (only its size), so a mismatch is the bundle's
    own, not a change since its check."""

    def __init__(self, path: Path, record: Mapping[str, Any] | None, first_check: bool = False) -> None:
        self.path = path
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        try:
            # The path's identity, taken by path as `check_unchanged` takes it again: an fd's fstat may name another
            # device and inode than the path's stat (overlayfs before Linux 4.19, a container image's lower layer).
            # Taken before the open, so a file replaced in between reads as changed, never the other way round.
            named = os.lstat(path)
            self._file = os.fdopen(os.open(path, flags), "rb", buffering=0)
        except OSError as error:
            raise self._unreadable(error) from error
        info = os.fstat(self._file.fileno())
        # Its sha256 unchecked before: a mismatch is the bundle's own unless the file was written since its check.
        self._first_check = first_check and not written_since_unhashed_check(path, info)
        self.size = info.st_size
        self._identity = stat_identity(named)
        self._record = record
        self._digest = hashlib.sha256()
        self._before: list[Any] = []  # per block hashed so far, in file order: the whole-file hash before it (a copy)
        self._after: list[bytes] = []  # and that hash's digest were the file to end after it
        self._hashed = 0  # bytes fed to the whole-file digest, in file order
        self._held: tuple[int, bytes] | None = None  # the block served last: (index, bytes)
        self.position = 0
        self.changed = False
        self._failure: CorruptBundleError | None = None  # a read error `read` kept for `finish`
        if not stat.S_ISREG(info.st_mode) or (record is not None and self.size != record["size"]):
            self.close()
            raise self._changed_error()

    def __enter__(self) -> VerifiedFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    # -- what the consumer calls ----------------------------------------------------------------

    def read(self, count: int) -> memoryview:
        """Up to `count` bytes from the position, within one block; empty at the end, once a change is seen or once the
        file fails to read. Never raises: TensorRT calls it from C++, where an exception only prints to stderr and
        reads as 0 bytes, so a read error is kept for `finish()` to raise, naming the file."""
        if self.changed or self._failure is not None or count <= 0 or self.position >= self.size:
            return memoryview(b"")
        index, start = divmod(self.position, BLOCK)
        try:
            block = self._block(index)
        except CorruptBundleError as error:
            self._failure = error
            return memoryview(b"")
        if block is None:
            return memoryview(b"")
        piece = memoryview(block)[start : start + count]
        self.position += len(piece)
        return piece

    def seek(self, offset: int, whence: int) -> bool:
        """Move to `offset` from the start (os.SEEK_SET), the position (SEEK_CUR) or the end (SEEK_END), as fseek does;
        False (position unchanged) outside the file."""
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[whence]
        if not 0 <= base + offset <= self.size:
            return False
        self.position = base + offset
        return True

    def whole(self) -> bytearray:
        """The whole file in memory of this process, read a block at a time into one buffer and hashed as read, for a
        consumer that takes one buffer; `finish()` then verifies it. Host memory held: the file, once."""
        data = bytearray(self.size)
        with memoryview(data) as view:
            done = 0
            try:
                self._file.seek(0)
                while done < self.size and (count := self._file.readinto(view[done : done + BLOCK])):
                    self._digest.update(view[done : done + count])
                    done += count
            except OSError as error:
                raise self._unreadable(error) from error
        self._hashed = done
        self.changed = done != self.size  # shorter: truncated since it was opened
        return data

    def finish(self) -> None:
        """Hash what was not read and compare with the record: a CorruptBundleError if the bytes served differ (or the
        read error `read` kept)."""
        if self._failure is not None:
            raise self._failure
        if self._record is not None:
            while not self.changed and self._hashed < self.size:
                self._hash_next_block()
            self.changed = self.changed or self._hashed != self._record["size"] or not hmac.compare_digest(
                self._digest.hexdigest(), str(self._record["sha256"])
            )
        if self.changed:
            raise digest_mismatch(self.path.parent, self.path.name) if self._first_check else self._changed_error()

    def check_unchanged(self, reader: str) -> None:
        """Refuse what `reader` read from the file by its path since it was opened here (ONNX Runtime's own reads) if the
        path now names another file, or the file was written or replaced since (its inode or change time differs: any
        write or rename sets the change time, and no user call can set it back)."""
        try:
            now = stat_identity(os.lstat(self.path))
        except OSError:
            now = None
        if now != self._identity:
            raise CorruptBundleError(
                f"engine file {self.path.name} in {self.path.parent} was written or replaced while {reader} read it (its "
                f"inode or change time is not what it was when catrt read and checked it), and what was loaded from it is "
                f"refused; load the bundle again (rebuild the engine if it is damaged)",
                field=self.path.name,
            )

    # -- blocks ---------------------------------------------------------------------------------

    def _block(self, index: int) -> bytes | None:
        """Block `index`: hashed in order on first reach, else read again and hashed from the state before it, which
        must end as the first pass did (None: changed)."""
        if self._held is not None and self._held[0] == index:
            return self._held[1]
        block: bytes | None = None
        while not self.changed and len(self._after) <= index:  # each block skipped hashed
            block = self._hash_next_block()
        if block is None and not self.changed:
            block = self._read_at(index * BLOCK, self._block_length(index))
            check = self._before[index].copy()
            check.update(block)
            self.changed = check.digest() != self._after[index]
        if self.changed:
            return None
        assert block is not None
        self._held = (index, block)
        return block

    def _hash_next_block(self) -> bytes:
        index = len(self._after)
        block = self._read_at(index * BLOCK, self._block_length(index))
        self.changed = len(block) != self._block_length(index)  # shorter: truncated since it was opened
        self._before.append(self._digest.copy())
        self._digest.update(block)
        self._hashed += len(block)
        self._after.append(self._digest.copy().digest())
        return block

    def _block_length(self, index: int) -> int:
        return min(BLOCK, self.size - index * BLOCK)

    def _read_at(self, offset: int, count: int) -> bytes:
        """`count` bytes at `offset`, fewer only at the file's end (a raw read may return less than asked)."""
        try:
            self._file.seek(offset)
            parts = []
            while count > 0 and (part := self._file.read(count)):
                parts.append(part)
                count -= len(part)
        except OSError as error:
            raise self._unreadable(error) from error
        return b"".join(parts)

    # -- errors ---------------------------------------------------------------------------------

    def _unreadable(self, error: OSError) -> CorruptBundleError:
        return CorruptBundleError(
            f"engine file {self.path.name} in {self.path.parent} cannot be read: {error.strerror}", field=self.path.name
        )

    def _changed_error(self) -> CorruptBundleError:
        return CorruptBundleError(
            f"engine file {self.path.name} in {self.path.parent} changed after the bundle's files were checked: the "
            f"bytes read do not match its manifest sha256 and size, and what was loaded from them is refused; load the "
            f"bundle again (rebuild the engine if it is damaged)",
            field=self.path.name,
        )
