"""Bundle integrity: everything about a bundle folder that is checked before any backend reads it.

`check_integrity(folder, key)` collects every problem, each a catrt error naming the file or field:

- the manifest's shape and format (`catrt.manifest.manifest_problems`);
- with a key, its signature: an HMAC-SHA256 over the canonical manifest (`canonical_manifest`);
- the files: exactly the files the backend needs for the bundle's graphs (`bundle_files`) are listed, each a plain name
  inside the folder, a regular file (not a link) with its recorded size and sha256, and the folder
  holds nothing else;
- the fields against each other and the graphs: the build config is valid, k = ceil(alpha * N),
  N and the patch size fit the full graph's latent, height / width / batch / text length fit its
  inputs, the step graphs' activations have the build's precision, the `alphas` table lists the
  build's alphas in order, each with k = ceil(alpha * N), its own pruned graph (whose shapes are the
  full graph's with k rows) and that graph's verification error, and there is no pruned graph the
  table does not list;
- last, when all else holds, each build field against the digest the build wrote of it (`sealed`), so a field no
  graph shows (t0, steps, reuse_every, ...) edited to another valid value is named too.

A signed bundle is checked against its signature only when a key is given (`key=`, or the
`CATRT_BUNDLE_KEY` environment variable read by `resolve_key`); then an unsigned or wrongly signed
bundle is refused. The checks are of the files as they are now: a key is what makes a manifest
edited together with its files (or its seal) detectable.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catrt.build_config import BuildConfig
from catrt.build_config import format_alphas
from catrt.checks import integer
from catrt.contract import FULL, PRUNED, graph_kind, pruned_k
from catrt.errors import PATH_ECHO_LIMIT, CatrtError, ConfigError, CorruptBundleError, echo
from catrt.key_files import read_key_variable
from catrt.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FIELD,
    Manifest,
    manifest_problems,
    read_manifest_data,
    seal_problems,
)
from catrt.pipeline_spec import PipelineSpec

#: Per backend, the files a bundle holds besides the manifest: the suffix of each graph's own file
#: (None: no file per graph) and the files all graphs share. `bundle_files` lists them for a bundle.
BUNDLE_FILES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "eager": (None, ()),
    "compile": (None, ()),
    "onnxruntime": (".onnx", ("weights.bin", "initializers.json")),
    "tensorrt": (".plan", ()),
}
#: The bundle key (the key itself, not a file) used when none is passed.
BUNDLE_KEY_ENV = "CATRT_BUNDLE_KEY"
_CHUNK = 1 << 20


@dataclass
class IntegrityReport:
    """What `check_integrity` found: the manifest and build config where readable, and every problem."""

    manifest: Manifest | None = None
    build: BuildConfig | None = None
    problems: list[CatrtError] = field(default_factory=list)
    signed: bool = False


def check_integrity(folder: str | os.PathLike[str], key: bytes | None = None) -> IntegrityReport:
    """Every integrity problem of the bundle in `folder` (nothing is raised); `key`: check the signature."""
    folder = Path(folder)
    report = IntegrityReport()
    try:
        data = read_manifest_data(folder)
    except CorruptBundleError as error:
        report.problems.append(error)
        return report
    report.signed = SIGNATURE_FIELD in data
    shape = manifest_problems(data)
    if shape and shape[0].field == "format":
        report.problems += shape  # another layout: nothing else can be read
        return report
    if key is not None:
        report.problems += signature_problems(data, key)
    report.problems += shape
    if shape:
        report.problems += _files_if_readable(folder, data)
        return report
    report.manifest = Manifest.from_dict(data)
    try:
        report.build = read_build_config(report.manifest)
    except CorruptBundleError as error:
        report.problems.append(error)
    report.problems += file_problems(
        folder, report.manifest.files, report.build.backend if report.build else None, report.manifest.graphs
    )
    if report.build is not None:
        report.problems += consistency_problems(report.manifest, report.build)
    if not report.problems and report.build is not None and report.build.backend == "onnxruntime":
        report.problems += onnx_graph_problems(folder, report.manifest.graphs)
    if not report.problems and report.manifest.sealed is not None:  # last: an edit no check above could see
        report.problems += seal_problems(report.manifest.build, report.manifest.sealed)
    return report


def onnx_graph_problems(folder: Path, graphs: Mapping[str, Any]) -> list[CatrtError]:
    """Each `<graph>.onnx` declares what the manifest says that graph takes and gives, and reads its weights
    from the bundle's `weights.bin` only.

    The digests tie the files to the manifest, not the manifest to the files: an unsigned bundle whose graph
    files were swapped (or replaced) and whose digests were rewritten passes every other check, and would fail
    inside ONNX Runtime at the first step. Read without the weights (the graph structure only).
    """
    import onnx
    from onnx import helper

    problems: list[CatrtError] = []
    table = _initializer_table(folder, graphs, problems)
    table_read = not problems
    for graph, spec in graphs.items():
        name = f"{graph}.onnx"
        try:
            model = onnx.load(str(folder / name), load_external_data=False)
        except Exception as error:  # noqa: BLE001 - whatever the parser raises, the file is not a graph
            problems.append(CorruptBundleError(f"{name} cannot be read as an ONNX graph ({type(error).__name__}): rebuild the engine", field=name))
            continue

        def declared(values: Iterable[Any]) -> dict[str, tuple[list[Any], str]]:
            found = {}
            for value in values:
                tensor = value.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
                found[value.name] = (dims, helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "?")
            return found

        expected = {kind: {t["name"]: (list(t["shape"]), t["dtype"]) for t in spec[kind]} for kind in ("inputs", "outputs")}
        inputs, outputs = declared(model.graph.input), declared(model.graph.output)
        # An exporter drops inputs a graph does not read, so the file's inputs are a subset; its outputs are all of them.
        wrong = [n for n, io in inputs.items() if expected["inputs"].get(n) != io]
        wrong += [n for n, io in expected["outputs"].items() if outputs.get(n) != io]
        if wrong:
            problems.append(CorruptBundleError(
                f"{name} does not compute the {graph} graph the manifest lists: its {echo(wrong[0])} is "
                f"{inputs.get(wrong[0]) or outputs.get(wrong[0]) or 'missing'}, the manifest says "
                f"{expected['inputs'].get(wrong[0]) or expected['outputs'].get(wrong[0]) or 'no such tensor'}; "
                f"the file was swapped or replaced: rebuild the engine",
                field=name, value=wrong[0],
            ))
            continue
        elsewhere = sorted({
            entry.value for initializer in model.graph.initializer for entry in initializer.external_data
            if entry.key == "location" and entry.value != "weights.bin"
        })
        if elsewhere:
            problems.append(CorruptBundleError(
                f"{name} reads weights from {echo(elsewhere[0])}, not the bundle's weights.bin: rebuild the engine",
                field=name, value=elsewhere[0],
            ))
        own = {initializer.name for initializer in model.graph.initializer}
        foreign = [record["name"] for record in table.get(graph, []) if record["name"] not in own]
        if foreign:
            problems.append(CorruptBundleError(
                f"initializers.json gives the {graph} graph an initializer {echo(foreign[0])} that {name} does not have: "
                f"rebuild the engine", field="initializers.json", value=foreign[0],
            ))
        elif table_read:
            problems += _table_against_graph(graph, name, model, table.get(graph, []))
    return problems


def _table_against_graph(graph: str, name: str, model: Any, records: list[dict[str, Any]]) -> list[CatrtError]:
    """The `initializers.json` records of a graph are its external initializers, each where (offset, length), as what
    (shape, element type) the graph itself says: the sessions take the weights from the table, so a table edited to
    another shape or another tensor's offset would run wrong weights, or fail inside ONNX Runtime."""
    import onnx

    graph_side = {
        initializer.name: (list(initializer.dims), onnx.TensorProto.DataType.Name(initializer.data_type).lower(),
                           {entry.key: entry.value for entry in initializer.external_data})
        for initializer in model.graph.initializer if initializer.data_location == onnx.TensorProto.EXTERNAL
    }
    for record in records:
        dims, dtype, where = graph_side.get(record["name"], (None, None, {}))
        table_side = (record["shape"], record["dtype"], str(record["offset"]), str(record["length"]))
        if (dims, dtype, where.get("offset", "0"), where.get("length")) != table_side:
            return [CorruptBundleError(
                f"initializers.json places the {graph} graph's {echo(record['name'])} as {record['shape']} {record['dtype']} "
                f"at offset {record['offset']} of weights.bin, but {name} has it as {dims} {dtype} at offset "
                f"{where.get('offset', '0') if dims is not None else 'none (not external)'}: rebuild the engine",
                field="initializers.json", value=record["name"],
            )]
    unlisted = sorted(set(graph_side) - {record["name"] for record in records})
    if unlisted:
        return [CorruptBundleError(
            f"initializers.json does not list the {graph} graph's weight {echo(unlisted[0])} ({name} reads it from "
            f"weights.bin): rebuild the engine", field="initializers.json", value=unlisted[0],
        )]
    return []


def _initializer_table(folder: Path, graphs: Mapping[str, Any], problems: list[CatrtError]) -> dict[str, list[dict[str, Any]]]:
    """`initializers.json`, checked as the index into `weights.bin` it must be (per graph: name, dtype, shape,
    offset and a length that is the shape's bytes, inside the file); a problem is appended and {} returned."""
    from catrt.engines.shared_weights import INITIALIZERS_FILE, NUMPY_DTYPES, WEIGHTS_FILE

    import numpy as np

    def refuse(message: str) -> dict[str, list[dict[str, Any]]]:
        problems.append(CorruptBundleError(f"{INITIALIZERS_FILE} {message}: rebuild the engine", field=INITIALIZERS_FILE))
        return {}

    try:
        table = json.loads((folder / INITIALIZERS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return refuse(f"cannot be read as JSON ({type(error).__name__})")
    if not isinstance(table, dict) or not all(graph in graphs and isinstance(records, list) for graph, records in table.items()):
        return refuse("must map graph names of the manifest to lists of initializers")
    size = (folder / WEIGHTS_FILE).stat().st_size
    for graph, records in table.items():
        for index, record in enumerate(records):
            where = f"entry {index} of graph {echo(graph)}"
            keys = ("name", "offset", "length", "shape", "dtype")
            if not isinstance(record, dict) or not all(key in record for key in keys):
                return refuse(f"{where} needs {', '.join(keys)}")
            offset, length, shape = record["offset"], record["length"], record["shape"]
            if not (isinstance(record["name"], str) and record["dtype"] in NUMPY_DTYPES and _is_count(offset)
                    and _is_count(length) and isinstance(shape, list) and all(_is_count(d) for d in shape)):
                return refuse(f"{where} has a field of the wrong kind")
            if length != math.prod(shape) * np.dtype(NUMPY_DTYPES[record["dtype"]]).itemsize or offset + length > size:
                return refuse(f"{where} ({echo(record['name'])}) does not fit {WEIGHTS_FILE}: {length} bytes at offset {offset} "
                              f"for shape {shape}, in a file of {size} bytes")
    return table


def _is_count(value: object) -> bool:
    return integer(value) and value >= 0


def read_build_config(manifest: Manifest) -> BuildConfig:
    """The manifest's build config; invalid values (2 <= t0 < steps, alpha in (0, 1], ...) are a CorruptBundleError."""
    steps = manifest.build.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:  # the one field BuildConfig does not type-check
        raise CorruptBundleError(
            f"{MANIFEST_FILE} build.steps must be a positive integer, got {echo(steps)}; the bundle was edited or is "
            f"damaged, rebuild the engine",
            field="build.steps", value=steps,
        )
    try:
        build = BuildConfig.from_dict(manifest.build)
    except (ConfigError, TypeError) as error:
        name = getattr(error, "field", None)
        where = f"build.{name}" if name else "build"
        raise CorruptBundleError(
            f"{MANIFEST_FILE} {where}: {error}; the bundle was edited or is damaged, rebuild the engine",
            field=where, value=getattr(error, "value", None),
        ) from None
    if build.backend == "auto" or build.height is None or build.width is None:
        unresolved = "backend" if build.backend == "auto" else "height" if build.height is None else "width"
        raise CorruptBundleError(
            f"{MANIFEST_FILE} build.{unresolved} is unresolved ({echo(getattr(build, unresolved))}); a build records the "
            f"concrete value: rebuild the engine",
            field=f"build.{unresolved}",
        )
    return build


# -- signing -----------------------------------------------------------------------------------


def canonical_manifest(data: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the manifest without its signature, as sorted-keys compact JSON."""
    payload = {name: value for name, value in data.items() if name != SIGNATURE_FIELD}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def sign_manifest(data: Mapping[str, Any], key: bytes) -> str:
    """HMAC-SHA256 (hex) of the canonical manifest under `key`."""
    return hmac.new(_checked_key(key), canonical_manifest(data), hashlib.sha256).hexdigest()


def signature_problems(data: Mapping[str, Any], key: bytes) -> list[CatrtError]:
    """[] when the manifest carries the signature `key` makes of it; else why not, naming `signature`."""
    found = data.get(SIGNATURE_FIELD)
    if found is None:
        return [CorruptBundleError(
            f"{MANIFEST_FILE} is not signed, but a bundle key was given (--bundle-key-file, {BUNDLE_KEY_ENV} or "
            f"load(key=...)): refusing an unsigned bundle; build it with --sign-key-file",
            field=SIGNATURE_FIELD,
        )]
    expected = sign_manifest(data, key).encode("ascii")
    if not hmac.compare_digest(expected, str(found).encode("utf-8", "replace")):
        return [CorruptBundleError(
            f"{MANIFEST_FILE} signature does not match the bundle key: the manifest was changed after signing, or "
            f"signed with another key; refusing the bundle",
            field=SIGNATURE_FIELD,
        )]
    return []


def resolve_key(key: bytes | str | None, environ: Mapping[str, str] = os.environ) -> bytes | None:
    """`key` as bytes, else `$CATRT_BUNDLE_KEY` (surrounding whitespace dropped; set but blank is refused),
    else None (no check)."""
    if key is None:
        text = read_key_variable(environ, BUNDLE_KEY_ENV, "key", "the key the bundle was signed with", "load without a signature check")
        return None if text is None else text.encode("utf-8")
    return _checked_key(key)


def _checked_key(key: bytes | str) -> bytes:
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, (bytes, bytearray)):
        raise ConfigError(f"a bundle key must be bytes, got {type(key).__name__}", field="key")
    if not key:
        raise ConfigError("a bundle key must not be empty", field="key")
    return bytes(key)


# -- files -------------------------------------------------------------------------------------


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
    folder: Path, files: Mapping[str, Any], backend: str | None, graphs: Iterable[str] | None = None
) -> list[CatrtError]:
    """Each file problem: unsafe names, files the backend needs for `graphs` but unlisted, listed but
    absent, links, wrong size or sha256, and entries of the folder the manifest does not list.

    Without a backend or the graphs' names, which files are needed is unknown and not checked."""
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
            problem = _file_problem(folder, name, record)
            if problem is not None:
                problems.append(problem)
    problems += _unlisted_entries(folder, {*files, *(required or ())})  # a required one is named above
    return problems


def _files_if_readable(folder: Path, data: Mapping[str, Any]) -> list[CatrtError]:
    """File checks of a manifest with shape problems: what its `files` allows (no backend list)."""
    files = data.get("files")
    if not isinstance(files, dict):
        return []
    build = data.get("build")
    backend = build.get("backend") if isinstance(build, dict) else None
    graphs = data.get("graphs")
    return file_problems(folder, files, backend if isinstance(backend, str) else None, graphs if isinstance(graphs, dict) else None)


def _file_problem(folder: Path, name: str, record: Mapping[str, Any]) -> CorruptBundleError | None:
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
    if not hmac.compare_digest(digest, str(record["sha256"])):
        return CorruptBundleError(
            f"engine file {name} in {folder} does not match its manifest sha256 (corrupt or modified); rebuild the engine",
            field=name,
        )
    return None


def _digest_regular_file(path: Path) -> tuple[int, str]:
    """(size, sha256) of a regular file, opened without following a link (a swap after lstat fails).

    A file this process hashed before and whose identity is unchanged is not read again (`serve --engines` checks
    each bundle before it listens, then `catrt.load` checks it again: a 16 GB weight file read once, not twice)."""
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
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


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


# -- the fields against each other and the graphs ----------------------------------------------


class _Problems:
    """Collects consistency problems; `expect` records one when its condition is false."""

    def __init__(self) -> None:
        self.items: list[CatrtError] = []

    def expect(self, condition: bool, field_name: str, message: str, value: object = None) -> bool:
        if not condition:
            self.items.append(CorruptBundleError(
                f"{MANIFEST_FILE} {message}; the manifest was edited or is damaged: rebuild the engine",
                field=field_name, value=value,
            ))
        return condition


def consistency_problems(manifest: Manifest, build: BuildConfig) -> list[CatrtError]:
    """Each way the build fields, k, N, the transformer config and the graphs' shapes disagree."""
    from catrt.engines import ENGINES

    check = _Problems()
    check.expect(manifest.model["name"] == build.model, "model.name",
                 f"model.name is {echo(manifest.model['name'], PATH_ECHO_LIMIT)} but build.model is {echo(build.model, PATH_ECHO_LIMIT)}", manifest.model["name"])
    total = sum(record["size"] for record in manifest.files.values())
    check.expect(manifest.total_size == total, "total_size",
                 f"total_size is {manifest.total_size} but its files add up to {total} bytes", manifest.total_size)
    verification = manifest.verification
    worst = max(verification["max_relative_error"].values())
    check.expect(verification["passed"] is True and worst <= verification["tolerance"], "verification",
                 f"verification did not pass (worst relative error {worst:.3g}, tolerance {verification['tolerance']:g}); "
                 f"only verified builds are published")
    engine = ENGINES.get(build.backend)
    if engine is not None:
        check.expect(build.precision in engine.precisions, "build.precision",
                     f"build.precision {build.precision} is not one the {build.backend} backend builds", build.precision)
    _graph_problems(manifest, build, check)
    _precision_problems(manifest, build, check)
    return check.items


#: The step graphs' tensors that hold model activations, so have the build's precision (indices and the
#: timestep are integers or the scheduler's; context tensors are the pipeline's and may differ).
_MODEL_DTYPE_TENSORS: frozenset[str] = frozenset({"hidden_states", "patches", "kv_cache", "tokens", "kv", "kv_rows"})


def _precision_problems(manifest: Manifest, build: BuildConfig, check: _Problems) -> None:
    """The step graphs' activations have the dtype of `build.precision`: a precision edited to another valid
    value would load the pipeline in a dtype the graphs were not built (or verified) for."""
    expected = str(build.dtype).removeprefix("torch.")
    for graph, spec in manifest.graphs.items():
        if graph_kind(graph) not in ("full", "pruned"):
            continue
        for side in ("inputs", "outputs"):
            for tensor in spec[side]:
                if tensor["name"] in _MODEL_DTYPE_TENSORS and not check.expect(
                    tensor["dtype"] == expected, "build.precision",
                    f"build.precision is {build.precision} ({expected}) but graphs.{graph}.{side}.{tensor['name']} "
                    f"is {tensor['dtype']}", build.precision,
                ):
                    return


def _graph_problems(manifest: Manifest, build: BuildConfig, check: _Problems) -> None:
    graphs = manifest.graphs
    pruned = [graph for graph in graphs if graph_kind(graph) == "pruned"]
    shapes = {
        (graph, side): {tensor["name"]: list(tensor["shape"]) for tensor in graphs[graph][side]}
        for graph in graphs for side in ("inputs", "outputs")
    }
    for graph, names in (("full", FULL.inputs), *((graph, PRUNED.inputs) for graph in pruned)):
        order = [tensor["name"] for tensor in graphs[graph]["inputs"]]
        if not check.expect(order[: len(names)] == list(names), f"graphs.{graph}.inputs",
                            f"graphs.{graph} inputs start {order[: len(names)]}, not {list(names)}"):
            return
    for graph, names in (("full", FULL.outputs), *((graph, PRUNED.outputs) for graph in pruned)):
        if not check.expect(set(names) <= set(shapes[graph, "outputs"]), f"graphs.{graph}.outputs",
                            f"graphs.{graph} outputs {sorted(shapes[graph, 'outputs'])} lack one of {list(names)}"):
            return

    config = manifest.model["transformer_config"]
    patch = config.get("patch_size")
    if not check.expect(isinstance(patch, int) and not isinstance(patch, bool) and patch >= 1,
                        "model.transformer_config.patch_size",
                        f"model.transformer_config.patch_size must be a positive integer, got {echo(patch)}"):
        return
    latent = shapes["full", "inputs"]["hidden_states"]
    where = "graphs.full.inputs.hidden_states"
    if not check.expect(len(latent) in (3, 4), where,
                        f"graphs.full hidden_states has shape {latent}, not (rows, channels, height, width) or packed (rows, tokens, channels)"):
        return
    if len(latent) == 3:  # packed tokens (FLUX): each row of the latents is one token
        rows, tokens, channels = latent
        patch = 1
    else:
        rows, channels, height, width = latent
    in_channels = config.get("in_channels", channels)
    check.expect(channels == in_channels, where,
                 f"graphs.full hidden_states has {channels} channels, model.transformer_config.in_channels is {in_channels}")
    if len(latent) == 4:
        if not check.expect(height % patch == 0 and width % patch == 0, where,
                            f"graphs.full hidden_states latent {width}x{height} is not divisible by the patch size {patch}"):
            return
        tokens = (height // patch) * (width // patch)
        check.expect(manifest.num_tokens == tokens, "num_tokens",
                     f"num_tokens is {manifest.num_tokens} but the full graph's {width}x{height} latent in {patch}x{patch} "
                     f"patches has {tokens}", manifest.num_tokens)
    else:
        check.expect(manifest.num_tokens == tokens, "num_tokens",
                     f"num_tokens is {manifest.num_tokens} but the full graph takes {tokens} packed tokens", manifest.num_tokens)
    per_image = rows_per_image(manifest.model["pipeline_class"])
    any_guidance = check.expect(rows in (build.batch, 2 * build.batch), "build.batch",
                                f"build.batch is {build.batch} but the graphs take {rows} rows (batch, or 2 x batch with guidance)",
                                build.batch)
    if any_guidance and per_image is not None:
        # the pipeline's guidance fixes the rows: a batch edited to half or twice the built one is no other batch
        check.expect(rows == per_image * build.batch, "build.batch",
                     f"build.batch is {build.batch} but the graphs take {rows} rows ({manifest.model['pipeline_class']} "
                     f"runs {per_image} row(s) per image: {'classifier-free guidance' if per_image == 2 else 'distilled guidance'})",
                     build.batch)
    if len(latent) == 4:
        _size_problems(build, height, width, check)
    else:
        _packed_size_problems(build, tokens, check)
    if not _alpha_table_problems(manifest, build, tokens, pruned, check):
        return

    full_tokens = shapes["full", "outputs"]["tokens"]
    kv = shapes["full", "outputs"]["kv"]
    # (K/V slots, rows, N, width) for the full graph's cache; a pruned graph reads it whole and writes k rows.
    slots, width_kv = (kv[0], kv[3]) if len(kv) == 4 else ("slots", "width")
    token_width = full_tokens[2] if len(full_tokens) == 3 else "width"
    check.expect(shapes["full", "inputs"]["timestep"] == [rows], "graphs.full.inputs.timestep",
                 f"graphs.full.inputs.timestep has shape {shapes['full', 'inputs']['timestep']}, where the build's graphs give {[rows]}")
    check.expect(full_tokens == [rows, tokens, token_width], "graphs.full.outputs.tokens",
                 f"graphs.full.outputs.tokens has shape {full_tokens}, where the build's graphs give {[rows, tokens, token_width]}")
    check.expect(kv == [slots, rows, tokens, width_kv], "graphs.full.outputs.kv",
                 f"graphs.full.outputs.kv has shape {kv}, where the build's graphs give {[slots, rows, tokens, width_kv]}")
    for graph in pruned:
        # Every graph sees the same rows, N and context; a pruned graph is the full graph with its k rows.
        patches = shapes[graph, "inputs"]["patches"]
        if not check.expect(len(patches) == 3 and patches[0] == rows, f"graphs.{graph}.inputs.patches",
                            f"graphs.{graph} patches has shape {patches}, not ({rows}, k, channels x patch area)"):
            continue
        selected = patches[1]
        check.expect(patches[2] == channels * patch * patch, f"graphs.{graph}.inputs.patches",
                     f"graphs.{graph} patches hold {patches[2]} values per token, not {channels} channels x {patch}x{patch}")
        check.expect(selected == pruned_k(graph), f"graphs.{graph}",
                     f"graphs.{graph} computes {selected} tokens, not the k = {pruned_k(graph)} its name says", selected)
        expectations = [
            (f"graphs.{graph}.inputs.timestep", shapes[graph, "inputs"]["timestep"], [rows]),
            (f"graphs.{graph}.inputs.indices", shapes[graph, "inputs"]["indices"], [rows, selected]),
            (f"graphs.{graph}.inputs.kv_cache", shapes[graph, "inputs"]["kv_cache"], kv),
            (f"graphs.{graph}.outputs.tokens", shapes[graph, "outputs"]["tokens"], [rows, selected, token_width]),
            (f"graphs.{graph}.outputs.kv_rows", shapes[graph, "outputs"]["kv_rows"], [slots, rows, selected, width_kv]),
        ]
        for where, found, expected in expectations:
            check.expect(found == expected, where, f"{where} has shape {found}, where the build's graphs give {expected}")
    _context_problems(manifest, build, shapes, rows, pruned, check)


def _alpha_table_problems(manifest: Manifest, build: BuildConfig, tokens: int, pruned: list[str], check: _Problems) -> bool:
    """The `alphas` table lists the build's alphas in order, each with its k, its own pruned graph and that
    graph's verification error, and every pruned graph is one of them; False when the graphs cannot be trusted."""
    listed = [entry["alpha"] for entry in manifest.alphas]
    ok = check.expect(listed == list(build.alphas), "alphas",
                      f"alphas lists {format_alphas(tuple(listed))} but build.alphas is {format_alphas(build.alphas)}", listed)
    errors = manifest.verification["max_relative_error"]
    for index, entry in enumerate(manifest.alphas):
        where = f"alphas[{index}]"
        alpha, k, graph = entry["alpha"], entry["k"], entry["graph"]
        try:
            expected_k = build.num_selected(tokens, alpha)
        except ConfigError:
            expected_k = None  # an alpha the build does not list: reported above
        ok &= check.expect(k == expected_k or expected_k is None, f"{where}.k",
                           f"{where}.k is {k} but alpha {alpha:g} selects ceil(alpha x {tokens}) = {expected_k} tokens", k)
        ok &= check.expect(graph in pruned and pruned_k(graph) == k, f"{where}.graph",
                           f"{where}.graph is {echo(graph)}, not the bundle's pruned graph of k = {k} (pruned-k{k})", graph)
        graph_errors = [error for name, error in errors.items() if name.split(".")[0] == graph]
        check.expect(bool(graph_errors) and entry["max_relative_error"] == max(graph_errors), f"{where}.max_relative_error",
                     f"{where}.max_relative_error is {echo(entry['max_relative_error'])}, not its graph's verification error "
                     f"({max(graph_errors) if graph_errors else 'none recorded'})", entry["max_relative_error"])
    unlisted = sorted(set(pruned) - {entry["graph"] for entry in manifest.alphas})
    ok &= check.expect(not unlisted, "alphas",
                       f"graphs {unlisted} are pruned graphs of no alpha in the alphas table", unlisted)
    return ok


def _size_problems(build: BuildConfig, height: int, width: int, check: _Problems) -> None:
    """height and width are the latent's times one scale (the VAE's; 1 for a pixel-space model)."""
    height_fits = check.expect(build.height % height == 0, "build.height",
                               f"build.height {build.height} is not a multiple of the full graph's latent height {height}",
                               build.height)
    width_fits = check.expect(build.width % width == 0, "build.width",
                              f"build.width {build.width} is not a multiple of the full graph's latent width {width}",
                              build.width)
    if height_fits and width_fits:
        check.expect(build.height // height == build.width // width, "build.height",
                     f"build size {build.width}x{build.height} (WxH) is not the full graph's {width}x{height} latent "
                     f"at one scale ({build.width // width} across, {build.height // height} down)",
                     {"width": build.width, "height": build.height})


def _packed_size_problems(build: BuildConfig, tokens: int, check: _Problems) -> None:
    """The build's size is a grid of the packed tokens at one scale (pixels per token a side)."""
    scale = math.isqrt(build.height * build.width // max(tokens, 1))
    check.expect(scale > 0 and build.height % scale == 0 and build.width % scale == 0
                 and (build.height // scale) * (build.width // scale) == tokens, "build.height",
                 f"build size {build.width}x{build.height} (WxH) is not a grid of the full graph's {tokens} packed tokens",
                 {"width": build.width, "height": build.height})


def _context_problems(
    manifest: Manifest, build: BuildConfig, shapes: dict[tuple[str, str], dict[str, list[int]]], rows: int,
    pruned: list[str], check: _Problems,
) -> None:
    """The context tensors are the same in every graph, made by (or fed to) the context graph; text length fits."""
    context = {**shapes["context", "inputs"], **shapes["context", "outputs"]}
    full_context = {name: shape for name, shape in shapes["full", "inputs"].items() if name not in FULL.inputs}
    for graph in pruned:
        pruned_context = {name: shape for name, shape in shapes[graph, "inputs"].items() if name not in PRUNED.inputs}
        check.expect(pruned_context == full_context, f"graphs.{graph}.inputs",
                     f"graphs.{graph} context inputs {pruned_context} are not the full graph's {full_context}")
    for name, shape in full_context.items():
        check.expect(context.get(name) == shape, f"graphs.context.{name}",
                     f"graphs.full input {name} {shape} is not the context graph's ({context.get(name)})")
    text = shapes["context", "inputs"].get("encoder_hidden_states")
    if text is None or not check.expect(len(text) == 3 and text[0] == rows, "graphs.context.inputs.encoder_hidden_states",
                                        f"graphs.context encoder_hidden_states has shape {text}, not ({rows}, text length, width)"):
        return
    length = build.max_sequence_length
    if length is None:
        return
    before = text_tokens_before(manifest.model["pipeline_class"])
    if before is None:
        check.expect(text[1] >= length, "build.max_sequence_length",
                     f"build.max_sequence_length is {length} but the graphs take {text[1]} text tokens", length)
    else:
        check.expect(text[1] == before + length, "build.max_sequence_length",
                     f"build.max_sequence_length is {length} but the graphs take {text[1]} text tokens "
                     f"({manifest.model['pipeline_class']}: {before} + max_sequence_length)", length)


def text_tokens_before(pipeline_class: str) -> int | None:
    """The text tokens a registered pipeline class (by name) puts before its `max_sequence_length` ones, as its
    `PipelineSpec.text_tokens_before` declares; None for a class not registered or that does not declare it."""
    spec = _registered_spec(pipeline_class)
    return None if spec is None else spec.text_tokens_before


def rows_per_image(pipeline_class: str) -> int | None:
    """The graph rows per image of a build of a registered pipeline class (by name): 2 under classifier-free
    guidance ([uncond, cond]; engines always run it), 1 under distilled guidance; None for a class not registered."""
    spec = _registered_spec(pipeline_class)
    if spec is None:
        return None
    return 2 if spec.guidance == "cfg" else 1


def _registered_spec(pipeline_class: str) -> PipelineSpec | None:
    """The PipelineSpec registered for a pipeline class by name, whichever module registered it: the families'
    modules and `catrt.loading`'s models (the reference pipeline), imported here, where graphs are read, so a
    bundle is judged the same whether or not its pipeline was imported before."""
    import catrt.loading  # noqa: F401  (registers the reference pipeline's spec)
    from catrt.models import PIPELINES, pipeline_named

    cls = pipeline_named(pipeline_class)
    return None if cls is None else PIPELINES[cls]
