"""Two `catrt build` runs of one build name at once (two terminals, a CI matrix): each exports and stages in its own
temporary folders and publishes whole; the later replaces the earlier, unless it is of another model folder of that
name, which is refused naming the folder; an export never replaces a bundle another build published where it goes."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import catrt.build as build_module
import catrt.publish as publish
from catrt.build import build_engines
from catrt.build_config import BuildConfig
from catrt.errors import ConfigError
from catrt.export import BACKEND_BUILDS, BackendBuild
from catrt.integrity import check_integrity
from catrt.manifest import read_manifest_data
from catrt.publish import staged_folder

#: Seconds after which a thread that should have got somewhere is taken as hung: a bound for a hang, never a pace.
HANG = 600
SETTINGS = {"height": 32, "width": 48, "steps": 6, "t0": 3, "max_sequence_length": 8, "backend": "onnxruntime"}


def _two_model_folders_of_one_name(pipe: Any, root: Path) -> tuple[Path, Path]:
    """root/a/model and root/b/model (one build name), the second's transformer weights changed."""
    pipe.save_pretrained(root / "a" / "model")
    kept = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}
    try:
        with torch.no_grad():
            for parameter in pipe.transformer.parameters():
                parameter.mul_(1.5)
        pipe.save_pretrained(root / "b" / "model")
    finally:
        pipe.transformer.load_state_dict(kept)
    return root / "a" / "model", root / "b" / "model"


def _in_threads(monkeypatch: pytest.MonkeyPatch, builds: list[Callable[[], Path]]) -> list[Path | BaseException]:
    """Run `builds` at once, each in its thread, all exported before any writes its engine from its export; the model
    loads and the exports themselves take turns (diffusers' loading and torch's ONNX exporter patch global state, which
    two processes do not share). The bounds only stop a hung build: on a loaded machine the exports may take minutes."""
    turns, together = threading.Lock(), threading.Barrier(len(builds), timeout=HANG)
    load, export, backend = build_module.load_pipeline, build_module.export_graphs, BACKEND_BUILDS["onnxruntime"]

    def one_at_a_time(work: Callable[..., Any]) -> Callable[..., Any]:
        def taking_turns(*args: Any, **kwargs: Any) -> Any:
            with turns:
                return work(*args, **kwargs)
        return taking_turns

    def all_exported(*args: Any) -> None:
        together.wait()
        backend.write_engine(*args)

    monkeypatch.setattr(build_module, "load_pipeline", one_at_a_time(load))
    monkeypatch.setattr(build_module, "export_graphs", one_at_a_time(export))
    monkeypatch.setitem(BACKEND_BUILDS, "onnxruntime", BackendBuild(needs_onnx=True, write_engine=all_exported))
    results: list[Path | BaseException] = [RuntimeError("not run")] * len(builds)

    def run(index: int) -> None:
        try:
            results[index] = builds[index]()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            results[index] = error
            together.abort()  # a build that failed before the barrier does not leave the others waiting there

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(builds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=HANG)
        assert not thread.is_alive(), "a build hung"
    return results


def _left_over(*folders: Path) -> list[str]:
    """Staging folders (`.<name>.tmp-*`) left in `folders`."""
    return [path.name for folder in folders for path in folder.iterdir() if path.name.startswith(".")]


def test_a_build_of_another_model_folder_of_that_name_at_once_is_refused_not_mixed(
    tiny_pipelines: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both builds published their ONNX export to export/<name> and wrote their engine from there: the one whose export
    the other replaced built the other model's graphs and failed verification ("differs from the eager adapter"), or
    lost files swapped out and removed under its copy. Each now writes its engine from its own export: the first to
    publish wins, the second is refused naming the folder and both models."""
    models = _two_model_folders_of_one_name(tiny_pipelines["tiny-sd3"], tmp_path)
    engines, export = tmp_path / "engines", tmp_path / "export"
    builds = [lambda model=model: build_engines(BuildConfig(str(model), **SETTINGS), out_dir=engines, export_dir=export,
                                                progress=False) for model in models]
    results = _in_threads(monkeypatch, builds)
    (published,) = [result for result in results if isinstance(result, Path)]
    (refused,) = [result for result in results if not isinstance(result, Path)]
    assert isinstance(refused, ConfigError), repr(refused)
    winner = read_manifest_data(published)["build"]["model"]
    loser = next(str(model) for model in models if str(model) != winner)
    assert str(refused).startswith(f"{published} holds a build of model '{winner}', this one is of '{loser}': it would "
                                   "replace it; build into another --out")
    assert check_integrity(published).problems == [] and _left_over(engines, export) == []


def test_a_publish_checks_and_swaps_in_one_step_against_another_of_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each publish checked what was at its name, then swapped: two finishing together both passed their checks before
    either swapped, and both published, the later over a bundle its check never saw (CI saw two builds of two model
    folders both published). The check and the swap are now one step: the second waits, sees the first, and refuses.

    The first publish's check goes on once the second has run its own check (the race) or waits for the folder's lock
    (the fix), whichever the code does: no pause that assumes the other thread got there meanwhile."""
    final, checked, second_went_on = tmp_path / "bundle", threading.Event(), threading.Event()
    lock = publish._lock

    def noting_a_wait(folder: Path, **options: bool) -> int | None:
        if threading.current_thread() is threading.main_thread() and folder == tmp_path:
            probe = os.open(folder, os.O_RDONLY)  # an open file description of its own: refused while the first holds it
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                second_went_on.set()
            finally:
                os.close(probe)
        return lock(folder, **options)

    def first_check() -> None:
        checked.set()
        assert second_went_on.wait(timeout=HANG)

    def second_check() -> None:
        second_went_on.set()
        if (final / "owner").exists():
            raise ConfigError(f"{final} holds {(final / 'owner').read_text()}'s bundle")

    def publish_folder(owner: str, check: Callable[[], None]) -> None:
        with staged_folder(final, check=check) as staging:
            (staging / "owner").write_text(owner)

    monkeypatch.setattr(publish, "_lock", noting_a_wait)
    first = threading.Thread(target=publish_folder, args=("first", first_check))
    first.start()
    try:
        assert checked.wait(timeout=HANG)
        with pytest.raises(ConfigError, match=f"^{final} holds first's bundle$"):
            publish_folder("second", second_check)
    finally:
        second_went_on.set()  # a failure above must not leave the first thread waiting
        first.join(timeout=HANG)
    assert not first.is_alive() and (final / "owner").read_text() == "first" and _left_over(tmp_path) == []


def test_a_bundle_published_where_the_export_goes_while_it_exports_is_refused_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build whose --export-dir holds a bundle of its name is refused before it exports; one published there while
    it exported (another build, its --out this --export-dir) was replaced by the export all the same: a whole bundle
    lost. The check runs again with the export's swap, under the folder's lock."""
    config = BuildConfig("tiny-sd3", **SETTINGS)
    engines, export = tmp_path / "engines", tmp_path / "export"
    bundle = export / config.build_name()
    real_export = build_module.export_graphs

    def another_build_publishes_meanwhile(*args: Any, **kwargs: Any) -> Any:
        bundle.mkdir(parents=True)
        (bundle / "manifest.json").write_text("another build's")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(build_module, "export_graphs", another_build_publishes_meanwhile)
    with pytest.raises(ConfigError) as refused:
        build_engines(config, out_dir=engines, export_dir=export, progress=False)
    assert str(refused.value) == (f"export_dir {export} holds the engine bundle {bundle.name}: the ONNX export would take "
                                  "its place; give another --export-dir (the default is export)")
    assert [path.name for path in bundle.iterdir()] == ["manifest.json"]
    assert (bundle / "manifest.json").read_text() == "another build's" and _left_over(export) == []
    assert not engines.exists() or list(engines.iterdir()) == []


def test_a_publish_that_waits_for_its_folders_lock_says_so(tmp_path: Path) -> None:
    """Any user who may read a folder may lock it (`flock -x /tmp sleep 1d`): a build publishing there, or a compare
    moving its results there, then waited at its last step without a word, for as long as the lock was held. A line
    names the folder and the wait, and the publish goes on once the lock is let go."""
    warned = threading.Event()

    class Noting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("waiting for the lock on"):
                warned.set()
                messages.append(record.getMessage())

    messages: list[str] = []
    holder = os.open(tmp_path, os.O_RDONLY)  # another process's lock: an open file description of its own
    fcntl.flock(holder, fcntl.LOCK_EX)
    handler = Noting()
    logging.getLogger(publish.__name__).addHandler(handler)
    final = tmp_path / "bundle"

    def publish_folder() -> None:
        with staged_folder(final) as staging:
            (staging / "owner").write_text("mine")

    publishing = threading.Thread(target=publish_folder)
    try:
        publishing.start()
        assert warned.wait(timeout=HANG)
        assert not final.exists()
    finally:
        os.close(holder)
        publishing.join(timeout=HANG)
        logging.getLogger(publish.__name__).removeHandler(handler)
    assert not publishing.is_alive() and (final / "owner").read_text() == "mine" and _left_over(tmp_path) == []
    assert messages[0] == (f"waiting for the lock on {tmp_path}: another catrt build is publishing there or a catrt "
                           f"compare moving its results there, or another process holds it (lsof {tmp_path} names it); "
                           "this goes on once it lets go")


def test_a_lock_let_go_within_the_quiet_wait_is_taken_without_a_word(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two builds of other names publishing into one engines/ take turns at the folder's lock for the instant of a
    swap: that wait is not announced (it warned at every such turn). The holder lets go at the waiter's first pause."""
    holder = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    pauses: list[float] = []

    def let_go(seconds: float) -> None:
        pauses.append(seconds)
        fcntl.flock(holder, fcntl.LOCK_UN)

    class LetGoOnTheWarning(logging.Handler):  # without the quiet wait: the warning, then no hang
        def emit(self, record: logging.LogRecord) -> None:
            fcntl.flock(holder, fcntl.LOCK_UN)

    monkeypatch.setattr(publish.time, "sleep", let_go)
    handler = LetGoOnTheWarning(level=logging.WARNING)
    logging.getLogger(publish.__name__).addHandler(handler)
    try:
        with caplog.at_level("WARNING", logger=publish.__name__), staged_folder(tmp_path / "bundle") as staging:
            (staging / "owner").write_text("mine")
    finally:
        logging.getLogger(publish.__name__).removeHandler(handler)
        os.close(holder)
    assert pauses and not [record for record in caplog.records if "waiting for the lock" in record.getMessage()]
    assert (tmp_path / "bundle" / "owner").read_text() == "mine"
