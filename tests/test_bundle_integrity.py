"""Bundle integrity: every edited, damaged or foreign bundle is refused at load, before any backend runs.

One signed tiny ONNX Runtime build is shared by the module; each test damages its own copy. Without
a key the signature is not checked, so the edits below are caught by the integrity checks alone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import catrt
import catrt.bundle
import catrt.manifest
from catrt import file_checks, integrity, key_files
from catrt.build import build_engines
from catrt.build_config import BuildConfig
from catrt.bundle import bundle_problems, verify_bundle
from catrt.cli import main
from catrt.engines import ENGINES
from catrt.errors import BuildError, ConfigError, CorruptBundleError, EngineMismatchError, UnknownModelError
from catrt.integrity import BUNDLE_FILES, BUNDLE_KEY_ENV, bundle_files, check_integrity, sign_manifest
from catrt.publish import staged_folder
from catrt.manifest import FORMAT_VERSION, MANIFEST_FILE, SEAL_FIELD, build_seal, file_digest
from tests.conftest import after_a_tick, call_kwargs

KEY = b"integrity-test-key"
# As small as a tiny-sd3 build gets: a 48x32 (WxH) image is a 6x4 latent, N = 6 tokens, k = ceil(0.3 * 6) = 2.
CONFIG = BuildConfig("tiny-sd3", height=32, width=48, batch=1, steps=6, t0=3, alphas=(0.3,), max_sequence_length=8, backend="onnxruntime")


@pytest.fixture(scope="module")
def signed_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    return build_engines(CONFIG, out_dir=root / "engines", export_dir=root / "export", progress=False, sign_key=KEY)


@pytest.fixture()
def bundle(signed_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the signed build that a test may damage; no bundle key in the environment."""
    monkeypatch.delenv(BUNDLE_KEY_ENV, raising=False)
    return Path(shutil.copytree(signed_build, tmp_path / signed_build.name))


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_FILE).read_text())


def _edit(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = _manifest(folder)
    edit(data)
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


def _resealed(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """`edit`, then the seal rewritten to match: an edit by someone who knows how manifests are sealed."""

    def edit_and_reseal(data: dict[str, Any]) -> None:
        edit(data)
        data[SEAL_FIELD] = build_seal(data["build"])

    return edit_and_reseal


def _flip_byte(path: Path, offset: int = 100) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0xFF]))


def _refused(folder: Path, match: str, field: str, key: bytes | None = None) -> CorruptBundleError:
    """verify_bundle (what catrt.load runs first) refuses the bundle with this message and field."""
    with pytest.raises(CorruptBundleError, match=match) as caught:
        verify_bundle(folder, key)
    assert caught.value.field == field
    return caught.value


# -- an intact bundle --------------------------------------------------------------------------


def test_intact_signed_bundle_loads_with_its_key_and_without_one(bundle: Path) -> None:
    data = _manifest(bundle)
    assert data["format"] == FORMAT_VERSION == 3
    assert data["signature"] == sign_manifest(data, KEY)
    assert sorted(data["files"]) == sorted(bundle_files("onnxruntime", ["context", "full", "pruned-k2"]))
    assert bundle.name == "tiny-sd3-48x32-b1-s6-t3-a0.30-l8-fp32-onnxruntime"  # WxH
    assert check_integrity(bundle).problems == [] and check_integrity(bundle, KEY).problems == []
    assert verify_bundle(bundle).alphas == [  # no key: the signature is not checked
        {"alpha": 0.3, "k": 2, "graph": "pruned-k2", "max_relative_error": data["alphas"][0]["max_relative_error"]}
    ]
    fast = catrt.load(bundle, key=KEY)
    assert fast.manifest.signature == data["signature"]
    assert fast(["a red circle"], output_type="latent").images.shape == (1, 16, 4, 6)


def test_a_build_published_while_a_bundle_loads_is_loaded_whole_never_mixed(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rebuild of the same name swapped in (publish.py) after load's checks, while the model loads: the engine read
    the new build's files under the earlier build's manifest. Now the folder in place is checked and loaded whole."""
    rebuilt = Path(shutil.copytree(bundle, tmp_path / "rebuilt"))

    def remeasured(data: dict[str, Any]) -> None:  # the same graphs, verified to other errors
        errors = data["verification"]["max_relative_error"]
        errors.update({graph: error / 2 for graph, error in errors.items()})
        data["alphas"][0]["max_relative_error"] /= 2
        data["signature"] = sign_manifest(data, KEY)

    _edit(rebuilt, remeasured)
    assert check_integrity(rebuilt, KEY).problems == []
    real = catrt.bundle.load_pipeline
    published = []

    def load_while_rebuilt(*args: Any, **kwargs: Any) -> Any:
        if not published:
            with staged_folder(bundle) as staging:
                shutil.copytree(rebuilt, staging, dirs_exist_ok=True)
            published.append(bundle)
        return real(*args, **kwargs)

    monkeypatch.setattr(catrt.bundle, "load_pipeline", load_while_rebuilt)
    fast = catrt.load(bundle, key=KEY)
    assert published and fast.manifest.alphas == _manifest(bundle)["alphas"] == _manifest(rebuilt)["alphas"]
    assert fast.manifest.signature == _manifest(rebuilt)["signature"]
    assert fast(["a red circle"], output_type="latent").images.shape == (1, 16, 4, 6)


def test_a_bundle_replaced_while_its_files_are_checked_is_checked_again_not_refused(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The digests read half from each build are refused as corrupt; the folder swapped meanwhile is read again. A
    folder that did not change keeps its refusal."""
    rebuilt = Path(shutil.copytree(bundle, tmp_path / "rebuilt"))
    real = catrt.bundle.verify_bundle
    calls = []

    def checked_while_rebuilt(folder: Path, key: bytes | None = None) -> Any:
        calls.append(folder)
        if len(calls) == 1:
            with staged_folder(bundle) as staging:
                shutil.copytree(rebuilt, staging, dirs_exist_ok=True)
            raise CorruptBundleError("weights.bin has another sha256 than its manifest records", field="weights.bin")
        return real(folder, key)

    monkeypatch.setattr(catrt.bundle, "verify_bundle", checked_while_rebuilt)
    assert catrt.load(bundle).manifest.alphas == _manifest(rebuilt)["alphas"] and len(calls) == 2
    _flip_byte(bundle / "weights.bin")
    with pytest.raises(CorruptBundleError, match="weights.bin"):
        catrt.load(bundle)
    assert len(calls) == 3


def test_inspect_of_a_bundle_replaced_while_it_is_checked_reports_the_new_one_not_a_mix(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """`catrt inspect` read half of each build's files as a corrupt bundle when one was published meanwhile; the
    folder swapped meanwhile is checked again. A folder that did not change keeps its problems, read once."""
    rebuilt = Path(shutil.copytree(bundle, tmp_path / "rebuilt"))
    real = catrt.bundle.check_integrity
    calls = []

    def checked_while_rebuilt(folder: Path, key: bytes | None = None) -> Any:
        calls.append(folder)
        report = real(folder, key)
        if len(calls) == 1:
            with staged_folder(bundle) as staging:
                shutil.copytree(rebuilt, staging, dirs_exist_ok=True)
            report.problems.append(CorruptBundleError("weights.bin has another sha256 than its manifest records", field="weights.bin"))
        return report

    monkeypatch.setattr(catrt.bundle, "check_integrity", checked_while_rebuilt)
    assert main(["inspect", str(bundle)]) == 0 and len(calls) == 2
    assert "files and machine: OK" in capsys.readouterr().out
    _flip_byte(bundle / "weights.bin")
    manifest, problems = bundle_problems(bundle)
    assert manifest is not None and [problem.field for problem in problems] == ["weights.bin"] and len(calls) == 3


def test_a_one_image_non_square_bundle_matches_the_eager_runtime(signed_build: Path, tiny_pipelines: dict[str, Any]) -> None:
    """Batch 1 at 48x32 (WxH), where the engine tests build batch 2 at 96x64: ONNX Runtime equals eager to float rounding."""
    pipe = tiny_pipelines["tiny-sd3"]
    settings = {"prompt": "a red circle", "height": 32, "width": 48, "num_inference_steps": 6, "max_sequence_length": 8}
    expected = catrt.accelerate(pipe, catrt.CATConfig(alpha=0.3, t0=3))(**call_kwargs(pipe, **settings)).images
    fast = catrt.load(signed_build)
    fast.set_progress_bar_config(disable=True)
    got = fast(**call_kwargs(pipe, **settings)).images
    assert got.shape == expected.shape == (1, 16, 4, 6)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4


def test_every_backend_declares_its_bundle_files() -> None:
    assert set(BUNDLE_FILES) == set(ENGINES)
    assert bundle_files("tensorrt", ["context", "full", "pruned-k2", "pruned-k5"]) == (
        "context.plan", "full.plan", "pruned-k2.plan", "pruned-k5.plan"
    )
    assert bundle_files("eager", ["context", "full", "pruned-k2"]) == ()


def test_build_names_put_the_width_first() -> None:
    assert BuildConfig("tiny-sd3", height=64, width=96, steps=12, t0=4).build_name().startswith("tiny-sd3-96x64-b1-s12-t4-")


def test_builds_of_other_alphas_never_share_a_name() -> None:
    """Two decimals where they are exact; more where the alpha has them (a build of 0.304 replaced one of 0.301)."""
    def name(*alphas: float) -> str:
        return BuildConfig("tiny-sd3", height=64, width=96, steps=12, t0=4, alphas=alphas).build_name()

    assert "-a0.30_0.50_1.00-" in name(0.3, 0.5, 1.0)
    assert "-a0.301-" in name(0.301) and "-a0.304-" in name(0.304) and "-a1e-09-" in name(1e-9)


# -- files -------------------------------------------------------------------------------------


def test_empty_files_with_a_modified_weight_file_is_refused(bundle: Path) -> None:
    _edit(bundle, lambda m: m.update(files={}, total_size=0))
    _flip_byte(bundle / "weights.bin")
    _refused(bundle, r"engine file context\.onnx is not listed in manifest\.json", "context.onnx")
    messages = [str(problem) for problem in check_integrity(bundle).problems]
    assert any("engine file weights.bin is not listed" in m for m in messages)
    assert not any("holds weights.bin" in m for m in messages)  # named once


def test_a_deleted_graph_with_its_entry_is_refused(bundle: Path) -> None:
    (bundle / "pruned-k2.onnx").unlink()
    _edit(bundle, lambda m: m["files"].pop("pruned-k2.onnx"))
    _refused(bundle, r"engine file pruned-k2\.onnx is not listed in manifest\.json \(every onnxruntime bundle lists it", "pruned-k2.onnx")


@pytest.mark.parametrize("kind", ["parent", "absolute", "nested"])
def test_a_name_outside_the_bundle_is_refused_before_it_is_read(bundle: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    outside = bundle.parent / "outside.bin"
    outside.write_bytes(b"secret")
    name = {"parent": "../outside.bin", "absolute": str(outside), "nested": "sub/weights.bin"}[kind]
    record = {"sha256": file_digest(outside), "size": outside.stat().st_size}  # a matching digest changes nothing
    _edit(bundle, lambda m: m["files"].update({name: record}))
    read: list[Path] = []
    monkeypatch.setattr(file_checks, "_digest_regular_file", lambda path: read.append(path) or (0, ""))
    _refused(bundle, r"lists the file .* which is not a plain file name inside the bundle", name)
    assert all(path.parent == bundle and path.name in bundle_files("onnxruntime", ["context", "full", "pruned-k2"]) for path in read)


def test_a_symlink_is_refused_even_to_a_matching_file(bundle: Path) -> None:
    target = bundle.parent / "weights-elsewhere.bin"
    shutil.move(bundle / "weights.bin", target)
    (bundle / "weights.bin").symlink_to(target)
    _refused(bundle, r"engine file weights\.bin in .* is a symbolic link", "weights.bin")


def test_an_unlisted_file_in_the_bundle_is_refused(bundle: Path) -> None:
    (bundle / "extra.onnx").write_bytes(b"x")
    _refused(bundle, r"holds extra\.onnx, which manifest\.json does not list", "extra.onnx")


def test_a_listed_file_the_backend_does_not_use_is_refused(bundle: Path) -> None:
    (bundle / "notes.txt").write_bytes(b"x")
    record = {"sha256": file_digest(bundle / "notes.txt"), "size": 1}
    _edit(bundle, lambda m: (m["files"].update({"notes.txt": record}), m.update(total_size=m["total_size"] + 1)))
    _refused(bundle, r"lists notes\.txt, which is not one of the onnxruntime backend's files", "notes.txt")


def _counting_sha256(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the sha256 hashers integrity makes (one per file it reads whole); the memo starts empty."""
    import hashlib
    from types import SimpleNamespace

    made: list[int] = []
    monkeypatch.setattr(file_checks, "hashlib", SimpleNamespace(sha256=lambda *a: made.append(1) or hashlib.sha256(*a)))
    monkeypatch.setattr(file_checks, "_DIGESTS", {})
    return made


def test_a_settled_file_is_read_once_per_process_and_any_change_is_read_again(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve --engines checks a bundle before it listens and catrt.load checks it again: the weights are read
    once. An in-place edit that keeps the size and puts the mtime back still moves the file's ctime: refused."""
    monkeypatch.setattr(file_checks, "SETTLED_NS", 0)  # the copy is fresh; "settled" here means any age
    made = _counting_sha256(monkeypatch)
    files = len(_manifest(bundle)["files"])
    verify_bundle(bundle)
    assert len(made) == files
    verify_bundle(bundle)
    assert len(made) == files  # nothing read again
    weights = bundle / "weights.bin"
    after_a_tick(weights)  # an edit within the copy's clock tick may keep its change time: the check could not tell
    before = weights.stat()
    with open(weights, "r+b") as stream:
        first = stream.read(1)
        stream.seek(0)
        stream.write(bytes([first[0] ^ 0xFF]))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns
    _refused(bundle, r"engine file weights\.bin in .* does not match its manifest sha256", "weights.bin")
    assert len(made) == files + 1  # only the changed file read again


def _hashed_up_front(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files the bundle check reads whole to hash (`_digest_regular_file`), in order; none memoized."""
    monkeypatch.setattr(file_checks, "SETTLED_NS", 1 << 62)
    read: list[str] = []
    real = file_checks._digest_regular_file
    monkeypatch.setattr(file_checks, "_digest_regular_file", lambda path: read.append(path.name) or real(path))
    monkeypatch.setattr(file_checks, "_DIGESTS", {})
    return read


def _sessions_made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The graph files ONNX Runtime sessions are made of, in order (the sessions are made as before)."""
    import onnxruntime

    made: list[str] = []
    real = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda path, *a, **k: made.append(Path(path).name) or real(path, *a, **k))
    return made


def test_load_reads_and_hashes_weights_bin_once_where_inspect_hashes_every_file(
    bundle: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """catrt.load hashed weights.bin in the bundle check, then again as its engine read it: the engine's read (before
    any session) is now its only sha256 pass. `catrt inspect`-style checks (bundle_problems) still hash every file."""
    read = _hashed_up_front(monkeypatch)
    sessions = _sessions_made(monkeypatch)
    catrt.load(bundle).engine.close()
    listed = set(_manifest(bundle)["files"])
    assert sorted(read) == sorted(listed - {"weights.bin"}) and sessions == ["context.onnx", "full.onnx", "pruned-k2.onnx"]
    read.clear()
    assert bundle_problems(bundle) == (verify_bundle(bundle), [])
    assert sorted(read) == sorted([*listed, *listed])  # both checks, whole: weights.bin too


def test_an_edited_weights_bin_is_refused_by_load_before_any_session_naming_it(
    bundle: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A byte of weights.bin edited in place (same size): the check catrt.load runs leaves its digest to the engine's
    read, which refuses it, naming the file and the manifest sha256 as the bundle check does, before ONNX Runtime makes
    a session."""
    read = _hashed_up_front(monkeypatch)
    sessions = _sessions_made(monkeypatch)
    _flip_byte(bundle / "weights.bin")
    with pytest.raises(CorruptBundleError, match=r"^engine file weights\.bin in .* does not match its manifest sha256 "
                                                   r"\(corrupt or modified\); rebuild the engine$") as caught:
        catrt.load(bundle)
    assert caught.value.field == "weights.bin" and sessions == [] and "weights.bin" not in read
    _refused(bundle, r"engine file weights\.bin in .* does not match its manifest sha256", "weights.bin")  # inspect's check


@pytest.mark.parametrize("damage", ["truncated", "link", "missing"])
def test_load_refuses_a_weights_bin_of_another_size_or_kind_before_loading_the_model(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, damage: str,
) -> None:
    """Left to the engine's read is weights.bin's sha256 only: its size, kind and presence are checked up front, before
    the model loads, with the bundle check's messages."""
    weights = bundle / "weights.bin"
    if damage == "truncated":
        with open(weights, "r+b") as stream:
            stream.truncate(weights.stat().st_size - 1)
        match = r"engine file weights\.bin in .* has \d+ bytes, not the \d+ its manifest records"
    elif damage == "link":
        shutil.move(weights, bundle.parent / "elsewhere.bin")
        weights.symlink_to(bundle.parent / "elsewhere.bin")
        match = r"engine file weights\.bin in .* is a symbolic link"
    else:
        weights.unlink()
        match = r"engine file weights\.bin is missing from"
    models: list[str] = []
    monkeypatch.setattr(catrt.bundle, "load_pipeline", lambda model, **_: models.append(model))
    with pytest.raises(CorruptBundleError, match=match) as caught:
        catrt.load(bundle)
    assert caught.value.field == "weights.bin" and models == []


def test_only_the_files_an_engine_verifies_as_it_reads_them_are_left_to_it(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within `digests_left_to_engine` an edited weights.bin passes the check (its engine refuses it), an edited graph
    or initializer index does not: ONNX Runtime reads the graphs by path, and integrity parses initializers.json."""
    _flip_byte(bundle / "weights.bin")
    with integrity.digests_left_to_engine():
        assert check_integrity(bundle).problems == []
    assert [p.field for p in check_integrity(bundle).problems] == ["weights.bin"]  # outside it: hashed
    for name in ("full.onnx", "initializers.json"):
        _flip_byte(bundle / name, offset=2)
        with integrity.digests_left_to_engine():
            assert [p.field for p in check_integrity(bundle).problems] == [name]
        _flip_byte(bundle / name, offset=2)


def test_a_file_changed_within_the_settling_time_is_read_every_time(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A change within one tick of the kernel's coarse clock may leave ctime as it was: such files are not kept."""
    monkeypatch.setattr(file_checks, "SETTLED_NS", 3600 * 10**9)
    made = _counting_sha256(monkeypatch)
    verify_bundle(bundle)
    verify_bundle(bundle)
    assert len(made) == 2 * len(_manifest(bundle)["files"])


# -- the manifest's shape ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "field", "message"),
    [
        (lambda m: m.update(files=["weights.bin"]), "files", r"field 'files' must be an object, got a list"),
        (lambda m: m["files"]["weights.bin"].pop("size"), "weights.bin", r"record files\['weights\.bin'\] has no size"),
        (lambda m: m["files"]["full.onnx"].update(sha256="abc"), "full.onnx", r"sha256 must be 64 lowercase hex characters"),
        (lambda m: m["files"].update({"weights.bin": None}), "weights.bin", r"must be an object with sha256 and size, got null"),
        (lambda m: m.pop("build"), "build", r"field 'build' is missing"),
        (lambda m: m["build"].pop("alphas"), "build.alphas", r"field 'build\.alphas' is missing"),
        (lambda m: m["alphas"][0].update(k="2"), "alphas[0].k", r"field 'alphas\[0\]\.k' must be an integer >= 1, got '2'"),
        (lambda m: m["graphs"].pop("pruned-k2"), "graphs.pruned", r"field 'graphs' has no pruned graph"),
        (lambda m: m["graphs"]["full"]["inputs"][0].update(shape=None), "graphs.full.inputs.hidden_states", r"shape' must be a list of positive integers"),
        (lambda m: m["graphs"]["full"]["inputs"][0].update(dtype=[]), "graphs.full.inputs.hidden_states", r"dtype' must be one of .*, got \[\]"),
        (lambda m: m["model"].pop("transformer_config"), "model.transformer_config", r"field 'model\.transformer_config' is missing"),
        (lambda m: m.update(signature=7), "signature", r"field 'signature' must be 64 lowercase hex"),
        (lambda m: m.update(extra=1), "extra", r"has an unknown field 'extra'"),
        (lambda m: m["model"].update(extra=1), "model.extra", r"has an unknown field 'model\.extra'"),
        (lambda m: m["graphs"]["full"].update(extra=1), "graphs.full.extra", r"has an unknown field 'graphs\.full\.extra'"),
        (lambda m: m["verification"].update(extra=1), "verification.extra", r"has an unknown field 'verification\.extra'"),
        (lambda m: m["verification"]["max_relative_error"].update({"full.tokens": -1}), "verification.max_relative_error",
         r"field 'verification\.max_relative_error' must hold numbers >= 0"),
        (lambda m: m["verification"].update(tolerance=-1), "verification.tolerance", r"field 'verification\.tolerance' must be >= 0"),
        (lambda m: m["alphas"][0].update(max_relative_error=-0.5), "alphas[0].max_relative_error",
         r"field 'alphas\[0\]\.max_relative_error' must be a number >= 0, got -0\.5"),
    ],
    ids=["files-not-dict", "record-without-size", "bad-sha256", "null-record", "no-build", "no-alphas", "k-string",
         "no-pruned-graph", "shape-null", "dtype-list", "no-transformer-config", "signature-not-hex", "unknown-field",
         "unknown-model-field", "unknown-graph-field", "unknown-verification-field", "negative-verified-error",
         "negative-tolerance", "negative-alpha-error"],
)
def test_a_malformed_manifest_is_a_named_corrupt_bundle_error(bundle: Path, edit: Callable[[dict[str, Any]], None], field: str, message: str) -> None:
    _edit(bundle, edit)
    _refused(bundle, message, field)


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", "null"])
def test_a_manifest_that_is_not_an_object_is_refused(bundle: Path, content: str) -> None:
    (bundle / MANIFEST_FILE).write_text(content)
    _refused(bundle, r"manifest\.json is not a valid catrt manifest", MANIFEST_FILE)


def test_a_manifest_with_a_key_given_twice_is_refused_naming_it(bundle: Path) -> None:
    """json keeps the last of a repeated key: `"t0": 3, "t0": 4` loaded as t0 = 4 behind the built value."""
    text = (bundle / MANIFEST_FILE).read_text()
    assert text.count('"t0": ') == 1
    (bundle / MANIFEST_FILE).write_text(text.replace('"t0": ', '"t0": 5, "t0": ', 1))
    _refused(bundle, r"manifest\.json is not a valid catrt manifest: the key 't0' appears twice in one object", MANIFEST_FILE)


def test_a_manifest_that_is_a_link_a_pipe_or_oversized_is_refused_unread(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = bundle / MANIFEST_FILE
    size = manifest.stat().st_size
    monkeypatch.setattr(catrt.manifest, "MAX_MANIFEST_BYTES", size - 1)
    _refused(bundle, rf"manifest\.json is not a valid catrt manifest: it is over {size - 1} bytes", MANIFEST_FILE)
    monkeypatch.undo()
    os.replace(manifest, tmp_path / MANIFEST_FILE)
    os.mkfifo(manifest)  # reading it would block forever
    _refused(bundle, r"manifest\.json is not a valid catrt manifest: it is not a regular file", MANIFEST_FILE)
    manifest.unlink()
    manifest.symlink_to(tmp_path / MANIFEST_FILE)
    _refused(bundle, r"manifest\.json in .* is a symbolic link", MANIFEST_FILE)


# -- the fields against the graphs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "field", "message"),
    [
        (lambda m: m.update(format=2), "format", r"field 'format' is 2, but this catrt reads bundle format 3 only; rebuild the engine with this catrt"),
        (lambda m: m.pop("format"), "format", r"has no 'format' field"),
        (lambda m: m["build"].update(alphas=[0.5]), "alphas", r"alphas lists 0\.3 but build\.alphas is 0\.5"),
        (lambda m: m["build"].update(alphas=[1.5]), "build.alphas", r"build\.alphas: BuildConfig\.alphas: CATConfig\.alpha must be in \(0, 1\]"),
        (lambda m: m["build"].update(t0=6), "build.t0", r"build\.t0: CATConfig\.t0 = 6 needs t0 < num_inference_steps"),
        (lambda m: m["build"].update(t0=1), "build.t0", r"build\.t0: CATConfig\.t0 must be an integer >= 2"),
        (lambda m: m["build"].update(steps="6"), "build.steps", r"build\.steps must be a positive integer, got '6'"),
        # A call would plan 10^30 steps (hours of scheduler allocation) before anything ran.
        (lambda m: m["build"].update(steps=10**30), "build.steps", r"build\.steps: BuildConfig\.steps must be an integer from 1 to 1000"),
        (lambda m: m["alphas"][0].update(k=3), "alphas[0].k", r"alphas\[0\]\.k is 3 but alpha 0\.3 selects ceil\(alpha x 6\) = 2 tokens"),
        (lambda m: m.update(num_tokens=8), "num_tokens", r"num_tokens is 8 but the full graph's 6x4 latent in 2x2 patches has 6"),
        (lambda m: m["build"].update(height=64), "build.height", r"build size 48x64 \(WxH\) is not the full graph's 6x4 latent at one scale"),
        (lambda m: m["build"].update(width=50), "build.width", r"build\.width 50 is not a multiple of the full graph's latent width 6"),
        # Past batch and 2 x batch, the wording it always had (a registered pipeline's row count is said only below).
        (lambda m: m["build"].update(batch=4), "build.batch",
         r"build\.batch is 4 but the graphs take 2 rows \(batch, or 2 x batch with guidance\); the manifest"),
        # Batch 2 of one image each would also be 2 rows, but this pipeline's engines always run [uncond, cond].
        (lambda m: m["build"].update(batch=2), "build.batch",
         r"build\.batch is 2 but the graphs take 2 rows \(StableDiffusion3Pipeline runs 2 row\(s\) per image: classifier-free guidance\)"),
        (lambda m: m["build"].update(max_sequence_length=16), "build.max_sequence_length", r"max_sequence_length is 16 but the graphs take 85 text tokens"),
        (lambda m: m["build"].update(backend="auto"), "build.backend", r"build\.backend is unresolved"),
        (lambda m: m["model"]["transformer_config"].update(patch_size=4), "graphs.full.inputs.hidden_states", r"latent 6x4 is not divisible by the patch size 4"),
        (lambda m: m["graphs"]["pruned-k2"]["inputs"][0].update(shape=[2, 3, 64]), "graphs.pruned-k2", r"graphs\.pruned-k2 computes 3 tokens, not the k = 2 its name says"),
        (lambda m: m["model"].update(name="sd3"), "model.name", r"model\.name is 'sd3' but build\.model is 'tiny-sd3'"),
        (lambda m: m.update(total_size=1), "total_size", r"total_size is 1 but its files add up to"),
        (lambda m: m["verification"].update(passed=False), "verification", r"verification did not pass"),
        # Another precision the backend builds: the pipeline would load in a dtype the graphs do not take.
        (lambda m: m["build"].update(precision="fp16"), "build.precision",
         r"build\.precision is fp16 \(float16\) but graphs\.full\.inputs\.hidden_states is float32"),
    ],
    ids=["format-2", "no-format", "alpha", "alpha-out-of-range", "t0-at-steps", "t0-below-2", "steps-string", "steps-huge", "k", "num-tokens", "height",
         "width", "batch", "batch-doubled", "text-length", "backend-auto", "patch-size", "pruned-shape", "model-name", "total-size", "verification",
         "precision"],
)
def test_an_edited_field_is_refused_naming_it(bundle: Path, edit: Callable[[dict[str, Any]], None], field: str, message: str) -> None:
    _edit(bundle, edit)
    _refused(bundle, message, field)


# -- signing -----------------------------------------------------------------------------------


def test_a_signed_bundle_is_refused_with_the_wrong_key(bundle: Path) -> None:
    _refused(bundle, r"signature does not match the bundle key", "signature", key=b"another key")
    with pytest.raises(CorruptBundleError, match=r"signature does not match the bundle key"):
        catrt.load(bundle, key=b"another key")


def test_a_key_passed_as_its_key_files_bytes_is_the_key_that_file_signed_with(bundle: Path, tmp_path: Path) -> None:
    """`--sign-key-file` and `--bundle-key-file` drop the whitespace around a file's key (its final newline), as
    `$CATRT_BUNDLE_KEY` does; `load(key=...)` given that file's bytes (`Path(F).read_bytes()`, or a random key whose
    last byte happens to be a newline) took them whole and refused the bundle the file signed."""
    from catrt.key_files import read_key_file

    key_file = tmp_path / "bundle.key"
    key_file.write_bytes(KEY + b"\n")
    assert read_key_file(key_file) == KEY  # the key `catrt build --sign-key-file` signs with
    assert verify_bundle(bundle, key_file.read_bytes()).signature == _manifest(bundle)["signature"]
    catrt.load(bundle, key=b" \t" + KEY + b"\r\n")
    _refused(bundle, r"signature does not match the bundle key", "signature", key=KEY + b"x")


def test_an_unsigned_bundle_is_refused_with_a_key(bundle: Path) -> None:
    _edit(bundle, lambda m: m.pop("signature"))
    assert check_integrity(bundle).problems == []  # without a key it is a valid bundle
    _refused(bundle, r"manifest\.json is not signed, but a bundle key was given", "signature", key=KEY)


def test_reading_and_verifying_a_signed_manifest_does_not_import_torch(bundle: Path) -> None:
    """A tool that only checks a bundle's manifest (catrt.signing, catrt.manifest's raw reading, seal and digests) does
    not pay for torch: in a fresh interpreter it finds the signature good under the key and bad under another, the
    seal intact and a file's digest the recorded one."""
    code = f"""
import sys
from pathlib import Path
from types import SimpleNamespace
from catrt.manifest import file_digest, read_manifest_data, seal_problems
from catrt.signing import signature_problems
data = read_manifest_data(Path({str(bundle)!r}))
assert signature_problems(data, {KEY!r}) == []
assert [p.field for p in signature_problems(data, b"another key")] == ["signature"]
assert seal_problems(data["build"], data["sealed"]) == []
name, record = sorted(data["files"].items())[0]
assert file_digest(Path({str(bundle)!r}) / name) == record["sha256"]
print(sorted(name for name in ("torch", "numpy", "diffusers") if name in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_change_no_other_check_sees_is_refused_with_the_key(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _edit(bundle, _resealed(lambda m: m["build"].update(t0=4)))  # 2 <= t0 < steps, resealed: only the signature tells
    assert check_integrity(bundle).problems == []
    monkeypatch.setenv(BUNDLE_KEY_ENV, KEY.decode())  # catrt.load's key when none is passed
    with pytest.raises(CorruptBundleError, match=r"signature does not match the bundle key") as caught:
        catrt.load(bundle)
    assert caught.value.field == "signature"


@pytest.mark.parametrize(("field", "value"), [("t0", 4), ("steps", 7), ("steps", 28), ("reuse_every", 2)])
def test_a_build_field_edited_to_another_valid_value_is_refused_naming_it(
    bundle: Path, field: str, value: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A field no graph shows, edited within its range (t0 3 -> 4 of 6 steps), is named without a key: the build
    sealed each field's value (a digest per field), and it is the only problem reported."""
    monkeypatch.delenv(BUNDLE_KEY_ENV, raising=False)
    _edit(bundle, lambda m: m["build"].update({field: value}))
    problems = check_integrity(bundle).problems
    assert [(p.field, p.value) for p in problems] == [(f"build.{field}", value)]
    with pytest.raises(CorruptBundleError, match=rf"manifest.json field 'build.{field}' = {value} is not the value the "
                                                 r"build wrote \(its 'sealed' digest differs\): the manifest was edited"):
        catrt.load(bundle)


def test_a_seal_that_does_not_cover_the_build_is_refused_and_an_unsealed_bundle_loads(
    bundle: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(BUNDLE_KEY_ENV, raising=False)
    _edit(bundle, lambda m: m[SEAL_FIELD].pop("build.t0"))
    assert [p.field for p in check_integrity(bundle).problems] == ["build.t0"]
    _edit(bundle, lambda m: m[SEAL_FIELD].update({"build.t0": "0" * 64}) or m[SEAL_FIELD].update({"build.nothing": "0" * 64}))
    assert [p.field for p in check_integrity(bundle).problems] == ["build.nothing", "build.t0"]
    _edit(bundle, lambda m: m[SEAL_FIELD].update(t0="not a digest"))
    assert [p.field for p in check_integrity(bundle).problems] == [SEAL_FIELD]
    _edit(bundle, lambda m: m.pop(SEAL_FIELD))  # a bundle built before seals: its fields are checked as before
    assert check_integrity(bundle).problems == []
    catrt.load(bundle)


def test_an_empty_key_is_refused_before_building(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"a bundle key must not be empty"):
        build_engines(CONFIG, out_dir=tmp_path, export_dir=tmp_path, progress=False, sign_key=b"")
    (tmp_path / "key").write_text("\n")
    with pytest.raises(ConfigError, match=r"the key file .* is empty"):
        key_files.read_key_file(tmp_path / "key")


def test_a_blank_bundle_key_variable_is_refused_not_taken_as_no_key(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _edit(bundle, _resealed(lambda m: m["build"].update(t0=4)))  # an edit only the signature tells
    monkeypatch.setenv(BUNDLE_KEY_ENV, " \n")  # an unfilled deployment secret
    with pytest.raises(ConfigError, match=r"\$CATRT_BUNDLE_KEY is set but empty; set it to the key") as caught:
        catrt.load(bundle)
    assert caught.value.field == "key"
    monkeypatch.delenv(BUNDLE_KEY_ENV)
    assert check_integrity(bundle).problems == []  # unset: no signature check, as documented


@pytest.mark.parametrize("kind", ["fifo", "device", "oversized"])
def test_a_key_file_that_is_no_short_regular_file_is_refused_unread(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A FIFO with no writer would block the read forever and /dev/zero never ends: both are refused at once."""
    if kind == "fifo":
        path, message = tmp_path / "key", "is not a regular file"
        os.mkfifo(path)
    elif kind == "device":
        path, message = Path("/dev/zero"), "is not a regular file"
    else:
        path, message = tmp_path / "key", f"is over {key_files.MAX_KEY_FILE_BYTES} bytes"
        path.write_bytes(b"k" * (key_files.MAX_KEY_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match=f"the key file {path} {message}") as caught:
        key_files.read_key_file(path)
    assert caught.value.field == "bundle_key_file"
    assert main(["inspect", str(tmp_path), "--bundle-key-file", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"catrt inspect: error: the key file {path} {message}" + (
        "; give a file holding the key" if kind != "oversized" else "; a key is a short secret: give a file holding only it")]


@pytest.mark.parametrize("command", [["inspect", "."], ["serve", "--model", "reference", "--api-key-file"]])
def test_an_empty_key_file_path_is_refused_naming_the_mistake(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--bundle-key-file "$KEY_FILE" with the variable unset read as "cannot read the key file : No such file"."""
    argv = [*command, ""] if command[0] == "serve" else [*command, "--bundle-key-file", " "]
    assert main(argv) == 2
    what = "API key file" if command[0] == "serve" else "key file"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"catrt {command[0]}: error: the {what} path is empty; give the file holding the key"]


def _rewrite_digests(folder: Path) -> None:
    """What an editor who knows the format does to an unsigned bundle: every size, digest and the total made true."""
    def edit(data: dict[str, Any]) -> None:
        for name, record in data["files"].items():
            record.update(sha256=file_digest(folder / name), size=(folder / name).stat().st_size)
        data["total_size"] = sum(record["size"] for record in data["files"].values())

    _edit(folder, edit)


def test_load_hands_the_engine_the_checked_manifests_file_records(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a backend that reads its files after the check (tensorrt streams its plans) verifies the bytes against:
    the records of the manifest that was checked, not one read again."""
    given = []

    def stop(engine: Any) -> None:
        given.append(engine.files)
        raise RuntimeError("stopped before loading")

    monkeypatch.setattr(ENGINES["onnxruntime"], "load", stop)
    with pytest.raises(RuntimeError, match="stopped before loading"):
        catrt.load(bundle)
    assert given == [catrt.manifest.read_manifest(bundle).files]


@pytest.mark.parametrize(("first", "second", "field", "message"), [
    ("full.onnx", "pruned-k2.onnx", "full.onnx", r"full.onnx does not compute the full graph the manifest lists: its 'patches'"),
    ("context.onnx", "full.onnx", "context.onnx", r"context.onnx does not compute the context graph .*its 'hidden_states'"),
])
def test_graph_files_swapped_with_their_digests_rewritten_are_refused_before_any_session(
    bundle: Path, first: str, second: str, field: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every digest matches: only the graphs' declared inputs tell (ONNX Runtime failed at the first step)."""
    (bundle / first).rename(bundle / "swap")
    (bundle / second).rename(bundle / first)
    (bundle / "swap").rename(bundle / second)
    _rewrite_digests(bundle)
    monkeypatch.setattr(ENGINES["onnxruntime"], "load", lambda self: pytest.fail("a session was made"))
    with pytest.raises(CorruptBundleError, match=message) as caught:
        catrt.load(bundle)
    assert caught.value.field == field


def _transpose_a_weight(table: dict[str, Any], size: int) -> None:
    """The same bytes read as the transposed matrix (ONNX Runtime failed at the first step)."""
    record = next(r for r in table["full"] if len(r["shape"]) == 2 and r["shape"][0] != r["shape"][1])
    record["shape"] = record["shape"][::-1]


def _swap_two_weights(table: dict[str, Any], size: int) -> None:
    """Two weights of one shape trade places in weights.bin (it ran, with the wrong weights)."""
    first, second = next(
        (a, b) for a in table["full"] for b in table["full"] if a["shape"] == b["shape"] and a["offset"] < b["offset"]
    )
    first["offset"], second["offset"] = second["offset"], first["offset"]


@pytest.mark.parametrize(("damage", "message"), [
    (lambda table, size: table["full"][0].update(offset=size), r"entry 0 of graph 'full' .* does not fit weights.bin"),
    (_transpose_a_weight, r"initializers.json places the full graph's '.*' as \[(\d+), (\d+)\] float at offset (\d+) of "
                          r"weights.bin, but full.onnx has it as \[\2, \1\] float at offset \3"),
    (_swap_two_weights, r"initializers.json places the full graph's '.*' as \[.*\] float at offset (\d+) of weights.bin, but "
                        r"full.onnx has it as \[.*\] float at offset (?!\1)\d+"),
    (lambda table, size: table["full"].pop(), r"initializers.json does not list the full graph's weight '.*' \(full.onnx reads it"),
    (lambda table, size: table["full"][0].update(shape=[1]), r"entry 0 of graph 'full' .* for shape \[1\]"),
    (lambda table, size: table["full"][0].update(dtype="bogus"), r"entry 0 of graph 'full' has a field of the wrong kind"),
    (lambda table, size: table.update(other=[]), r"must map graph names of the manifest to lists of initializers"),
    (lambda table, size: table["full"][0].update(name="not.in.the.graph"), r"initializer 'not.in.the.graph' that full.onnx does not have"),
])
def test_a_weights_index_that_does_not_fit_its_graphs_is_refused_naming_it(
    bundle: Path, damage: Callable[[dict[str, Any], int], None], message: str
) -> None:
    table = json.loads((bundle / "initializers.json").read_text())
    damage(table, (bundle / "weights.bin").stat().st_size)
    (bundle / "initializers.json").write_text(json.dumps(table))
    _rewrite_digests(bundle)
    _refused(bundle, message, "initializers.json")


def test_a_graph_reading_weights_from_outside_the_bundle_is_refused(bundle: Path) -> None:
    import onnx

    model = onnx.load(str(bundle / "full.onnx"), load_external_data=False)
    external = next(i for i in model.graph.initializer if i.external_data)
    next(entry for entry in external.external_data if entry.key == "location").value = "../../secret.bin"
    onnx.save(model, str(bundle / "full.onnx"))
    _rewrite_digests(bundle)
    _refused(bundle, r"full.onnx reads weights from '../../secret.bin', not the bundle's weights.bin", "full.onnx")


# -- calls of a loaded bundle --------------------------------------------------------------------


def test_a_loaded_bundle_moved_off_its_builds_dtype_is_refused_per_call_and_runs_once_moved_back(bundle: Path) -> None:
    fast = catrt.load(bundle)
    seeded = {"output_type": "latent", "generator": torch.Generator().manual_seed(0)}
    expected = fast("a red circle", **seeded).images
    assert fast.to(torch.float64) is fast  # diffusers' `pipe = pipe.to(...)` idiom keeps the engine pipeline
    with pytest.raises(ConfigError, match=r"the pipeline now has dtype torch.float64, the onnxruntime build needs torch.float32; move it back") as caught:
        fast("a red circle", output_type="latent")
    assert caught.value.field == "pipe"
    seeded["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(fast.to(torch.float32)("a red circle", **seeded).images, expected)


@pytest.mark.parametrize("setting", ["t0", "n_clusters"])
def test_a_catconfig_setting_given_to_a_bundles_call_names_the_build_as_where_it_goes(bundle: Path, setting: str) -> None:
    """Only alpha= is per call; another CATConfig field was Python's bare "unexpected keyword argument"."""
    fast = catrt.load(bundle)
    with pytest.raises(ConfigError, match=rf"{setting} is a CATConfig setting, fixed when the bundle was built .*\(catrt build\)") as caught:
        fast("a red circle", output_type="latent", **{setting: 3})
    assert caught.value.field == setting


def test_a_standalone_bundle_moves_to_a_device_keeping_its_weightless_transformer(bundle: Path) -> None:
    """An onnxruntime bundle's transformer is a stand-in on the meta device, which torch cannot copy to a device:
    `fast.to("cpu")` moves the rest of the pipeline (as diffusers' idiom expects) and the bundle still runs."""
    fast = catrt.load(bundle)
    expected = fast("a red circle", output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert fast.to("cpu") is fast and fast.to(device="cpu", dtype=torch.float32) is fast
    assert fast.pipe.transformer.device.type == "meta" and fast.pipe.vae.device.type == "cpu"
    got = fast("a red circle", output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(got, expected)


def test_a_standalone_bundles_diffusers_pipeline_moves_with_diffusers_own_to(bundle: Path) -> None:
    """`fast.pipe.to("cpu")` (diffusers' idiom on the pipeline itself, which calls `to` on every component) moves the
    pipeline around the weightless stand-in, which takes a dtype and stays on the meta device: it was torch's
    "Cannot copy out of meta tensor". A dtype other than the build's is still refused at the call."""
    fast = catrt.load(bundle)
    expected = fast("a red circle", output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert fast.pipe.to("cpu") is fast.pipe and fast.pipe.transformer.to("cpu") is fast.pipe.transformer
    assert fast.pipe.transformer.device.type == "meta" and fast.pipe.vae.device.type == "cpu"
    fast.pipe.to(torch.float64)
    assert fast.pipe.transformer.dtype == torch.float64 and fast.pipe.vae.dtype == torch.float64
    with pytest.raises(ConfigError, match=r"the pipeline now has dtype torch.float64, the onnxruntime build needs torch.float32"):
        fast("a red circle", output_type="latent")
    fast.pipe.to("cpu", torch.float32)
    fast.pipe.transformer.to(torch.zeros(1, dtype=torch.float64))  # `to(tensor)` takes the tensor's dtype, as torch's
    assert fast.pipe.transformer.dtype == torch.float64
    fast.pipe.transformer.to(dtype=torch.float32)
    got = fast("a red circle", output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(got, expected)


def test_a_pipeline_of_another_model_given_to_load_is_refused_naming_pipe(bundle: Path, tiny_pipelines: dict[str, Any]) -> None:
    for name, what in (("tiny-pixart", r"class than the build's model 'tiny-sd3' \(PixArtTransformer2DModel, the build's "
                                        r"SD3Transformer2DModel\)"), ("tiny-sd3.5", "config than the build's model 'tiny-sd3'")):
        with pytest.raises(EngineMismatchError, match=rf"the pipeline given to load has another transformer {what}; pass a "
                                                      r"pipeline of that model or let catrt\.load load its own") as caught:
            catrt.load(bundle, pipe=tiny_pipelines[name])
        assert caught.value.field == "pipe"


def test_a_bundle_of_a_model_folder_loads_from_any_directory_and_names_a_folder_gone(
    tiny_pipelines: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_pipelines["tiny-sd3"].save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    config = BuildConfig("model", height=32, width=48, steps=6, t0=3, max_sequence_length=8, backend="eager")
    folder = build_engines(config, out_dir=tmp_path / "engines", progress=False)  # the model named relative to here
    assert json.loads((folder / MANIFEST_FILE).read_text())["build"]["model"] == str(tmp_path / "model")
    monkeypatch.chdir(tmp_path / "engines")  # where "model" names no folder
    fast = catrt.load(folder)
    fast.set_progress_bar_config(disable=True)
    assert fast("red", output_type="latent").images.shape == (1, 16, 4, 6)
    (tmp_path / "model").rename(tmp_path / "moved")
    with pytest.raises(UnknownModelError, match=rf"was built from model '{tmp_path / 'model'}' \(build\.model in its manifest\), "
                                                r"which is neither a catrt model name nor a diffusers folder here") as caught:
        catrt.load(folder)
    assert caught.value.field == "build.model"
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == 2  # inspect reports what load would refuse, not "OK"
    printed = capsys.readouterr()
    assert "files and machine: OK" not in printed.out
    assert printed.err.splitlines() == [
        f"catrt inspect: error: {caught.value}", f"catrt inspect: 1 problem(s) found in {folder}",
    ]


def test_a_build_of_another_model_folder_of_the_same_name_does_not_replace_a_bundle(
    tiny_pipelines: dict[str, Any], tmp_path: Path
) -> None:
    """Build names hold a folder's last component only: /a/model and /b/model name the same bundle."""
    for parent in ("a", "b"):
        tiny_pipelines["tiny-sd3"].save_pretrained(tmp_path / parent / "model")
    settings = {"height": 32, "width": 48, "steps": 6, "t0": 3, "max_sequence_length": 8, "backend": "eager"}
    first = build_engines(BuildConfig(str(tmp_path / "a" / "model"), **settings), out_dir=tmp_path / "engines", progress=False)
    before = (first / MANIFEST_FILE).read_text()
    with pytest.raises(ConfigError, match=rf"{first} holds a build of model '{tmp_path / 'a' / 'model'}', this one is of "
                                          rf"'{tmp_path / 'b' / 'model'}': it would replace it; build into another --out") as caught:
        build_engines(BuildConfig(str(tmp_path / "b" / "model"), **settings), out_dir=tmp_path / "engines", progress=False)
    assert caught.value.field == "out_dir" and (first / MANIFEST_FILE).read_text() == before
    assert build_engines(BuildConfig(str(tmp_path / "a" / "model"), **settings), out_dir=tmp_path / "engines", progress=False) == first


def test_a_build_of_another_model_folder_published_meanwhile_is_not_replaced(
    tiny_pipelines: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two builds of /a/model and /b/model at once: each found no bundle of its name before its work, and the later
    silently replaced the earlier. The check is made again as the bundle is published."""
    import catrt.build as build_module

    for parent in ("a", "b"):
        tiny_pipelines["tiny-sd3"].save_pretrained(tmp_path / parent / "model")
    settings = {"height": 32, "width": 48, "steps": 6, "t0": 3, "max_sequence_length": 8, "backend": "eager"}
    write_manifest, published = build_module.write_manifest, []

    def the_other_build_publishes_first(folder: Path, manifest: Any) -> None:
        monkeypatch.setattr(build_module, "write_manifest", write_manifest)  # the other build's own is the plain one
        published.append(build_engines(BuildConfig(str(tmp_path / "a" / "model"), **settings),
                                       out_dir=tmp_path / "engines", progress=False))
        write_manifest(folder, manifest)

    monkeypatch.setattr(build_module, "write_manifest", the_other_build_publishes_first)
    with pytest.raises(ConfigError, match=rf"holds a build of model '{tmp_path / 'a' / 'model'}', this one is of "
                                          rf"'{tmp_path / 'b' / 'model'}': it would replace it") as caught:
        build_engines(BuildConfig(str(tmp_path / "b" / "model"), **settings), out_dir=tmp_path / "engines", progress=False)
    assert caught.value.field == "out_dir" and sorted((tmp_path / "engines").iterdir()) == published
    assert catrt.manifest.read_manifest_data(published[0])["build"]["model"] == str(tmp_path / "a" / "model")


def test_a_loaded_bundle_refuses_prompts_and_image_counts_of_the_wrong_kind_by_name(bundle: Path) -> None:
    fast = catrt.load(bundle)
    for kwargs, field, message in [
        ({"prompt": 5}, "prompt", "prompt must be a text or a non-empty list of texts, got int 5"),
        ({"prompt": []}, "prompt", "prompt must be a text or a non-empty list of texts, got an empty list"),
        ({"prompt": ["a", None]}, "prompt", "prompt must be a text or a non-empty list of texts"),
        ({"prompt": "a", "num_images_per_prompt": 0}, "num_images_per_prompt", "must be a positive integer, got 0"),
        ({"prompt": "a", "num_images_per_prompt": None}, "num_images_per_prompt", "must be a positive integer, got None"),
    ]:
        with pytest.raises(ConfigError, match=message) as caught:
            fast(**kwargs, output_type="latent")
        assert caught.value.field == field


# -- CLI ---------------------------------------------------------------------------------------


def test_inspect_lists_every_problem(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _flip_byte(bundle / "weights.bin")
    (bundle / "extra.bin").write_bytes(b"x")
    _edit(bundle, lambda m: m["build"].update(alphas=[0.5]))
    assert main(["inspect", str(bundle)]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("catrt inspect: error: ")]
    assert len(errors) == 3, captured.err
    assert "engine file weights.bin" in errors[0] and "does not match its manifest sha256" in errors[0]
    assert "holds extra.bin" in errors[1] and "alphas lists 0.3 but build.alphas is 0.5" in errors[2]
    assert "3 problem(s) found" in captured.err and "Traceback" not in captured.err + captured.out
    assert "N = 6 image tokens" in captured.out and "alpha 0.3: k = 2, graph pruned-k2" in captured.out
    assert "OK" not in captured.out


def test_inspect_escapes_the_control_characters_of_a_bundle(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A manifest's text and the bundle's file names are untrusted: no terminal escape sequence is printed raw."""
    _edit(bundle, lambda m: m["exporters"].update(full="\x1b]0;owned\x07"))
    assert main(["inspect", str(bundle)]) == 0
    assert "(\\x1b]0;owned\\x07)" in capsys.readouterr().out
    (bundle / "\x1b[2J").write_text("x")
    assert main(["inspect", str(bundle)]) == 2
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "holds \\x1b[2J, which manifest.json does not list" in err


def test_inspect_checks_the_signature_with_a_key_file(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "bundle.key"
    key_file.write_bytes(KEY + b"\n")
    assert main(["inspect", str(bundle), "--bundle-key-file", str(key_file)]) == 0
    assert "signature: matches the bundle key" in capsys.readouterr().out
    key_file.write_bytes(b"another key")
    assert main(["inspect", str(bundle), "--bundle-key-file", str(key_file)]) == 2
    captured = capsys.readouterr()
    assert "signature: does not match the bundle key" in captured.out
    assert "manifest.json signature does not match the bundle key" in captured.err and "Traceback" not in captured.err


def test_inspect_says_whether_a_bundle_is_signed_and_whether_its_signature_was_checked(
    bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One line of inspect's output: signed and checked (the key from $CATRT_BUNDLE_KEY too), signed but not
    checked, or not signed (refused once a key is given)."""
    assert main(["inspect", str(bundle)]) == 0
    assert "  signature: present, not checked (no --bundle-key-file or $CATRT_BUNDLE_KEY)\n" in capsys.readouterr().out
    monkeypatch.setenv(BUNDLE_KEY_ENV, KEY.decode())
    assert main(["inspect", str(bundle)]) == 0
    assert "  signature: matches the bundle key\n" in capsys.readouterr().out
    _edit(bundle, lambda data: data.pop("signature"))
    assert main(["inspect", str(bundle)]) == 2
    captured = capsys.readouterr()
    assert "  signature: none (refused: a bundle key is given)\n" in captured.out
    assert "manifest.json is not signed, but a bundle key was given" in captured.err
    monkeypatch.delenv(BUNDLE_KEY_ENV)
    assert main(["inspect", str(bundle)]) == 0
    assert "  signature: none\n" in capsys.readouterr().out


def test_generate_refuses_a_bundle_signed_with_another_key(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "bundle.key"
    key_file.write_bytes(b"another key")
    image = tmp_path / "image.png"
    args = ["generate", "--engines", str(bundle), "--prompt", "a red circle", "--out", str(image), "--bundle-key-file", str(key_file)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "catrt generate: error: manifest.json signature does not match" in err
    assert not image.exists()
    assert main(["generate", "--prompt", "x", "--bundle-key-file", str(key_file)]) == 2
    assert "use it with --engines" in capsys.readouterr().err


def test_build_signs_with_the_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import catrt.build

    seen: dict[str, Any] = {}

    def fake_build(config: BuildConfig, **kwargs: Any) -> Path:
        seen.update(kwargs, config=config)
        return tmp_path / config.build_name()

    monkeypatch.setattr(catrt.build, "build_engines", fake_build)
    key_file = tmp_path / "sign.key"
    key_file.write_text("s3cret\n")
    flags = ["--model", "tiny-sd3", "--height", "32", "--width", "48", "--steps", "6", "--t0", "3", "--backend", "onnxruntime"]
    assert main(["build", *flags, "--sign-key-file", str(key_file)]) == 0
    assert seen["sign_key"] == b"s3cret"
    assert "tiny-sd3-48x32-" in capsys.readouterr().out
    assert main(["build", *flags, "--sign-key-file", str(tmp_path / "missing.key")]) == 2
    assert "cannot read the key file" in capsys.readouterr().err


def test_bundle_problems_reports_a_missing_manifest(tmp_path: Path) -> None:
    manifest, problems = bundle_problems(tmp_path)
    assert manifest is None and [p.field for p in problems] == [MANIFEST_FILE]


def test_a_packed_latent_bundle_is_checked_against_its_token_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUNDLE_KEY_ENV, raising=False)
    config = BuildConfig("tiny-flux", height=32, width=48, batch=1, steps=6, t0=3, alphas=(0.3,), max_sequence_length=8, backend="eager")
    folder = build_engines(config, out_dir=tmp_path / "engines", export_dir=tmp_path / "export", progress=False)
    manifest = verify_bundle(folder)  # packed (rows, tokens, channels) latents: a 3x2 grid of 16-pixel tokens
    assert manifest.graphs["full"]["inputs"][0]["shape"] == [1, 6, 64] and [entry["k"] for entry in manifest.alphas] == [2]
    _edit(folder, lambda data: data["build"].update(height=64))
    with pytest.raises(CorruptBundleError, match="48x64 .* is not a grid of the full graph's 6 packed tokens") as error:
        verify_bundle(folder)
    assert error.value.field == "build.height"


# -- publishing ----------------------------------------------------------------------------------


def test_a_build_is_swapped_into_place_in_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No instant without the folder: a kill between two renames would leave none, so no rename runs."""
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "file").write_text("old")

    def killed(self: Path, target: Any) -> None:
        raise OSError("the process died here")

    with staged_folder(final) as staging:
        (staging / "file").write_text("new")
        monkeypatch.setattr(Path, "rename", killed)
    assert (final / "file").read_text() == "new" and sorted(tmp_path.iterdir()) == [final]
    monkeypatch.undo()
    with pytest.raises(RuntimeError), staged_folder(final) as staging:
        (staging / "file").write_text("half")
        raise RuntimeError
    assert (final / "file").read_text() == "new" and sorted(tmp_path.iterdir()) == [final]


def test_a_write_the_disk_refuses_is_one_line_naming_the_folder_and_the_earlier_one_stays(tmp_path: Path) -> None:
    """A full disk while a build writes its files was a traceback (OSError from the export's weights); other
    OSErrors are not the disk's to explain and pass through as they are."""
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "file").write_text("old")
    with pytest.raises(BuildError) as refused, staged_folder(final) as staging:
        (staging / "file").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging / "weights.bin"))
    assert str(refused.value) == (f"could not write the files of {final} (No space left on device); nothing was published "
                                  "there (an earlier folder is left as it was): free some space or pick another place")
    assert refused.value.field == "path" and refused.value.__cause__ is None
    with pytest.raises(FileNotFoundError), staged_folder(final):
        raise FileNotFoundError(errno.ENOENT, "not the disk's")
    assert (final / "file").read_text() == "old" and sorted(tmp_path.iterdir()) == [final]



@pytest.mark.parametrize("when", ["after the writes", "before a write", "under the lock"])
def test_a_folder_removed_while_it_builds_is_one_line_naming_it_and_nothing_is_published(
    when: str, tmp_path: Path
) -> None:
    """`rm -rf engines` in another terminal during a build of minutes: the last step failed with a traceback
    (FileNotFoundError locking the folder, or writing into the staged one; removed under the lock, the rename's ENOENT
    was retried and taken for other builds of the name). Removed from inside the block or the check: no timing."""
    engines = tmp_path / "engines"
    final = engines / "bundle"
    with pytest.raises(BuildError) as refused:
        with staged_folder(final, check=(lambda: shutil.rmtree(engines)) if when == "under the lock" else None) as staging:
            (staging / "weights.bin").write_bytes(b"built")
            if when != "under the lock":
                shutil.rmtree(engines)
            if when == "before a write":
                (staging / "manifest.json").write_text("{}")
    assert str(refused.value) == (f"{engines} was removed while {final} was built in it; nothing was published there: "
                                  "build again (it makes the folder again), or into a folder nothing removes")
    assert refused.value.field == "path" and refused.value.__cause__ is None and list(tmp_path.iterdir()) == []

def test_a_publish_under_a_file_is_refused_before_any_staging(tmp_path: Path) -> None:
    """The parent is made (and checked writable) by the one rule builds and compare use, before mkdtemp runs."""
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ConfigError, match=r"file cannot be a folder \(it is a file\); pick another place"):
        with staged_folder(tmp_path / "file" / "bundle"):
            pytest.fail("the block ran")
    assert (tmp_path / "file").read_text() == "mine" and sorted(tmp_path.iterdir()) == [tmp_path / "file"]


def test_the_folder_of_a_killed_build_is_removed_and_a_live_builds_kept(tmp_path: Path) -> None:
    final = tmp_path / "bundle"
    dead, live = tmp_path / ".bundle.tmp-dead", tmp_path / ".bundle.tmp-live"
    dead.mkdir()
    live.mkdir()
    holder = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with staged_folder(final) as staging:
            (staging / "file").write_text("new")
        assert sorted(path.name for path in tmp_path.iterdir()) == [".bundle.tmp-live", "bundle"]
    finally:
        os.close(holder)


def test_publishing_without_fcntl_or_renameat2_works_as_on_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows has neither: publish.py imported fcntl unconditionally and called ctypes.CDLL(None), so `catrt build`
    failed there with a traceback. Without them a publish is two renames and no temporary folder is taken as dead."""
    import catrt.publish as publish

    monkeypatch.setattr(publish, "fcntl", None)
    monkeypatch.setattr(publish.sys, "platform", "win32")
    monkeypatch.setattr(publish.ctypes, "CDLL", lambda *args, **kwargs: pytest.fail("loaded a C library"))
    _publish_twice_beside_an_unlocked_staging_folder(tmp_path)


def test_a_link_at_the_folders_place_is_published_through_and_kept(tmp_path: Path) -> None:
    """`engines/<name> -> /other-disk/<name>`: the link itself was swapped for the new folder and kept as a hidden
    `.tmp-` link no build removed; the new folder is published where the link points, and the link stays."""
    real, engines = tmp_path / "other-disk" / "bundle", tmp_path / "engines"
    real.mkdir(parents=True)
    (real / "file").write_text("old")
    engines.mkdir()
    (engines / "bundle").symlink_to(real, target_is_directory=True)
    with staged_folder(engines / "bundle") as staging:
        (staging / "file").write_text("new")
    assert os.path.islink(engines / "bundle") and (engines / "bundle" / "file").read_text() == "new"
    assert sorted(engines.iterdir()) == [engines / "bundle"] and sorted(real.parent.iterdir()) == [real]


def _removal_needs_write_permission(monkeypatch: pytest.MonkeyPatch) -> None:
    """Removing an entry needs its folder's write bit, as for every user but root (the tests may run as root)."""
    for name in ("unlink", "rmdir"):
        original = getattr(os, name)

        def guarded(path: Any, *, dir_fd: int | None = None, _original: Callable[..., None] = original) -> None:
            folder = os.fstat(dir_fd) if dir_fd is not None else os.stat(os.path.dirname(os.path.abspath(path)))
            if not folder.st_mode & stat.S_IWUSR:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            _original(path, dir_fd=dir_fd)

        monkeypatch.setattr(os, name, guarded)


def test_an_earlier_folder_made_read_only_is_removed_once_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle protected with `chmod -R a-w` and rebuilt: swapped out, it could not be emptied and stayed as a hidden
    `.tmp-` folder, a whole bundle's disk space, with nothing said; the build made it, so it removes it."""
    _removal_needs_write_permission(monkeypatch)
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "file").write_text("old")
    final.chmod(0o555)
    with staged_folder(final) as staging:
        (staging / "file").write_text("new")
    assert (final / "file").read_text() == "new" and sorted(tmp_path.iterdir()) == [final]


def test_an_earlier_folder_that_cannot_be_removed_is_named_in_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The new folder is in place either way; what is left behind is said, not kept silently."""
    import catrt.publish as publish

    final = tmp_path / "bundle"
    final.mkdir()
    monkeypatch.setattr(publish.shutil, "rmtree", lambda path, ignore_errors=False: None)  # a disk that keeps it
    with caplog.at_level("WARNING", logger="catrt.publish"), staged_folder(final) as staging:
        (staging / "file").write_text("new")
    (left,) = [path for path in tmp_path.iterdir() if path != final]
    assert (final / "file").read_text() == "new"
    assert caplog.messages == [f"could not remove {left} (an earlier folder of {tmp_path}); remove it yourself"]


def test_publishing_on_a_filesystem_without_locks_works_unlocked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flock answers ENOLCK on NFS without its lock daemon: staged_folder raised it (a build's traceback before its
    first stage). It publishes unlocked there, and a folder no lock can vouch for is never taken as dead."""
    import catrt.publish as publish

    def no_locks(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(publish, "fcntl", SimpleNamespace(flock=no_locks, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB))
    _publish_twice_beside_an_unlocked_staging_folder(tmp_path)


def test_a_failed_second_rename_without_renameat2_puts_the_earlier_folder_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a publish is two renames (Windows), the new folder refused its place after the earlier one was moved aside:
    the earlier one stayed hidden at .<name>.old-* and nothing was at the name."""
    import catrt.publish as publish

    monkeypatch.setattr(publish, "fcntl", None)
    monkeypatch.setattr(publish.sys, "platform", "win32")
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "file").write_text("old")
    rename = os.rename

    def refused_for_the_new_one(source: Any, target: Any) -> None:
        if Path(source).name.startswith(".bundle.tmp-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
        rename(source, target)

    with pytest.raises(BuildError, match=f"could not put the new folder in place at {final} \\(Permission denied\\)"):
        with staged_folder(final) as staging:
            (staging / "file").write_text("new")
            monkeypatch.setattr(os, "rename", refused_for_the_new_one)
    assert (final / "file").read_text() == "old" and sorted(tmp_path.iterdir()) == [final]


def test_ctrl_c_between_the_two_renames_puts_the_earlier_folder_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a publish is two renames (Windows, macOS, NFS), Ctrl-C (or SIGTERM's exception) after the earlier folder
    was moved aside left nothing at the name and the earlier bundle hidden at .<name>.old-*, which the next build
    removes as abandoned: both bundles lost. Only an OSError put it back."""
    import catrt.publish as publish

    monkeypatch.setattr(publish, "_exchange", lambda first, second: None)
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "file").write_text("old")
    rename = os.rename

    def interrupted_for_the_new_one(source: Any, target: Any) -> None:
        if Path(source).name.startswith(".bundle.tmp-"):
            raise KeyboardInterrupt
        rename(source, target)

    with pytest.raises(KeyboardInterrupt):
        with staged_folder(final) as staging:
            (staging / "file").write_text("new")
            monkeypatch.setattr(os, "rename", interrupted_for_the_new_one)
    assert (final / "file").read_text() == "old" and sorted(tmp_path.iterdir()) == [final]


def test_a_killed_builds_folders_are_removed_whatever_characters_the_name_holds(tmp_path: Path) -> None:
    """The leftovers were found by a glob of the name: a folder named `model[1]` (a link's target may be) never found
    its killed builds' `.model[1].tmp-*` / `.old-*` folders (a bundle each, piling up), and `[1]` matched `1` instead."""
    final = tmp_path / "model[1]"
    left = [tmp_path / ".model[1].tmp-killed01", tmp_path / ".model[1].old-killed02"]
    other = tmp_path / ".model1.tmp-killed03"  # another name's, which `[1]` matched
    for folder in (*left, other):
        folder.mkdir()
        (folder / "file").write_text("a killed build's")
    with staged_folder(final) as staging:
        (staging / "file").write_text("new")
    assert (final / "file").read_text() == "new" and sorted(tmp_path.iterdir()) == sorted([final, other])


def test_an_earlier_folder_a_killed_build_was_removing_is_removed_by_the_next_build(tmp_path: Path) -> None:
    """Without renameat2 (NFS, macOS) the earlier bundle is moved aside and then removed: a SIGKILL while it was removed
    (a whole bundle: seconds) left it hidden at .<name>.old-* for ever, which no build looked for. Moved aside locked,
    it is removed by the next build of the name, as a killed build's staging folder is."""
    import signal
    import subprocess
    import sys

    final = tmp_path / "bundle"
    final.mkdir()
    (final / "file").write_text("old")
    script = ("import os, signal, sys\nfrom pathlib import Path\nimport catrt.publish as publish\n"
              "publish._exchange = lambda first, second: None  # no RENAME_EXCHANGE here\n"
              "publish.remove_tree = lambda folder: os.kill(os.getpid(), signal.SIGKILL)  # killed removing the earlier\n"
              "with publish.staged_folder(Path(sys.argv[1])) as staging:\n    (staging / 'file').write_text('new')\n")
    done = subprocess.run([sys.executable, "-c", script, str(final)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == -signal.SIGKILL, done.stderr
    (left,) = [path for path in tmp_path.iterdir() if path != final]
    assert left.name.startswith(".bundle.old-") and (final / "file").read_text() == "new"
    assert (left / "file").read_text() == "old"
    with staged_folder(final) as staging:
        (staging / "file").write_text("newer")
    assert (final / "file").read_text() == "newer" and sorted(tmp_path.iterdir()) == [final]


def test_a_new_familys_declared_text_layout_checks_its_bundles_text_length(bundle: Path) -> None:
    """`PipelineSpec.text_tokens_before`, declared next to a family's adapter, is what integrity checks an edited
    max_sequence_length with (integrity kept its own table of the built-in pipeline classes, so a new family's
    bundle was only checked as 'at most the graphs' 85 text tokens' and an edit down to 4 passed)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from catrt.models import ADAPTERS, FAMILIES, PIPELINES, Family, register_family
    from catrt.models.sd3 import SD3Adapter
    from catrt.pipeline_spec import PipelineSpec

    class LayoutTransformer(SD3Transformer2DModel):
        pass

    class LayoutPipeline(StableDiffusion3Pipeline):
        pass

    class LayoutAdapter(SD3Adapter):
        transformer_class = LayoutTransformer

    spec = PipelineSpec(call_defaults={}, text_tokenizer="tokenizer_3", text_tokens_before=77)
    register_family(Family("text-layout", LayoutAdapter, {LayoutPipeline: spec}))
    try:
        _edit(bundle, lambda m: (m["model"].update(pipeline_class="LayoutPipeline"), m["build"].update(max_sequence_length=4)))
        _refused(bundle, r"max_sequence_length is 4 but the graphs take 85 text tokens \(LayoutPipeline: 77 \+ max_sequence_length\)",
                 "build.max_sequence_length")
    finally:
        del FAMILIES["text-layout"], ADAPTERS[LayoutTransformer], PIPELINES[LayoutPipeline]


def test_a_pipeline_spec_with_a_bad_text_layout_is_refused_by_name() -> None:
    from catrt.pipeline_spec import PipelineSpec

    for value in (-1, 1.5, True, "77"):
        with pytest.raises(ConfigError, match="PipelineSpec.text_tokens_before must be None or a whole number >= 0"):
            PipelineSpec(call_defaults={}, text_tokens_before=value)  # type: ignore[arg-type]


def test_every_family_pipeline_that_takes_a_text_length_has_its_text_layout_checked() -> None:
    """Without its declaration a bundle's edited max_sequence_length is only checked as 'at most the graphs' text'."""
    from catrt.models import FAMILIES

    for family in FAMILIES.values():
        for pipeline_class, spec in family.pipelines.items():
            if spec.text_length_argument == "max_sequence_length":
                assert spec.text_tokens_before is not None, (family.name, pipeline_class.__name__)
                assert integrity.text_tokens_before(pipeline_class.__name__) == spec.text_tokens_before
    assert integrity.text_tokens_before("StableDiffusion3Pipeline") == 77 and integrity.text_tokens_before("FluxPipeline") == 0
    assert integrity.text_tokens_before("NoSuchPipeline") is None


def test_a_publish_that_finds_the_name_taken_after_its_check_replaces_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two first builds of one name: the other publishes between this one's look at `final` and its rename.
    The rename then met a non-empty folder and raised a raw OSError; now the later build replaces the earlier.
    A catrt publish waits for this one's lock on the folder; one that takes no lock (no fcntl, a filesystem without
    locks) can still come in between: it is simulated by a folder made there directly."""
    final = tmp_path / "engines" / "bundle"
    rename = os.rename

    def the_other_build_wins_first(source: Any, target: Any) -> None:
        monkeypatch.setattr(os, "rename", rename)
        final.mkdir()
        (final / "file").write_text("first")
        rename(source, target)

    with staged_folder(final) as staging:
        (staging / "file").write_text("second")
        monkeypatch.setattr(os, "rename", the_other_build_wins_first)
    assert os.rename is rename  # the race ran
    assert (final / "file").read_text() == "second" and sorted(final.parent.iterdir()) == [final]


def test_a_publish_that_cannot_take_its_place_is_a_catrt_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "bundle"

    def refused(source: Any, target: Any) -> None:
        raise PermissionError(13, "Permission denied")

    with pytest.raises(BuildError, match=f"could not put the new folder in place at {final} \\(Permission denied\\)"):
        with staged_folder(final) as staging:
            (staging / "file").write_text("new")
            monkeypatch.setattr(os, "rename", refused)
    assert list(tmp_path.iterdir()) == []  # the staged folder is removed


def test_another_users_folder_in_a_sticky_folder_is_refused_before_the_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only its owner may rename or remove it there, so the swap failed after the whole build. Another user is
    simulated by os.geteuid (the tests run as root); the folder is really sticky. A link to it is published through,
    so it is refused as well."""
    os.chmod(tmp_path, 0o1777)
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "file").write_text("another user's")
    link = tmp_path / "latest"
    link.symlink_to(final)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for path in (final, link):
        with pytest.raises(ConfigError, match=f"^{path} cannot be replaced: it belongs to another user .* publish under "
                                              "another name, or have its owner remove it$"):
            with staged_folder(path):
                pytest.fail("the block ran")
    assert sorted(tmp_path.iterdir()) == [final, link] and (final / "file").read_text() == "another user's"
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(final).st_uid)  # its owner may
    with staged_folder(final) as staging:
        (staging / "file").write_text("new")
    assert (final / "file").read_text() == "new"


def test_a_file_where_the_folder_would_go_is_refused_and_kept(tmp_path: Path) -> None:
    """It was swapped aside like an earlier build (and left as a hidden .tmp file)."""
    final = tmp_path / "bundle"
    final.write_text("the user's")
    with pytest.raises(ConfigError, match=f"{final} is a file, so nothing is published there \\(it is left as it is\\)"):
        with staged_folder(final):
            pytest.fail("the block ran")
    final.unlink()
    with pytest.raises(ConfigError, match=f"{final} is a file, so nothing is published there"):
        with staged_folder(final) as staging:
            (staging / "file").write_text("new")
            final.write_text("the user's")  # made while the build ran
    assert final.read_text() == "the user's" and sorted(tmp_path.iterdir()) == [final]


def test_a_staging_folder_is_locked_before_another_build_may_look_for_abandoned_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between mkdtemp and its lock a concurrent build's cleanup took the fresh folder for a killed build's and
    removed it: the folder's parent is held from the cleanup to the lock, so that cleanup waits."""
    import tempfile

    final = tmp_path / "bundle"
    made = tempfile.mkdtemp

    def made_while_another_build_starts(*args: Any, **kwargs: Any) -> str:
        folder = made(*args, **kwargs)
        other = os.open(tmp_path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # the other build's staged_folder would wait here
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
        return folder

    monkeypatch.setattr(tempfile, "mkdtemp", made_while_another_build_starts)
    with staged_folder(final) as staging:
        (staging / "file").write_text("new")
    assert (final / "file").read_text() == "new"


def _publish_twice_beside_an_unlocked_staging_folder(tmp_path: Path) -> None:
    """Two publishes of one bundle where a staging folder no lock vouches for (a live or a killed build's: without
    locks, it cannot be told) lies beside it: the second replaces the first, and that folder is left alone."""
    final = tmp_path / "bundle"
    (tmp_path / ".bundle.tmp-other").mkdir()
    for text in ("first", "second"):
        with staged_folder(final) as staging:
            (staging / "file").write_text(text)
    assert (final / "file").read_text() == "second"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".bundle.tmp-other", "bundle"]
