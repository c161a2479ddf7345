"""A bundle file read by its engine after the bundle's check: every byte served hashed as read, every change refused."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from catrt import file_checks
from catrt.engines import verified_file
from catrt.engines.verified_file import VerifiedFile
from catrt.errors import CorruptBundleError
from tests.conftest import after_a_tick

DATA = bytes(range(256)) * 40  # 10,240 bytes: 10 blocks of 1 KiB


@pytest.fixture()
def plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file of DATA, read in blocks of 1 KiB, with an empty digest memo that trusts a file of any age."""
    monkeypatch.setattr(verified_file, "BLOCK", 1024)
    monkeypatch.setattr(file_checks, "_DIGESTS", {})
    monkeypatch.setattr(file_checks, "SETTLED_NS", 0)
    path = tmp_path / "full.plan"
    path.write_bytes(DATA)
    return path


def _record() -> dict[str, Any]:
    return {"sha256": hashlib.sha256(DATA).hexdigest(), "size": len(DATA)}


def _bytes_hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many bytes VerifiedFile feeds sha256, call by call."""
    fed: list[int] = []

    class Counting:
        def __init__(self) -> None:
            self.inner = hashlib.sha256()

        def update(self, data: Any) -> None:
            fed.append(len(data))
            self.inner.update(data)

        def copy(self) -> Any:
            return self.inner.copy()

        def hexdigest(self) -> str:
            return self.inner.hexdigest()

    monkeypatch.setattr(verified_file, "hashlib", SimpleNamespace(sha256=Counting))
    return fed


def _stream(source: VerifiedFile) -> bytes:
    parts = []
    while piece := source.read(300):
        parts.append(bytes(piece))
    return b"".join(parts)


def test_a_file_the_bundle_check_hashed_is_hashed_again_as_read(plan: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """catrt.load hashes a TensorRT plan (or an ONNX graph) in the bundle check, then again as the engine reads it:
    the check's digest, remembered for the file's stat, does not stand in for the bytes served (see the mapping test
    below for a change no stat shows)."""
    fed = _bytes_hashed(monkeypatch)
    with VerifiedFile(plan, _record()) as source:
        assert _stream(source) == DATA and source.finish() is None
    assert sum(fed) == len(DATA)  # not checked before: hashed as read
    fed.clear()
    assert file_checks.file_problems(plan.parent, {plan.name: _record()}, None) == []  # the bundle check: hashed once
    with VerifiedFile(plan, _record()) as source:
        assert _stream(source) == DATA and source.finish() is None
    with VerifiedFile(plan, _record()) as source:
        assert source.whole() == DATA and source.finish() is None
    assert sum(fed) == 2 * len(DATA)


def test_a_checked_file_written_while_it_is_read_is_refused(plan: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file written in place after the check (same size) is refused by `finish`, and so is one whose check
    remembered another digest than the record's; both hashed as read."""
    after_a_tick(plan)
    assert file_checks.file_problems(plan.parent, {plan.name: _record()}, None) == []
    fed = _bytes_hashed(monkeypatch)
    with VerifiedFile(plan, _record()) as source:
        first = bytes(source.read(100))
        with plan.open("r+b") as stream:
            stream.seek(5000)
            stream.write(b"X")
        _stream(source)
        with pytest.raises(CorruptBundleError, match=r"^engine file full\.plan in .* changed after the bundle's files were checked") as caught:
            source.finish()
    assert first == DATA[:100] and caught.value.field == "full.plan" and sum(fed) == len(DATA)
    other = {**_record(), "sha256": "0" * 64}
    with VerifiedFile(plan, other) as source, pytest.raises(CorruptBundleError, match="changed after"):
        source.finish()
    assert sum(fed) == 2 * len(DATA)


@pytest.mark.parametrize("whence, offset", [(0, 5000), (2, -10)], ids=["forward", "tail"])
def test_a_forward_seek_past_unread_blocks_serves_the_bytes_there(plan: Path, whence: int, offset: int) -> None:
    """TensorRT may seek forward over blocks it has not read (the tail of a plan first): the blocks skipped are hashed
    on the way, and what is served is the bytes at the new position, not the first block skipped."""
    data = b"".join(hashlib.sha256(i.to_bytes(2, "big")).digest() for i in range(320))  # 10,240 bytes, no two blocks alike
    plan.write_bytes(data)
    record = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    with VerifiedFile(plan, record) as source:
        assert source.seek(offset, whence)
        start = source.position
        assert bytes(source.read(10)) == data[start : start + 10]
        assert source.seek(0, 0) and _stream(source) == data and source.finish() is None


def test_a_file_edited_through_a_mapping_after_the_check_is_refused_as_read(plan: Path) -> None:
    """A store into a page of a shared mapping its writer dirtied before the check leaves the file's change time (and
    every other stat field) as it was: the kernel stamps a mapped file at the first store into a clean page only, and
    a FUSE file system (sshfs: change time = mtime) reports whatever its daemon says. The check's digest of the file
    must not stand in for the bytes the engine is served: they are hashed as read and the edit refused."""
    import mmap

    with plan.open("r+b") as stream, mmap.mmap(stream.fileno(), 0) as mapping:
        mapping[5000] = DATA[5000]  # the page made dirty (its writer's first store), the file's bytes unchanged
        assert file_checks.file_problems(plan.parent, {plan.name: _record()}, None) == []  # the bundle check
        mapping[5000] = ord("X")  # the edit: no new change time (unless the kernel wrote the page back in between)
        assert plan.read_bytes()[5000] == ord("X")
        with VerifiedFile(plan, _record()) as source:
            _stream(source)
            with pytest.raises(CorruptBundleError, match=r"^engine file full\.plan in .* changed after the bundle's files were checked"):
                source.finish()
        with VerifiedFile(plan, _record()) as source:
            source.whole()
            with pytest.raises(CorruptBundleError, match="changed after"):
                source.finish()
