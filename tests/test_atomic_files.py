"""catrt.atomic_files, and the writers that use it: a write that fails or is interrupted midway leaves the earlier
file whole and no temporary file beside it."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from catrt import atomic_files


def _half_then(error: BaseException) -> Any:
    """A Path.write_text / write_bytes that writes half its data, then fails as a full disk or Ctrl-C does."""
    def write(self: Path, data: Any, *args: Any, **kwargs: Any) -> int:
        with open(self, "w" if isinstance(data, str) else "wb", **({"encoding": "utf-8"} if isinstance(data, str) else {})) as file:
            file.write(data[: len(data) // 2])
        raise error
    return write


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_write_replaces_the_file_whole_with_a_plain_files_permissions(tmp_path: Path) -> None:
    path = tmp_path / "report.md"
    path.write_text("earlier\n")
    atomic_files.write_text(path, "new\n")
    assert path.read_text() == "new\n" and sorted(tmp_path.iterdir()) == [path]
    atomic_files.write_bytes(tmp_path / "new.bin", b"\x00\x01")
    assert (tmp_path / "new.bin").read_bytes() == b"\x00\x01"
    # 0o666 less the umask, as open() makes a file: mkstemp's owner-only 0o600 would hide a shared report
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o666 & ~_umask()


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
@pytest.mark.parametrize("kind", ["text", "bytes"])
def test_a_failure_mid_write_leaves_the_old_file_intact_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, kind: str
) -> None:
    path = tmp_path / "record.json"
    path.write_text("the earlier, whole content\n")
    monkeypatch.setattr(Path, f"write_{kind}", _half_then(error))
    with pytest.raises(type(error)):
        if kind == "text":
            atomic_files.write_text(path, "a new content that is cut in half\n")
        else:
            atomic_files.write_bytes(path, b"a new content that is cut in half\n")
    monkeypatch.undo()
    assert path.read_text() == "the earlier, whole content\n" and sorted(tmp_path.iterdir()) == [path]


def test_a_block_that_fails_or_a_rename_that_fails_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_files.replacing(path) as temporary:
        assert temporary.parent == tmp_path and temporary.name.startswith(".weights.bin.") and temporary.exists()
        temporary.write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert path.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [path]
    folder = tmp_path / "a-folder"  # os.replace of a file onto a non-empty folder fails
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        atomic_files.write_bytes(folder, b"new")
    assert sorted(tmp_path.iterdir()) == [folder, path] and [p.name for p in folder.iterdir()] == ["inside"]


def test_the_data_is_flushed_to_disk_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an fsync, a crash soon after the rename can leave the new name with no data (ext4, xfs)."""
    path, log = tmp_path / "checkpoint.pt", []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (log.append(("fsync", os.fstat(fd).st_size)), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (log.append(("replace", Path(b).name)), replace(a, b))[1])
    atomic_files.write_bytes(path, b"12345")
    assert log == [("fsync", 5), ("replace", "checkpoint.pt")] and path.read_bytes() == b"12345"


def test_a_missing_folder_is_refused_before_the_block_runs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), atomic_files.replacing(tmp_path / "missing" / "file"):
        pytest.fail("the block ran")
    assert list(tmp_path.iterdir()) == []


# -- the writers that use it: each left its temporary file behind when its write failed ---------------------------


def test_a_checksum_record_cut_short_keeps_the_earlier_record_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from catrt.reference.checksums import read_checksums, write_checksums

    (tmp_path / "a.bin").write_bytes(b"a")
    write_checksums(tmp_path, ["a.bin"])
    before = read_checksums(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"changed")
    monkeypatch.setattr(Path, "write_text", _half_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_checksums(tmp_path, ["a.bin"])
    monkeypatch.undo()
    assert read_checksums(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "sha256.json"]


def test_a_checkpoint_save_cut_short_keeps_the_earlier_checkpoint_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from catrt.reference import train

    class Trainer:
        def __init__(self, step: int) -> None:
            self.step = step

        def state_dict(self) -> dict[str, Any]:
            return {"step": self.step}

    path = tmp_path / "checkpoint.pt"
    train.save_checkpoint(Trainer(1), path)  # type: ignore[arg-type]
    save = torch.save

    def killed_midway(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        save(obj, file)
        Path(file).write_bytes(Path(file).read_bytes()[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(Trainer(2), path)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1 and sorted(tmp_path.iterdir()) == [path]


def test_a_publish_of_the_reference_weights_cut_short_keeps_the_package_files_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from catrt.reference import train
    from catrt.reference.pipeline import WEIGHTS_DIR

    package = tmp_path / "package"
    shutil.copytree(WEIGHTS_DIR, package)
    for name in train.WEIGHT_FILES:
        (package / name).write_bytes(f"an earlier {name}".encode())
    before = {p.name: p.read_bytes() for p in package.iterdir()}
    monkeypatch.setattr(Path, "write_bytes", _half_then(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        train.publish(WEIGHTS_DIR, package)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in package.iterdir()} == before


def test_saving_the_trained_weights_cut_short_keeps_the_earlier_weights_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`save_weights` wrote each weight file in place: a run stopped mid-write left a half-written safetensors file
    (its digest record still the earlier one's, so the weights were refused, never loadable again)."""
    import torch
    from safetensors.torch import load_file

    from catrt.reference import train

    def trainer(value: float) -> Any:
        module = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(module.weight, value)
        return SimpleNamespace(ema={"transformer": module, "text_encoder": module}, configs={"value": value})

    out = tmp_path / "weights"
    train.save_weights(trainer(1.0), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    save = train.save_file

    def killed_midway(tensors: Any, filename: Any, *args: Any, **kwargs: Any) -> None:
        save(tensors, filename)
        Path(filename).write_bytes(Path(filename).read_bytes()[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_file", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train.save_weights(trainer(2.0), out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert float(load_file(out / train.TRANSFORMER_FILE)["weight"][0, 0]) == 1.0
