"""`catrt inspect engines` / `catrt serve --engines engines` (the store, not one of its bundles) is refused, as any
folder without a manifest is, and the line names the bundles the store holds, so a user sees what to give."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from catrt.cli import main
from catrt.errors import CorruptBundleError
from catrt.manifest import MANIFEST_FILE, read_manifest_data

REFUSED = "is not a catrt engine folder (build one with `catrt build`)"


def store_with(tmp_path: Path, *names: str) -> Path:
    store = tmp_path / "engines"
    store.mkdir()
    for name in names:
        (store / name).mkdir()
        (store / name / MANIFEST_FILE).write_text("{}")
    return store


def test_a_store_given_for_a_bundle_lists_its_bundles(tmp_path: Path) -> None:
    store = store_with(tmp_path, "b-build", "a-build")
    (store / "not-a-bundle").mkdir()  # no manifest: not listed
    (store / ".a-build.tmp-1234").mkdir()  # a build's staging copy: not listed
    (store / ".a-build.tmp-1234" / MANIFEST_FILE).write_text("{}")
    (store / "README.md").write_text("the store's own file")
    with pytest.raises(CorruptBundleError) as refused:
        read_manifest_data(store)
    assert str(refused.value) == (
        f"{store / MANIFEST_FILE} is missing: {store} {REFUSED}; it holds 2 bundle folder(s) (a-build, b-build): "
        f"give one of those, e.g. {store / 'a-build'}")
    assert refused.value.field == MANIFEST_FILE


def test_a_large_store_lists_three_and_says_there_are_more(tmp_path: Path) -> None:
    store = store_with(tmp_path, *(f"build-{i}" for i in range(5)))
    with pytest.raises(CorruptBundleError, match=r"it holds 5 bundle folder\(s\) \(build-0, build-1, build-2, \.\.\.\)"):
        read_manifest_data(store)


def test_a_link_to_a_bundle_folder_is_listed_as_it_loads(tmp_path: Path) -> None:
    """A store of links (`current -> sd3-v5`, or to bundles kept elsewhere) named no bundle: links were left out,
    while a link to a bundle folder loads as that bundle. A link to a folder without a manifest, or to nothing, is not."""
    kept = store_with(tmp_path, "sd3-v5") / "sd3-v5"  # a bundle outside the store
    store = tmp_path / "store"
    store.mkdir()
    (store / "current").symlink_to(kept)
    (store / "empty-link").symlink_to(tmp_path)
    (store / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CorruptBundleError) as refused:
        read_manifest_data(store)
    assert str(refused.value).endswith(f"it holds 1 bundle folder(s) (current): give one of those, e.g. {store / 'current'}")


def test_a_manifest_given_for_its_bundle_names_the_folder_to_give(tmp_path: Path) -> None:
    """`catrt inspect engines/b/manifest.json` said only that engines/b/manifest.json/manifest.json is missing."""
    manifest = store_with(tmp_path, "b") / "b" / MANIFEST_FILE
    with pytest.raises(CorruptBundleError) as refused:
        read_manifest_data(manifest)
    assert str(refused.value) == (f"{manifest / MANIFEST_FILE} is missing: {manifest} {REFUSED}; {manifest} is a bundle's "
                                  f"manifest: give the folder that holds it, {manifest.parent}")


@pytest.mark.parametrize("make", ["empty", "other files", "missing"])
def test_a_folder_without_bundles_reads_as_before(tmp_path: Path, make: str) -> None:
    folder = tmp_path / "folder"
    if make != "missing":
        folder.mkdir()
    if make == "other files":
        (folder / "sub").mkdir()
        (folder / "notes.txt").write_text("x")
    with pytest.raises(CorruptBundleError) as refused:
        read_manifest_data(folder)
    assert str(refused.value) == f"{folder / MANIFEST_FILE} is missing: {folder} {REFUSED}"


def test_inspect_of_the_store_is_one_problem_naming_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = store_with(tmp_path, "tiny-sd3-64x64-b1-s8-t4-a0.30-fp32-eager")
    assert main(["inspect", str(store)]) == 2
    err = capsys.readouterr().err
    assert f"give one of those, e.g. {store / 'tiny-sd3-64x64-b1-s8-t4-a0.30-fp32-eager'}" in err
    assert "Traceback" not in err


def test_a_builds_parent_folders_are_checked_without_being_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`catrt build` asks of every parent of --out whether it is a bundle; a parent without a manifest is answered
    from that alone, never by listing it for the hint above (a parent such as /tmp may hold thousands of entries)."""
    import catrt.build as build
    import catrt.manifest as manifest

    listed: list[str] = []
    real_scandir = manifest.os.scandir

    def recording_scandir(path: object) -> object:
        listed.append(str(path))
        return real_scandir(path)

    monkeypatch.setattr(manifest.os, "scandir", recording_scandir)
    store_with(tmp_path, "a-build")  # the hint would have a bundle to name in tmp_path/engines
    build._check_folder(tmp_path / "engines" / "new", "out_dir")
    assert (tmp_path / "engines" / "new").is_dir() and listed == []


def test_an_out_through_a_link_loop_is_refused_in_one_line(tmp_path: Path) -> None:
    """Walking --out's parents for a bundle resolved the path with pathlib, which raised RuntimeError (a traceback) on
    a link loop; the loop is the folder check's to refuse, naming it."""
    import catrt.build as build
    from catrt.errors import ConfigError

    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(ConfigError, match=r"^out_dir .*loop/x cannot be a folder \(Too many levels of symbolic links\)"):
        build._check_folder(tmp_path / "loop" / "x", "out_dir")


def test_a_bundle_folder_this_user_may_not_search_is_named_unreadable_not_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle folder of another user's with mode 0700: its manifest was reported missing, "not a catrt engine
    folder", where it is there and unreadable. (Stand-in for the OS's refusal: the tests may run as root.)"""
    folder = store_with(tmp_path, "b") / "b"
    lstat = os.lstat

    def refused(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", refused)
    with pytest.raises(CorruptBundleError) as caught:
        read_manifest_data(folder)
    assert str(caught.value) == (f"{folder / MANIFEST_FILE} cannot be read (Permission denied): give this user read access "
                                 f"to {folder} and its files")
    assert caught.value.field == MANIFEST_FILE
