"""`manifest.json`: what a bundle was built for, from what, on what, and the digest of every file.

The builder writes it last; loading reads it first and checks the files and the machine against it
before any backend sees a byte, so a bad bundle is a named error instead of a backend crash.

This module reads and writes the manifest, seals its build fields (`build_seal`) and checks its own shape
(`manifest_problems`: every field present with its type, the format this catrt reads); `catrt.provenance`
records the model, packages and device and checks the machine (`environment_problems`); `catrt.integrity`
checks the files and that the fields agree with each other and with the graphs.

Importing it loads no torch (nor does `catrt.signing`): reading the raw manifest, its seal, the file digests and the
signature are hashing and JSON, for a tool that only checks a bundle. `read_manifest`'s shape check imports the
build config and graph contract on its first call, and those load torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from catrt.errors import CorruptBundleError, echo, echo_path, shorten
from catrt.provenance import (
    VERSIONED_PACKAGES,
    describe_device,
    environment_problems,
    package_versions,
    transformer_config,
    weights_digest,
)

#: This module's names, with the provenance records the manifest holds (one import for what a build writes).
__all__ = [
    "ALPHA_FIELDS", "FORMAT_VERSION", "MANIFEST_FILE", "MAX_MANIFEST_BYTES", "SEAL_FIELD", "SIGNATURE_FIELD",
    "VERSIONED_PACKAGES", "Manifest", "build_seal", "describe_device", "describe_files", "environment_problems",
    "file_digest", "manifest_problems", "package_versions", "read_manifest", "read_manifest_data", "seal_problems",
    "transformer_config", "weights_digest", "write_manifest",
]

MANIFEST_FILE = "manifest.json"
#: The bundle layout this catrt reads. 3: graphs context, full and one `pruned-k<k>` per built alpha,
#: `build.alphas` and the `alphas` table (alpha, k, graph, verification error) in place of format 2's
#: single `build.alpha` / `k`; `initializers.json` beside `weights.bin`, the transformer config in
#: `model`, an optional HMAC `signature`. Older formats are refused (rebuild them).
FORMAT_VERSION = 3
ALPHA_FIELDS: tuple[str, ...] = ("alpha", "k", "graph", "max_relative_error")
SIGNATURE_FIELD = "signature"
#: Per build field, a digest of the value the build wrote (`build_seal`): an edit of a field no graph shows (t0, steps,
#: reuse_every, ...) is named at load. Not a secret: only a signature resists someone who rewrites both.
SEAL_FIELD = "sealed"
_CHUNK = 1 << 20
#: Largest manifest read (a manifest is kilobytes; a bigger file is not one, and is not read into memory).
MAX_MANIFEST_BYTES = 16 << 20


@dataclass(frozen=True)
class Manifest:
    """Everything `catrt.load` checks; `build` and `graphs` are the config dicts that rebuild them."""

    build: dict[str, Any]
    model: dict[str, Any]  # {"name", "pipeline_class", "transformer_class", "transformer_config", "transformer_sha256"}
    num_tokens: int
    alphas: list[dict[str, Any]]  # per built alpha, in build order: {"alpha", "k", "graph", "max_relative_error"}
    graphs: dict[str, Any]
    versions: dict[str, str]
    device: dict[str, Any]  # {"kind": "cpu"} ("mps" alike) or {"kind": "cuda", "name", "compute_capability"}
    files: dict[str, dict[str, Any]]  # relative path -> {"sha256", "size"}
    total_size: int
    verification: dict[str, Any]
    exporters: dict[str, str] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    #: `build_seal(build)`, written by every build since it was added; None in a bundle built before.
    sealed: dict[str, str] | None = None
    #: HMAC-SHA256 (hex) of the rest of the manifest, when the build was signed (`catrt.signing`).
    signature: str | None = None

    @property
    def k(self) -> int:
        """k of the default (first built) alpha: what a single-alpha bundle's `k` was before the `alphas` table."""
        return self.alphas[0]["k"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in (SEAL_FIELD, SIGNATURE_FIELD):
            if data[name] is None:
                del data[name]  # an unsigned (or earlier, unsealed) manifest has no such field at all
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """A manifest from checked data (`manifest_problems(data) == []`); `read_manifest` checks first."""
        return cls(**data)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")


_BUNDLES_LISTED = 3


def _bundles_inside_hint(folder: Path) -> str:
    """Where `folder` is an engine store (`engines/`, given for one of its bundles), the bundles it holds, so the line
    says which to give; "" otherwise. Hidden folders (a build's staging copy) are left out; a link to a bundle folder
    (`engines/current -> sd3-v5`) is one, as it loads as one."""
    try:
        with os.scandir(folder) as entries:
            names = sorted(entry.name for entry in entries if not entry.name.startswith(".")
                           and entry.is_dir()
                           and os.path.lexists(os.path.join(entry.path, MANIFEST_FILE)))
    except OSError:  # not a folder, or not readable: the missing manifest says enough
        return ""
    if not names:
        return ""
    shown = ", ".join(shorten(name) for name in names[:_BUNDLES_LISTED]) + (", ..." if len(names) > _BUNDLES_LISTED else "")
    return f"; it holds {len(names)} bundle folder(s) ({shown}): give one of those, e.g. {echo_path(folder / names[0])}"


def _manifest_given_hint(folder: Path) -> str:
    """Where `folder` is a bundle's manifest file itself (`--engines engines/sd3/manifest.json`), the folder to give
    instead; "" otherwise."""
    if folder.name != MANIFEST_FILE or not os.path.isfile(folder):
        return ""
    return f"; {echo_path(folder)} is a bundle's manifest: give the folder that holds it, {echo_path(folder.parent)}"


def read_manifest_data(folder: Path) -> dict[str, Any]:
    """The manifest's JSON object, unchecked; a missing, linked, oversized, unreadable or non-object one is a
    CorruptBundleError. Only a regular file of at most MAX_MANIFEST_BYTES is read (never a link's target)."""
    path = Path(folder) / MANIFEST_FILE
    try:
        mode = os.lstat(path).st_mode
    except PermissionError as error:  # a folder this user may not search: the manifest may well be there, not "missing"
        raise CorruptBundleError(
            f"{echo_path(path)} cannot be read ({error.strerror}): give this user read access to {echo_path(folder)} "
            f"and its files",
            field=MANIFEST_FILE,
        ) from None
    except OSError:  # missing (or a name the OS cannot look up)
        raise CorruptBundleError(
            f"{echo_path(path)} is missing: {echo_path(folder)} is not a catrt engine folder (build one with `catrt build`)"
            + (_manifest_given_hint(Path(folder)) or _bundles_inside_hint(Path(folder))),
            field=MANIFEST_FILE,
        ) from None
    if stat.S_ISLNK(mode):
        raise CorruptBundleError(
            f"{MANIFEST_FILE} in {echo_path(folder)} is a symbolic link; a bundle holds its own files: rebuild the engine",
            field=MANIFEST_FILE,
        )
    try:
        text = _read_regular_file(path, MAX_MANIFEST_BYTES).decode("utf-8")
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise CorruptBundleError(f"{echo_path(path)} is not a valid catrt manifest: {reason}", field=MANIFEST_FILE) from error
    if not isinstance(data, dict):
        raise CorruptBundleError(
            f"{echo_path(path)} is not a valid catrt manifest: it holds a JSON {type(data).__name__}, not an object",
            field=MANIFEST_FILE,
        )
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once: json keeps the last of a repeated key silently, so an edit could
    hide behind a first, matching one (and a reader keeping the first would see another manifest)."""
    data = dict(pairs)
    if len(data) < len(pairs):
        repeated = next(key for index, (key, _) in enumerate(pairs) if any(key == other for other, _ in pairs[:index]))
        raise ValueError(f"the key {echo(repeated)} appears twice in one object")
    return data


def _read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, opened without following a link or blocking on a pipe."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    with os.fdopen(os.open(path, flags), "rb") as stream:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(0, "it is not a regular file")
        content = stream.read(limit + 1)
    if len(content) > limit:
        raise OSError(0, f"it is over {limit} bytes, far more than any manifest")
    return content


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a bundle folder, its shape checked; the first problem is raised as a CorruptBundleError.

    Only the manifest itself is checked here; `catrt.integrity.check_integrity` also checks the
    files and the fields against each other and the graphs.
    """
    data = read_manifest_data(folder)
    problems = manifest_problems(data)
    if problems:
        raise problems[0]
    return Manifest.from_dict(data)


def build_seal(build: dict[str, Any]) -> dict[str, str]:
    """Per field of the build config, keyed `build.<name>`, the sha256 of its name and value as canonical JSON."""
    return {f"build.{name}": _field_digest(name, value) for name, value in sorted(build.items())}


def seal_problems(build: dict[str, Any], sealed: dict[str, str]) -> list[CorruptBundleError]:
    """Each build field whose value is not the one the build sealed (edited after the build), naming it."""
    problems = []
    for where in sorted({f"build.{name}" for name in build} | set(sealed)):
        name = where.removeprefix("build.")
        if sealed.get(where) != (_field_digest(name, build[name]) if name in build else None):
            value = build.get(name)
            problems.append(CorruptBundleError(
                f"{MANIFEST_FILE} field '{where}' = {echo(value)} is not the value the build wrote (its '{SEAL_FIELD}' "
                f"digest differs): the manifest was edited after the build; rebuild the engine with the setting you want",
                field=where, value=value,
            ))
    return problems


def _field_digest(name: str, value: Any) -> str:
    return hashlib.sha256(json.dumps([name, value], sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- the manifest's shape ----------------------------------------------------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}")
# Top-level fields: the type each must have (`signature` is the only optional one).
_TOP_LEVEL: dict[str, type] = {
    "format": int, "build": dict, "model": dict, "num_tokens": int, "alphas": list, "graphs": dict, "versions": dict,
    "device": dict, "files": dict, "total_size": int, "verification": dict, "exporters": dict,
}
_MODEL_FIELDS: dict[str, type] = {
    "name": str, "pipeline_class": str, "transformer_class": str, "transformer_config": dict, "transformer_sha256": str,
}
_TYPE_NAMES: dict[type, str] = {int: "an integer", dict: "an object", str: "a string", list: "a list", float: "a number"}


def manifest_problems(data: dict[str, Any]) -> list[CorruptBundleError]:
    """Every problem with the manifest's shape, each naming its field; [] when `Manifest.from_dict` may read it.

    A manifest of another `format` is reported alone: its fields are another layout's.
    """
    problems: list[CorruptBundleError] = []
    found = data.get("format")
    if "format" not in data:
        return [_shape("format", f"has no 'format' field (this catrt reads bundle format {FORMAT_VERSION})", rebuild=" with this catrt")]
    if not _is_int(found) or found != FORMAT_VERSION:
        return [
            _shape(
                "format",
                f"field 'format' is {echo(found)}, but this catrt reads bundle format {FORMAT_VERSION} only",
                value=found, rebuild=" with this catrt",
            )
        ]
    unknown = sorted(set(data) - set(_TOP_LEVEL) - {SIGNATURE_FIELD, SEAL_FIELD})
    for name in unknown:
        problems.append(_shape(str(name), f"has an unknown field {echo(name)}"))
    for name, kind in _TOP_LEVEL.items():
        problem = _typed(data, name, kind, name)
        if problem is not None:
            problems.append(problem)
    if SIGNATURE_FIELD in data and not (isinstance(data[SIGNATURE_FIELD], str) and _HEX64.fullmatch(data[SIGNATURE_FIELD])):
        problems.append(_shape(SIGNATURE_FIELD, "field 'signature' must be 64 lowercase hex characters (an HMAC-SHA256)"))
    if SEAL_FIELD in data and not (isinstance(data[SEAL_FIELD], dict)
                                   and all(isinstance(v, str) and _HEX64.fullmatch(v) for v in data[SEAL_FIELD].values())):
        problems.append(_shape(SEAL_FIELD, f"field '{SEAL_FIELD}' must map build fields to sha256 digests (64 lowercase hex characters)"))
    if _is_int(data.get("num_tokens")) and data["num_tokens"] < 1:
        problems.append(_shape("num_tokens", f"field 'num_tokens' must be at least 1, got {data['num_tokens']}", value=data["num_tokens"]))
    if isinstance(data.get("alphas"), list):
        problems += _alphas_shape(data["alphas"])
    if _is_int(data.get("total_size")) and data["total_size"] < 0:
        problems.append(_shape("total_size", f"field 'total_size' must be >= 0, got {data['total_size']}"))
    if isinstance(data.get("build"), dict):
        problems += _build_shape(data["build"])
    if isinstance(data.get("model"), dict):
        problems += _model_shape(data["model"])
    if isinstance(data.get("graphs"), dict):
        problems += _graphs_shape(data["graphs"])
    if isinstance(data.get("files"), dict):
        problems += _files_shape(data["files"])
    if isinstance(data.get("verification"), dict):
        problems += _verification_shape(data["verification"])
    for name in ("versions", "exporters", "device"):
        if isinstance(data.get(name), dict):
            problems += _strings_shape(data[name], name)
    if isinstance(data.get("device"), dict) and "kind" not in data["device"]:
        problems.append(_shape("device.kind", "field 'device.kind' is missing"))
    return problems


def _build_shape(build: dict[str, Any]) -> list[CorruptBundleError]:
    """Every BuildConfig field is present (a missing one would silently take its default)."""
    from catrt.build_config import BuildConfig

    names = [f.name for f in fields(BuildConfig)]
    problems = [_shape(f"build.{name}", f"field 'build.{name}' is missing") for name in names if name not in build]
    problems += _unknown_fields(build, names, "build")
    return problems


def _model_shape(model: dict[str, Any]) -> list[CorruptBundleError]:
    problems = [p for name, kind in _MODEL_FIELDS.items() if (p := _typed(model, name, kind, f"model.{name}")) is not None]
    problems += _unknown_fields(model, _MODEL_FIELDS, "model")
    digest = model.get("transformer_sha256")
    if isinstance(digest, str) and not _HEX64.fullmatch(digest):
        problems.append(_shape("model.transformer_sha256", "field 'model.transformer_sha256' must be 64 lowercase hex characters"))
    return problems


def _alphas_shape(alphas: list[Any]) -> list[CorruptBundleError]:
    """A non-empty list of {"alpha": number, "k": integer >= 1, "graph": string, "max_relative_error": number}."""
    if not alphas:
        return [_shape("alphas", "field 'alphas' must list at least one built alpha")]
    problems = []
    for index, entry in enumerate(alphas):
        where = f"alphas[{index}]"
        if not isinstance(entry, dict) or set(entry) != set(ALPHA_FIELDS):
            problems.append(_shape(where, f"field {echo(where)} must be an object with {', '.join(ALPHA_FIELDS)}"))
            continue
        for name, ok in (
            ("alpha", _is_number(entry["alpha"])), ("k", _is_int(entry["k"]) and entry["k"] >= 1),
            ("graph", isinstance(entry["graph"], str)), ("max_relative_error", _is_number(entry["max_relative_error"]) and entry["max_relative_error"] >= 0),
        ):
            if not ok:
                kind = {"alpha": "a number", "k": "an integer >= 1", "graph": "a string", "max_relative_error": "a number >= 0"}[name]
                problems.append(_shape(f"{where}.{name}", f"field '{where}.{name}' must be {kind}, got {echo(entry[name])}"))
    return problems


def _graphs_shape(graphs: dict[str, Any]) -> list[CorruptBundleError]:
    from catrt.contract import graph_kind
    from catrt.engines.base import DTYPES

    problems = [_shape(f"graphs.{name}", f"field 'graphs.{name}' is missing") for name in ("context", "full") if name not in graphs]
    problems += [
        _shape(f"graphs.{name}", f"has an unknown graph 'graphs.{name}' (graphs are context, full and pruned-k<k>)")
        for name in graphs if graph_kind(name) is None
    ]
    if not any(graph_kind(name) == "pruned" for name in graphs):
        problems.append(_shape("graphs.pruned", "field 'graphs' has no pruned graph (pruned-k<k>)"))
    for graph in graphs:
        spec = graphs.get(graph)
        if graph_kind(graph) is None:
            continue
        if not isinstance(spec, dict):
            problems.append(_shape(f"graphs.{graph}", f"field 'graphs.{graph}' must be an object, got {_kind(spec)}"))
            continue
        problems += _unknown_fields(spec, ("inputs", "outputs"), f"graphs.{graph}")
        for side in ("inputs", "outputs"):
            where = f"graphs.{graph}.{side}"
            tensors = spec.get(side)
            if not isinstance(tensors, list) or not tensors:
                problems.append(_shape(where, f"field {echo(where)} must be a non-empty list of tensors, got {_kind(tensors)}"))
                continue
            names: set[str] = set()
            for index, tensor in enumerate(tensors):
                at = f"{where}[{index}]"
                if not isinstance(tensor, dict) or set(tensor) != {"name", "shape", "dtype"}:
                    problems.append(_shape(at, f"field {echo(at)} must be an object with name, shape and dtype"))
                    continue
                if not isinstance(tensor["name"], str) or not tensor["name"] or tensor["name"] in names:
                    problems.append(_shape(at, f"field '{at}.name' must be a tensor name used once, got {echo(tensor['name'])}"))
                    continue
                names.add(tensor["name"])
                shape = tensor["shape"]
                if not isinstance(shape, list) or not all(_is_int(size) and size >= 1 for size in shape):
                    problems.append(_shape(f"{where}.{tensor['name']}", f"field '{where}.{tensor['name']}.shape' must be a list of positive integers, got {echo(shape)}"))
                if not isinstance(tensor["dtype"], str) or tensor["dtype"] not in DTYPES:
                    problems.append(_shape(f"{where}.{tensor['name']}", f"field '{where}.{tensor['name']}.dtype' must be one of {', '.join(DTYPES)}, got {echo(tensor['dtype'])}"))
    return problems


def _files_shape(files: dict[str, Any]) -> list[CorruptBundleError]:
    """Each record is {"sha256": 64 hex characters, "size": an integer >= 0} (names: `catrt.file_checks`)."""
    problems = []
    for name, record in files.items():
        where = f"files[{echo(name)}]"
        if not isinstance(record, dict):
            problems.append(_shape(name, f"record {where} must be an object with sha256 and size, got {_kind(record)}"))
            continue
        for key in sorted(set(record) - {"sha256", "size"}, key=str):
            problems.append(_shape(name, f"record {where} has an unknown field {echo(key)}"))
        if "sha256" not in record:
            problems.append(_shape(name, f"record {where} has no sha256"))
        elif not isinstance(record["sha256"], str) or not _HEX64.fullmatch(record["sha256"]):
            problems.append(_shape(name, f"record {where} sha256 must be 64 lowercase hex characters, got {echo(record['sha256'])}"))
        if "size" not in record:
            problems.append(_shape(name, f"record {where} has no size"))
        elif not _is_int(record["size"]) or record["size"] < 0:
            problems.append(_shape(name, f"record {where} size must be an integer >= 0, got {echo(record['size'])}"))
    return problems


def _verification_shape(verification: dict[str, Any]) -> list[CorruptBundleError]:
    problems = _unknown_fields(verification, ("max_relative_error", "tolerance", "passed"), "verification")
    errors = verification.get("max_relative_error")
    if not isinstance(errors, dict) or not errors or not all(_is_number(value) for value in errors.values()):
        problems.append(_shape("verification.max_relative_error", "field 'verification.max_relative_error' must be a non-empty object of numbers"))
    elif any(value < 0 for value in errors.values()):  # a relative error is a magnitude: a negative one was written by hand
        problems.append(_shape("verification.max_relative_error", "field 'verification.max_relative_error' must hold numbers >= 0"))
    if not _is_number(verification.get("tolerance")):
        problems.append(_shape("verification.tolerance", "field 'verification.tolerance' must be a number"))
    elif verification["tolerance"] < 0:
        problems.append(_shape("verification.tolerance", "field 'verification.tolerance' must be >= 0", value=verification["tolerance"]))
    if not isinstance(verification.get("passed"), bool):
        problems.append(_shape("verification.passed", "field 'verification.passed' must be true or false"))
    return problems


def _unknown_fields(values: dict[str, Any], known: Iterable[str], where: str) -> list[CorruptBundleError]:
    """A field no catrt writes is an edit (as at the top level and in `build`), refused rather than ignored."""
    return [_shape(f"{where}.{name}", f"has an unknown field '{where}.{name}'") for name in sorted(set(values) - set(known), key=str)]


def _strings_shape(values: dict[str, Any], where: str) -> list[CorruptBundleError]:
    return [
        _shape(f"{where}.{key}", f"field '{where}.{key}' must be a string, got {_kind(value)}")
        for key, value in values.items()
        if not isinstance(value, str)
    ]


def _typed(data: dict[str, Any], name: str, kind: type, where: str) -> CorruptBundleError | None:
    if name not in data:
        return _shape(where, f"field {echo(where)} is missing")
    value = data[name]
    if (kind is int and not _is_int(value)) or (kind is not int and not isinstance(value, kind)):
        return _shape(where, f"field {echo(where)} must be {_TYPE_NAMES[kind]}, got {_kind(value)}", value=value)
    return None


def _shape(field_name: str, message: str, value: object = None, rebuild: str = "") -> CorruptBundleError:
    return CorruptBundleError(f"{MANIFEST_FILE} {message}; rebuild the engine{rebuild}", field=field_name, value=value)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `folder` except the manifest itself."""
    return {
        path.relative_to(folder).as_posix(): {"sha256": file_digest(path), "size": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
