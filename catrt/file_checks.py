"""A bundle's files against its manifest: which files a backend's bundle holds, and each one checked.

`file_problems` names every file problem before a backend reads a byte: an unsafe name, a file the backend needs
for the bundle's graphs but unlisted (or listed but not one of them), a listed file missing, a link, not a regular
file, or of another size or sha256 than recorded, and any entry of the folder the manifest does not list. The
digests of settled files are remembered per process, so a bundle checked twice (`serve --engines`, then
`catrt.load`) is hashed once by the checks. A remembered digest vouches for a check only, never for bytes a backend
uses: an edit no stat field shows (a store into a mapped page its writer dirtied before, a FUSE file system's
made-up stat) passes a second check, and the engine, hashing every byte it reads (`catrt.engines.verified_file`),
refuses it.

`catrt.load` leaves the sha256 of the files its backend verifies as it reads them, before any of its sessions is made
(`VERIFIED_AS_READ`: an onnxruntime bundle's weights.bin, read whole into memory and hashed as read), to that read:
they are checked here for all but their digest, and the weights are read and hashed once, not twice. Every other
check (`catrt inspect`, `serve --engines`) hashes every file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import time
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from catrt.contract import graph_kind
from catrt.errors import CatrtError, CorruptBundleError, echo
from catrt.manifest import MANIFEST_FILE

#: Per backend, the files a bundle holds besides the manifest: the suffix of each graph's own file
#: (None: no file per graph) and the files all graphs share. `bundle_files` lists them for a bundle.
BUNDLE_FILES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "eager": (None, ()),
    "compile": (None, ()),
    "onnxruntime": (".onnx", ("weights.bin", "initializers.json")),
    "tensorrt": (".plan", ()),
}
#: Per backend, the files its engine reads whole into memory and checks against their manifest sha256 as it reads
#: them, before any session or engine of the backend is made (`catrt.engines.shared_weights`): `catrt.load` checks them
#: up front for all but their digest. Not TensorRT's plans: their digest is known only once TensorRT consumed them.
VERIFIED_AS_READ: dict[str, tuple[str, ...]] = {"onnxruntime": ("weights.bin",)}
_CHUNK = 1 << 20


def bundle_files(backend: str, graphs: Iterable[str]) -> tuple[str, ...]:
    """The files a `backend` bundle of these graphs holds besides the manifest; each must be listed in `files`."""
    suffix, shared = BUNDLE_FILES[backend]
    return (*(f"{graph}{suffix}" for graph in graphs if suffix is not None), *shared)


def name_problem(name: object) -> CorruptBundleError | None:
    """A `files` name must be a plain file name inside the bundle: no separators, `..`, absolute paths."""
    plain = (
        isinstance(name, str) and name not in ("", ".", "..", MANIFEST_FILE)
        and not any(char in name for char in "/\\:\0") and not name.startswith("~") and name.isprintable()
    )
    if plain:
        return None
    return CorruptBundleError(
        f"{MANIFEST_FILE} lists the file {echo(name)}, which is not a plain file name inside the bundle (no path "
        f"separators, '..', absolute paths or the manifest itself): refusing to read it",
        field=str(name), value=name,
    )


def file_problems(
    folder: Path, files: Mapping[str, Any], backend: str | None, graphs: Iterable[str] | None = None,
    as_read: Collection[str] = (),
) -> list[CatrtError]:
    """Each file problem: unsafe names, files the backend needs for `graphs` but unlisted, listed but
    absent, links, wrong size or sha256, and entries of the folder the manifest does not list.

    Without a backend or the graphs' names, which files are needed is unknown and not checked. `as_read`: files whose
    sha256 the caller's engine checks as it reads them (`VERIFIED_AS_READ`), checked here for all but their digest."""
    problems: list[CatrtError] = []
    safe = {}
    for name, record in files.items():
        problem = name_problem(name)
        if problem is not None:
            problems.append(problem)
        else:
            safe[name] = record
    known = backend in BUNDLE_FILES and graphs is not None
    required = bundle_files(backend, [g for g in graphs if graph_kind(g) is not None]) if known else None
    if required is not None:
        for name in required:
            if name not in files:
                problems.append(CorruptBundleError(
                    f"engine file {name} is not listed in {MANIFEST_FILE} (every {backend} bundle lists it with its "
                    f"sha256 and size); the manifest was edited or is damaged: rebuild the engine",
                    field=name,
                ))
        for name in safe:
            if name not in required:
                problems.append(CorruptBundleError(
                    f"{MANIFEST_FILE} lists {name}, which is not one of the {backend} backend's files "
                    f"({', '.join(required) or 'none but the manifest'}); rebuild the engine",
                    field=name,
                ))
    for name, record in safe.items():
        if isinstance(record, Mapping) and {"sha256", "size"} <= set(record):
            problem = _file_problem(folder, name, record, hashed=name not in as_read)
            if problem is not None:
                problems.append(problem)
    problems += _unlisted_entries(folder, {*files, *(required or ())})  # a required one is named above
    return problems


def _file_problem(folder: Path, name: str, record: Mapping[str, Any], hashed: bool = True) -> CorruptBundleError | None:
    """The file's problem, if any; `hashed=False`: all but its sha256 (its size from lstat, nothing read)."""
    path = folder / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return CorruptBundleError(f"engine file {name} is missing from {folder}; rebuild the engine", field=name)
    except OSError as error:
        return CorruptBundleError(f"engine file {name} in {folder} cannot be read: {error.strerror}", field=name)
    if stat.S_ISLNK(info.st_mode):
        return CorruptBundleError(
            f"engine file {name} in {folder} is a symbolic link; a bundle holds its own files, links are refused "
            f"(even to a matching file): rebuild the engine or copy the file in",
            field=name,
        )
    if not stat.S_ISREG(info.st_mode):
        return CorruptBundleError(f"engine file {name} in {folder} is not a regular file; rebuild the engine", field=name)
    size, digest = info.st_size, None
    if hashed:
        try:
            size, digest = _digest_regular_file(path)
        except OSError as error:
            return CorruptBundleError(f"engine file {name} in {folder} cannot be read: {error.strerror}", field=name)
    if size != record["size"]:
        return CorruptBundleError(
            f"engine file {name} in {folder} has {size} bytes, not the {record['size']} its manifest records "
            f"(corrupt or modified); rebuild the engine",
            field=name, value={"expected": record["size"], "found": size},
        )
    if digest is None:
        _remember_unhashed(path, info)
    elif not hmac.compare_digest(digest, str(record["sha256"])):
        return digest_mismatch(folder, name)
    return None


def digest_mismatch(folder: Path, name: str) -> CorruptBundleError:
    """The refusal of a file whose bytes do not have its manifest sha256 (here, or as its engine reads it)."""
    return CorruptBundleError(
        f"engine file {name} in {folder} does not match its manifest sha256 (corrupt or modified); rebuild the engine",
        field=name,
    )


def _digest_regular_file(path: Path) -> tuple[int, str]:
    """(size, sha256) of a regular file, opened without following a link (a swap after lstat fails).

    A file this process hashed before and whose identity is unchanged is not read again (`serve --engines` checks
    each bundle before it listens, then `catrt.load` checks it again: a TensorRT plan hashed once by the two checks;
    its engine hashes it again as it reads it)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    descriptor = os.open(path, flags)
    with os.fdopen(descriptor, "rb") as stream:
        before = os.fstat(stream.fileno())
        if not stat.S_ISREG(before.st_mode):
            raise OSError(0, "not a regular file")
        identity = _identity(before)
        if identity is not None and identity in _DIGESTS:
            return before.st_size, _DIGESTS[identity]
        digest = hashlib.sha256()
        size = 0
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if identity is not None and identity == _identity(os.fstat(stream.fileno())) and size == before.st_size:
            if len(_DIGESTS) >= _DIGESTS_KEPT:
                _DIGESTS.pop(next(iter(_DIGESTS)))
            _DIGESTS[identity] = digest.hexdigest()
    return size, digest.hexdigest()


#: sha256 by file identity (`_identity`), for the files this process hashed; the oldest entry goes first.
_DIGESTS: dict[tuple[int, ...], str] = {}
_DIGESTS_KEPT = 1024
#: A file changed this recently is hashed every time: a change within one tick of the kernel's coarse clock could
#: leave its change time as it was (git's "racy" entries), so only files settled for longer are remembered.
SETTLED_NS = 2_000_000_000


def _identity(info: os.stat_result) -> tuple[int, ...] | None:
    """Device, inode, size, mtime and ctime of a settled file: any write, rename onto it, chmod or utime moves its
    ctime, which no user can set back. None (hash every time) off POSIX, where ctime is the creation time, and for
    a file changed within `SETTLED_NS`."""
    if os.name != "posix" or time.time_ns() - info.st_ctime_ns < SETTLED_NS:
        return None
    return stat_identity(info)


def stat_identity(info: os.stat_result) -> tuple[int, ...]:
    """What any write, truncation or replacement of a file changes: device, inode, size, mtime and change time."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


#: Per path, the stat (device, inode, size, mtime, ctime) of each file a check left the sha256 of to its engine had then,
#: so that engine's read tells a file written or replaced since the check from one that was so when checked; the oldest
#: entry goes first.
_UNHASHED: dict[str, tuple[int, ...]] = {}


def _remember_unhashed(path: Path, info: os.stat_result) -> None:
    if len(_UNHASHED) >= _DIGESTS_KEPT:
        _UNHASHED.pop(next(iter(_UNHASHED)))
    _UNHASHED.pop(str(path), None)  # newest last
    _UNHASHED[str(path)] = stat_identity(info)


def written_since_unhashed_check(path: Path, info: os.stat_result) -> bool:
    """Whether the file at `path`, as `info` shows it now, was written or replaced since a check of this process left
    its sha256 to the engine reading it (False where no such check saw it)."""
    then = _UNHASHED.get(str(path))
    return then is not None and then != stat_identity(info)


def _unlisted_entries(folder: Path, known: set[str]) -> list[CatrtError]:
    """Entries of the folder other than the manifest and the `known` names (links and folders included)."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError as error:
        return [CorruptBundleError(f"cannot list the bundle folder {folder}: {error.strerror}", field=MANIFEST_FILE)]
    return [
        CorruptBundleError(
            f"{folder} holds {name}, which {MANIFEST_FILE} does not list; a bundle holds only its listed files: "
            f"remove it or rebuild the engine",
            field=name,
        )
        for name in entries
        if name != MANIFEST_FILE and name not in known
    ]
