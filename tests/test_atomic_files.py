"""catrt.atomic_files, and the writers that use it: a write that fails or is interrupted midway leaves the earlier
file whole and no temporary file beside it."""

from __future__ import annotations

import errno
import os
import re
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


def _killed_midway(save: Any) -> Any:
    """`save(obj, path_or_file)` that writes, cuts the file to 10 bytes and is interrupted (a Ctrl-C mid-write)."""

    def killed(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        save(obj, path)
        if hasattr(path, "write"):  # an open file (torch.save of a checkpoint)
            path.truncate(10)
        else:
            Path(path).write_bytes(Path(path).read_bytes()[:10])
        raise KeyboardInterrupt

    return killed


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
    monkeypatch.setattr(torch, "save", _killed_midway(torch.save))
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
    monkeypatch.setattr(Path, "write_bytes", _half_then(KeyboardInterrupt()))  # the weights' write, stopped midway
    with pytest.raises(KeyboardInterrupt):
        train.save_weights(trainer(2.0), out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert float(load_file(out / train.TRANSFORMER_FILE)["weight"][0, 0]) == 1.0


# -- what a plain write did, the atomic one does too -------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o666, 0o444], ids=oct)
def test_a_replaced_file_keeps_its_permissions(tmp_path: Path, mode: int) -> None:
    """A plain write keeps the file's mode; the renamed temporary came with the umask's (0o644 under 022), so a report
    or checkpoint made owner-only (0o600) was readable by everyone after the next write."""
    path = tmp_path / "private.md"
    path.write_text("earlier\n")
    os.chmod(path, mode)
    atomic_files.write_text(path, "new\n")
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == mode
    assert sorted(tmp_path.iterdir()) == [path]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root may give a file away")
def test_a_replaced_file_keeps_its_owner_and_group(tmp_path: Path) -> None:
    """A plain write keeps the file's owner and group; the renamed temporary came with the writer's, so a report of a
    shared group (0o660) was shut to that group after the next write, and one a root container replaced in a user's
    bind mount became root's."""
    path = tmp_path / "shared.md"
    path.write_text("earlier\n")
    os.chown(path, 4321, 8765)
    os.chmod(path, 0o660)
    atomic_files.write_text(path, "new\n")
    found = path.stat()
    assert path.read_text() == "new\n" and (found.st_uid, found.st_gid, stat.S_IMODE(found.st_mode)) == (4321, 8765, 0o660)
    assert sorted(tmp_path.iterdir()) == [path]


def test_a_new_file_under_an_owner_only_umask_is_owner_only(tmp_path: Path) -> None:
    mask = os.umask(0o077)
    try:
        atomic_files.write_text(tmp_path / "new.md", "new\n")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "new.md").stat().st_mode) == 0o600


def test_a_link_is_written_through_beside_its_target_and_kept(tmp_path: Path) -> None:
    """A plain write writes through a link at the path; the rename replaced the link itself with a file (the file it
    pointed to, a shared result or a file on another disk, was left stale), its temporary made beside the link."""
    (tmp_path / "kept").mkdir()
    (tmp_path / "here").mkdir()
    target, link = tmp_path / "kept" / "latest.png", tmp_path / "here" / "out.png"
    target.write_bytes(b"earlier")
    os.chmod(target, 0o600)
    link.symlink_to(Path("..") / "kept" / "latest.png")  # relative: from the link's folder
    atomic_files.write_bytes(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["latest.png"]
    assert [p.name for p in (tmp_path / "here").iterdir()] == ["out.png"]
    (tmp_path / "dangling.md").symlink_to(tmp_path / "kept" / "later.md")  # a plain write makes the file it names
    atomic_files.write_text(tmp_path / "dangling.md", "made\n")
    assert (tmp_path / "dangling.md").is_symlink() and (tmp_path / "kept" / "later.md").read_text() == "made\n"


@pytest.mark.parametrize("name", ["a" * 255, "é" * 127, "a" * 241 + ".png"], ids=["255-ascii", "254-utf8", "245"])
def test_a_name_a_plain_write_takes_is_taken(tmp_path: Path, name: str) -> None:
    """`.<name>.<8 hex>.tmp` is 14 bytes longer than the name: a name over 241 bytes (a plain write takes 255) failed
    as "File name too long". The temporary's name is cut to fit (whole characters, never half a UTF-8 one)."""
    path = tmp_path / name
    path.write_text("earlier\n")  # the filesystem takes it
    with atomic_files.replacing(path) as temporary:
        assert len(os.fsencode(temporary.name)) <= 255 and temporary.name.endswith(".tmp")
        temporary.write_text("new\n")
    assert path.read_text() == "new\n" and sorted(tmp_path.iterdir()) == [path]


def test_a_name_over_the_limit_is_refused_before_the_block_runs(tmp_path: Path) -> None:
    """Cut to fit, the temporary of a 256-byte name was made and written, and only the rename failed, after the work
    (generate: after the whole generation); it fails first, as a plain write does."""
    with pytest.raises(OSError, match="File name too long") as caught, atomic_files.replacing(tmp_path / ("a" * 256)):
        pytest.fail("the block ran")
    assert caught.value.errno == errno.ENAMETOOLONG and list(tmp_path.iterdir()) == []


def test_a_loop_of_links_is_refused_before_the_block_runs(tmp_path: Path) -> None:
    """A plain write fails on a loop of links (ELOOP); the atomic one staged, ran the block and failed only at its
    rename, after the work."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(OSError, match="Too many levels of symbolic links") as caught, atomic_files.replacing(tmp_path / "a"):
        pytest.fail("the block ran")
    assert caught.value.errno == errno.ELOOP and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_the_flush_takes_a_descriptor_that_may_write_where_the_os_asks_for_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush opened the temporary read-only: Windows' fsync (FlushFileBuffers) refuses such a handle with EBADF, so
    every replaced file failed there. An fsync that refuses read-only descriptors, as Windows' does, stands in for it."""
    fcntl = pytest.importorskip("fcntl")  # POSIX: reads a descriptor's access mode

    fsync, flushed = os.fsync, []

    def windows_fsync(fd: int) -> None:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        flushed.append(os.fstat(fd).st_size)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", windows_fsync)
    atomic_files.write_bytes(tmp_path / "plan", b"12345")
    assert (tmp_path / "plan").read_bytes() == b"12345" and flushed == [5] and sorted(tmp_path.iterdir()) == [tmp_path / "plan"]


# -- what a killed writer leaves -----------------------------------------------------------------------------------


def _killed_writer(path: Path) -> Path:
    """The temporary file a writer of `path` SIGKILLed mid-write leaves (no `finally` runs): a real process, killed."""
    import signal
    import subprocess
    import sys

    script = ("import os, signal, sys\nfrom pathlib import Path\nfrom catrt import atomic_files\n"
              "temporary = atomic_files.stage(Path(sys.argv[1]))\ntemporary.write_bytes(b'half a checkpoint')\n"
              "print(temporary, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = Path(done.stdout.strip())
    assert left.read_bytes() == b"half a checkpoint"
    return left


@pytest.mark.parametrize("name", ["checkpoint.pt", "a" * 255], ids=["short", "255-bytes"])
def test_a_killed_writers_temporary_is_removed_by_the_next_write_of_its_target(tmp_path: Path, name: str) -> None:
    """A SIGKILL mid-write left `.<name>.<random>.tmp` (up to a checkpoint's size) beside the target for ever. Named
    `.<name>.catrt-<host>-<random>.tmp` and locked while its writer lives, it is removed at the next write of the
    same target; a live writer's, another target's and another host's are left alone."""
    pytest.importorskip("fcntl")  # POSIX: the locks tell a killed writer's file from a live one's
    path = tmp_path / name
    path.write_bytes(b"earlier")
    left = _killed_writer(path)
    assert re.fullmatch(r"\.a*(checkpoint\.pt)?\.catrt-[0-9a-f]{8}-[0-9a-f]{8}\.tmp", left.name)
    assert left.name.split(".catrt-")[1][:8] == atomic_files.HOST
    other_target = _killed_writer(tmp_path / "other.pt")
    other_host = left.with_name(left.name.replace(f".catrt-{atomic_files.HOST}-", ".catrt-0badc0de-"))
    other_host.write_bytes(b"another host's write, maybe live: nothing here can tell")
    live = atomic_files.stage(path)  # a write of the same target under way here
    try:
        atomic_files.write_bytes(path, b"new")
        assert path.read_bytes() == b"new" and not left.exists()
        assert live.exists() and other_target.exists() and other_host.exists()
    finally:
        atomic_files.discard(live)
    assert sorted(tmp_path.iterdir()) == sorted([path, other_host, other_target])


def test_a_temporary_taken_between_its_making_and_its_lock_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another write's cleanup may find a new temporary file before its writer locks it, take its lock and remove it:
    the writer then holds an unnamed file, so it makes another."""
    fcntl = pytest.importorskip("fcntl")
    flock, taken = fcntl.flock, []

    def cleanup_first(descriptor: int, operation: int) -> None:
        if not taken:  # the first new temporary, removed as an abandoned one would be
            taken.append(next(p for p in tmp_path.iterdir() if p.name.endswith(".tmp")))
            taken[0].unlink()
        flock(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", cleanup_first)
    with atomic_files.replacing(tmp_path / "report.md") as temporary:
        assert temporary != taken[0] and temporary.exists()
        temporary.write_text("new\n")
    assert (tmp_path / "report.md").read_text() == "new\n" and sorted(tmp_path.iterdir()) == [tmp_path / "report.md"]


def test_ctrl_c_while_a_new_temporary_waits_for_its_lock_leaves_no_file_and_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock of a new temporary file waits while another write's cleanup holds it: Ctrl-C there left the file
    (locked by this process's leaked descriptor, so no cleanup could take it while the process lived) and the
    descriptor open."""
    fcntl = pytest.importorskip("fcntl")

    def interrupted(descriptor: int, operation: int) -> None:
        raise KeyboardInterrupt

    path = tmp_path / "report.md"
    path.write_text("earlier\n")
    before = sorted(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    monkeypatch.setattr(fcntl, "flock", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_files.write_text(path, "new\n")
    assert path.read_text() == "earlier\n" and sorted(tmp_path.iterdir()) == [path] and not atomic_files._HELD
    if before is not None:
        assert sorted(os.listdir("/proc/self/fd")) == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_device_or_fifo_at_the_target_is_written_into_never_replaced(tmp_path: Path) -> None:
    """A link to a device (`report.md -> /dev/null`, or `--out /dev/null` itself) was renamed onto: the device was
    replaced by a plain file (as root, /dev/null itself). A plain write writes into it; so does this. A FIFO stands in
    for the device (no root needed to make one)."""
    fifo = tmp_path / "sink"
    os.mkfifo(fifo)
    link = tmp_path / "report.md"
    link.symlink_to(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader there, so the write's open does not wait
    try:
        atomic_files.write_text(link, "the report\n")
        assert os.read(reader, 100) == b"the report\n"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and link.is_symlink()
    assert sorted(tmp_path.iterdir()) == sorted([fifo, link]) and not atomic_files._HELD


# -- a writable file in a read-only folder ------------------------------------------------------------------------


def refuse_new_files(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int = errno.EACCES) -> None:
    """`folder` as a read-only folder is to any user but root (the tests may run as root): no file can be made in it,
    while the files already there stay writable."""
    original = os.open

    def guarded(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT and Path(os.path.abspath(path)).parent == folder.absolute():
            raise OSError(code, os.strerror(code), str(path))
        return original(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS], ids=["read-only-folder", "read-only-filesystem"])
def test_a_writable_file_in_a_folder_that_takes_no_new_file_is_explained_by_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """The file itself is writable, so "cannot be written (Permission denied)" alone did not explain why: a file is
    replaced by a new one beside it, which the folder refuses. Nothing falls back to a write in place."""
    path = tmp_path / "report.md"
    path.write_text("earlier\n")
    refuse_new_files(monkeypatch, tmp_path, code)
    with pytest.raises(OSError) as refused:
        atomic_files.write_text(path, "new\n")
    assert path.read_text() == "earlier\n" and sorted(tmp_path.iterdir()) == [path]
    assert atomic_files.folder_refusal(path, refused.value) == (
        f"its folder {tmp_path} is not writable ({os.strerror(code)}), though the file is: a file is replaced by a new "
        f"one written beside it and renamed onto it, never rewritten in place (an interrupted write would leave it "
        f"half-written); make {tmp_path} writable or pick another folder")
    assert atomic_files.folder_refusal(tmp_path / "new.md", refused.value) is None  # no file: the plain refusal says it
    assert atomic_files.folder_refusal(path, OSError(errno.ENOSPC, "No space left on device")) is None


# -- another user's file in a sticky folder (/tmp) ----------------------------------------------------------------


def test_another_users_file_in_a_sticky_folder_is_refused_and_any_other_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a sticky folder only the file's owner, the folder's owner or root may rename onto a file: the temporary file
    beside it was made, and the write failed at the rename, after the work. The tests run as root, who may replace any
    file, so another user is simulated: the folder is really sticky and root's, the file root's, and the process's
    effective uid (os.geteuid) is made 1000's."""
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o1777)
    path = folder / "image.png"
    path.write_bytes(b"another user's image")
    owner = os.stat(path).st_uid
    for uid, refused in ((1000, True), (owner, False), (0, False)):  # another user; the file's owner; root
        monkeypatch.setattr(os, "geteuid", lambda uid=uid: uid)
        assert (atomic_files.sticky_refusal(path) is not None) == refused, uid
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert atomic_files.sticky_refusal(path) == (
        f"it belongs to another user (uid {owner}) and its folder {folder} is sticky (as /tmp is): only the file's "
        "owner may replace or remove it there; write it under another name, or have its owner remove it")
    assert atomic_files.sticky_refusal(folder / "new.png") is None  # nothing there: a new file may be made
    link = tmp_path / "link.png"
    link.symlink_to(path)
    assert atomic_files.sticky_refusal(link) is not None  # a link is written through: its target is what is replaced
    os.chmod(folder, 0o777)
    assert atomic_files.sticky_refusal(path) is None  # not sticky: anyone who may write the folder may replace it


# -- the one up-front check of every writer of a user's path ------------------------------------------------------


def test_replace_refusal_finds_a_sticky_folders_file_and_a_read_only_folder_before_any_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`replace_refusal` is what `generate`, `compare`, `build`, the reference training and the bench scripts run
    before their work: another user's file or folder in a sticky folder, and a writable file in a folder that takes no
    new file, each a sentence; any other failure raised for the caller's line; nothing left behind."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    image, bundle = shared / "image.png", shared / "bundle"
    image.write_bytes(b"another user's image")
    bundle.mkdir()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    owner = os.stat(image).st_uid
    assert atomic_files.replace_refusal(image) == atomic_files.sticky_refusal(image)
    assert atomic_files.replace_refusal(bundle, "build into another --out") == (
        f"it belongs to another user (uid {owner}) and its folder {shared} is sticky (as /tmp is): only the file's "
        "owner may replace or remove it there; build into another --out")
    assert atomic_files.replace_refusal(shared / "new.png") is None
    os.chmod(shared, 0o777)
    assert atomic_files.replace_refusal(image) is None and atomic_files.replace_refusal(bundle) is None
    report = tmp_path / "report.md"
    report.write_text("earlier\n")
    refuse_new_files(monkeypatch, tmp_path)
    assert atomic_files.replace_refusal(report, "give another --out").endswith(
        f"make {tmp_path} writable or give another --out")
    with pytest.raises(PermissionError):  # no file there: the caller's own "cannot be written" line
        atomic_files.replace_refusal(tmp_path / "new.md")
    assert sorted(tmp_path.iterdir()) == [report, shared] and sorted(shared.iterdir()) == [bundle, image]
    assert not atomic_files._HELD


def _planted(tmp_path: Path, name: str) -> tuple[Path, Path, Path, Path]:
    """A sticky, world-writable `shared/` (as /tmp is), `home/.bashrc` (the victim's file) and `shared/<name>`, a link
    to it made by another user (uid 1000, by lchown: the tests run as root): shared, home, victim, planted."""
    if os.geteuid() != 0:
        pytest.skip("giving the link another user's uid (lchown) needs root, as the tests run")
    shared, home = tmp_path / "shared", tmp_path / "home"
    shared.mkdir()
    home.mkdir()
    os.chmod(shared, 0o1777)
    victim = home / ".bashrc"
    victim.write_text("the victim's file\n")
    planted = shared / name
    planted.symlink_to(victim)
    os.lchown(planted, 1000, 1000)
    return shared, home, victim, planted


def test_a_link_another_user_planted_in_a_sticky_folder_is_not_written_through(tmp_path: Path) -> None:
    """`/tmp/report.md` -> `~/.bashrc`, made by another user before this one's `--out /tmp/report.md`: resolving the
    link itself, the writer replaced the file of the planter's choosing, where a plain write is refused there (Linux's
    fs.protected_symlinks, on in most distributions). The folder is really sticky and world-writable and the link
    really another user's (lchown: the tests run as root); this user's own links, the folder owner's, and any link in
    a folder that is not sticky are written through as before."""
    shared, home, victim, planted = _planted(tmp_path, "report.md")
    with pytest.raises(PermissionError) as refused:
        atomic_files.write_text(planted, "a report\n")
    assert refused.value.errno == errno.EACCES and f"{planted} is a link another user (uid 1000) made" in str(refused.value)
    assert atomic_files.replace_refusal(planted, "give another --out") == (
        f"{planted} is a link another user (uid 1000) made in the sticky folder {shared} (as /tmp is), which a write does "
        "not follow there (Linux's fs.protected_symlinks): remove the link or give another --out")
    chained = shared / "chained.md"  # a link of this user's to the planted one: the chain is followed link by link
    chained.symlink_to(planted.name)
    with pytest.raises(PermissionError):
        atomic_files.write_text(chained, "a report\n")
    assert victim.read_text() == "the victim's file\n" and sorted(home.iterdir()) == [victim]
    own = shared / "own.md"  # this user's link: written through
    own.symlink_to(victim)
    assert atomic_files.replace_refusal(own) is None
    atomic_files.write_text(own, "mine\n")
    assert victim.read_text() == "mine\n" and own.is_symlink()
    os.chmod(shared, 0o777)  # not sticky: anyone may replace the link anyway, and a plain write follows it
    atomic_files.write_text(planted, "followed\n")
    assert victim.read_text() == "followed\n" and sorted(home.iterdir()) == [victim]
    assert sorted(p.name for p in shared.iterdir()) == ["chained.md", "own.md", "report.md"]


def test_a_planted_link_reached_through_a_relative_link_or_a_linked_folder_is_not_written_through(tmp_path: Path) -> None:
    """Every link a write follows is checked, as the kernel checks each: `proj/report.md -> ../planted.md` with
    `proj -> shared/sub` leads to `shared/planted.md` (each `..` from the folder a link led to), which the chain's
    walk took lexically for `proj/../planted.md` (nothing there) while `realpath` followed the planted link; and a
    planted link to a folder on the way (`shared/dir -> home`, then `dir/.bashrc`) was never looked at. A link of this
    user's to a folder is still followed."""
    shared, home, victim, planted = _planted(tmp_path, "planted.md")
    (shared / "sub").mkdir()
    proj = home / "proj"
    proj.symlink_to(shared / "sub")  # this user's own links, both
    (shared / "sub" / "report.md").symlink_to(Path("..") / "planted.md")
    out = proj / "report.md"
    assert atomic_files.planted_link(out) == (planted, 1000, shared)
    with pytest.raises(PermissionError):
        atomic_files.write_text(out, "a report\n")
    (shared / "dir").symlink_to(home)  # another user's link to a folder, then a link of this user's through it
    os.lchown(shared / "dir", 1000, 1000)
    (home / "via.md").symlink_to(shared / "dir" / ".bashrc")
    assert atomic_files.planted_link(home / "via.md") == (shared / "dir", 1000, shared)
    with pytest.raises(PermissionError):
        atomic_files.write_text(home / "via.md", "a report\n")
    assert victim.read_text() == "the victim's file\n" and sorted(p.name for p in home.iterdir()) == [".bashrc", "proj",
                                                                                                    "via.md"]
    os.lchown(shared / "dir", 0, 0)  # the folder owner's link (root's, as the folder is): followed
    atomic_files.write_text(home / "via.md", "mine\n")
    assert victim.read_text() == "mine\n" and (home / "via.md").is_symlink()
