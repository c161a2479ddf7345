"""Bundle integrity: everything about a bundle folder that is checked before any backend reads it.

`check_integrity(folder, key)` collects every problem, each a catrt error naming the file or field, running
each check from the module that owns it:

- the manifest's shape and format (`catrt.manifest.manifest_problems`);
- with a key, its signature: an HMAC-SHA256 over the canonical manifest (`catrt.signing`);
- the files: exactly the files the backend needs for the bundle's graphs (`bundle_files`) are listed, each a plain name
  inside the folder, a regular file (not a link) with its recorded size and sha256, and the folder
  holds nothing else (`catrt.file_checks`); within `digests_left_to_engine()` (`catrt.load`, which loads the bundle
  next) the sha256 of the files the backend's engine checks as it reads them, before it makes any session
  (`VERIFIED_AS_READ`), is left to that read;
- the fields against each other and the graphs: the build config is valid (`read_build_config`, here),
  k = ceil(alpha * N), N and the patch size fit the full graph's latent, height / width / batch / text length fit
  its inputs, the step graphs' activations have the build's precision, the `alphas` table lists the
  build's alphas in order, each with k = ceil(alpha * N), its own pruned graph (whose shapes are the
  full graph's with k rows) and that graph's verification error, and there is no pruned graph the
  table does not list (`catrt.manifest_consistency`, with the pipeline's facts from `catrt.pipeline_facts`);
- an onnxruntime bundle's graph files against the graphs the manifest lists (`catrt.onnx_checks`);
- last, when all else holds, each build field against the digest the build wrote of it (`sealed`), so a field no
  graph shows (t0, steps, reuse_every, ...) edited to another valid value is named too.

A signed bundle is checked against its signature only when a key is given (`key=`, or the
`CATRT_BUNDLE_KEY` environment variable read by `resolve_key`); then an unsigned or wrongly signed
bundle is refused. The checks are of the files as they are now: a key is what makes a manifest
edited together with its files (or its seal) detectable.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catrt.build_config import BuildConfig
from catrt.errors import CatrtError, ConfigError, CorruptBundleError, echo
from catrt.file_checks import BUNDLE_FILES, SETTLED_NS, VERIFIED_AS_READ, bundle_files, file_problems, name_problem
from catrt.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FIELD,
    Manifest,
    manifest_problems,
    read_manifest_data,
    seal_problems,
)
from catrt.manifest_consistency import consistency_problems
from catrt.onnx_checks import onnx_graph_problems
from catrt.pipeline_facts import rows_per_image, text_tokens_before
from catrt.signing import BUNDLE_KEY_ENV, canonical_manifest, resolve_key, sign_manifest, signature_problems

#: The checks' entry points, with the names of the modules it runs that callers use (one import for them all).
__all__ = [
    "BUNDLE_FILES", "BUNDLE_KEY_ENV", "SETTLED_NS", "IntegrityReport", "bundle_files", "canonical_manifest",
    "check_integrity", "consistency_problems", "digests_left_to_engine", "file_problems", "name_problem",
    "onnx_graph_problems",
    "read_build_config", "resolve_key", "rows_per_image", "sign_manifest", "signature_problems", "text_tokens_before",
]


@dataclass
class IntegrityReport:
    """What `check_integrity` found: the manifest and build config where readable, and every problem."""

    manifest: Manifest | None = None
    build: BuildConfig | None = None
    problems: list[CatrtError] = field(default_factory=list)
    signed: bool = False


#: Whether this thread's (or task's) checks leave the sha256 of the `VERIFIED_AS_READ` files to the engine that loads
#: the bundle next (`digests_left_to_engine`); a context variable, so the check's signature is the same for every caller.
_LEFT_TO_ENGINE: ContextVar[bool] = ContextVar("catrt_digests_left_to_engine", default=False)


@contextlib.contextmanager
def digests_left_to_engine() -> Iterator[None]:
    """Within: `check_integrity` checks the files the bundle's engine verifies as it reads them (`VERIFIED_AS_READ`)
    for all but their sha256, which that engine checks before it makes any session. Only for a caller that loads the
    bundle's engine next (`catrt.load`); `catrt inspect` and `serve --engines` hash every file."""
    token = _LEFT_TO_ENGINE.set(True)
    try:
        yield
    finally:
        _LEFT_TO_ENGINE.reset(token)


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
    backend = report.build.backend if report.build else None
    deferred = VERIFIED_AS_READ.get(backend, ()) if _LEFT_TO_ENGINE.get() and backend is not None else ()
    report.problems += file_problems(folder, report.manifest.files, backend, report.manifest.graphs, deferred)
    if report.build is not None:
        report.problems += consistency_problems(report.manifest, report.build)
    if not report.problems and report.build is not None and report.build.backend == "onnxruntime":
        report.problems += onnx_graph_problems(folder, report.manifest.graphs)
    if not report.problems and report.manifest.sealed is not None:  # last: an edit no check above could see
        report.problems += seal_problems(report.manifest.build, report.manifest.sealed)
    return report


def _files_if_readable(folder: Path, data: Mapping[str, Any]) -> list[CatrtError]:
    """File checks of a manifest with shape problems: what its `files` allows (no backend list)."""
    files = data.get("files")
    if not isinstance(files, dict):
        return []
    build = data.get("build")
    backend = build.get("backend") if isinstance(build, dict) else None
    graphs = data.get("graphs")
    return file_problems(folder, files, backend if isinstance(backend, str) else None, graphs if isinstance(graphs, dict) else None)


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
