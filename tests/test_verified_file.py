"""A bundle file read by its engine after the bundle's check: one sha256 pass at load, and every change still refused."""

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


def _after_a_tick(path: Path) -> None:
    """Wait until the clock the file system stamps change times with has moved past the file's change time, so a
    write now gives it another (as a file settled before its check has: `file_checks.SETTLED_NS`)."""
    probe = path.with_name("probe")
    while True:
        probe.write_bytes(b"")
        if probe.stat().st_ctime_ns > path.stat().st_ctime_ns:
            break
    probe.unlink()


def test_a_file_the_bundle_check_hashed_is_streamed_and_read_whole_unhashed(plan: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """catrt.load hashed a TensorRT plan (or an ONNX graph) in the bundle check, then hashed it again as the engine
    read it: the second pass is left out where the check's digest is remembered for this very, unchanged, file."""
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
    assert fed == []


def test_a_checked_file_written_while_it_is_read_is_refused(plan: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Served unhashed, a file written in place after the check (same size) is refused by `finish`: its change time
    moved. One whose check remembered another digest than the record's is hashed as read."""
    _after_a_tick(plan)
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
    assert first == DATA[:100] and caught.value.field == "full.plan" and fed == []
    other = {**_record(), "sha256": "0" * 64}
    with VerifiedFile(plan, other) as source, pytest.raises(CorruptBundleError, match="changed after"):
        source.finish()
    assert sum(fed) == len(DATA)


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
