"""`build_engines`: export, compile and verify one build, then publish it as `engines/<build-name>/`.

A build is published only whole: it is written into a temporary folder beside the final one and
swapped into place (`catrt.publish`) after the built engines reproduced the eager adapter within
tolerance. A failed or killed build leaves an earlier build of the same name untouched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from catrt import atomic_files
from catrt.build_config import BuildConfig, format_alphas
from catrt.engines import ENGINES, GraphSpec, resolve_backend
from catrt.checks import MAX_KEPT_ALPHAS, path_is, writable_folder
from catrt.config import shared_k
from catrt.contract import pruned_graph
from catrt.errors import PATH_ECHO_LIMIT, BuildError, CatrtError, ConfigError, UnsupportedModelError, echo, echo_path
from catrt.generation import check_pipeline_size, check_text_to_image
from catrt.export import BACKEND_BUILDS, capture_step_sample, export_graphs, graph_spec, reference_io
from catrt.loading import load_pipeline, loader_for
from catrt.manifest import MANIFEST_FILE, Manifest, build_seal, describe_files, read_manifest_data, write_manifest
from catrt.models import Adapter, make_adapter
from catrt.pipeline import default_image_size, pipeline_spec
from catrt.pipeline_facts import check_latent_channels
from catrt.prompts import check_text_length
from catrt.provenance import describe_device, package_versions, transformer_config, weights_digest
from catrt.publish import STAGING_OVERHEAD, refuse_non_folder, refuse_unreplaceable, staged_folder
from catrt.signing import resolve_key, sign_manifest

logger = logging.getLogger(__name__)

#: Largest accepted max|engine - eager| / max|eager| per output, by precision.
TOLERANCES: dict[str, float] = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 6e-2}
STAGES: tuple[str, ...] = ("load model", "sample inputs", "export", "engine", "verify", "manifest")


@dataclass
class _Reference:
    """Example inputs of both graphs, and the eager adapter's outputs on them."""

    inputs: dict[str, dict[str, torch.Tensor]]
    outputs: dict[str, dict[str, torch.Tensor]]
    num_tokens: int
    ks: tuple[int, ...]  # per built alpha, in order


def build_engines(
    config: BuildConfig,
    out_dir: Path = Path("engines"),
    export_dir: Path = Path("export"),
    progress: bool = True,
    sign_key: bytes | None = None,
) -> Path:
    """Build, verify and publish the engines of `config`; returns `out_dir / <build-name>`.

    Args:
        config: what to build; `backend="auto"` and an unset resolution are resolved here.
        out_dir: parent folder of the engine bundles.
        export_dir: parent folder of the ONNX exports (kept for inspection and rebuilds).
        progress: show tqdm bars for the stages.
        sign_key: sign the manifest with this key (HMAC-SHA256, `catrt.signing.sign_manifest`), so
            `catrt.load(..., key=sign_key)` can tell it from an edited or foreign bundle.

    Example:
        >>> path = build_engines(BuildConfig("tiny-sd3", height=64, width=64, steps=12, t0=4))
        >>> fast = catrt.load(path)
    """
    if not isinstance(config, BuildConfig):  # a dict would fail deep in the build: make the config first
        raise ConfigError(
            f"build_engines takes a catrt BuildConfig, got {type(config).__name__} {echo(config)}; make one with "
            f"BuildConfig(model, height=..., steps=...) (or BuildConfig.from_dict for a dict)",
            field="config", value=type(config).__name__,
        )
    if sign_key is not None:
        sign_key = resolve_key(sign_key)  # an empty or non-bytes key is refused before any work
    config = config.resolved(backend=resolve_backend(config.backend), model=model_reference(config.model))
    engine = ENGINES[config.backend]
    device = engine.default_device()
    if config.precision not in engine.precisions:
        raise ConfigError(
            f"the {config.backend} backend cannot build {config.precision}: {engine.precision_note}",
            field="precision", value=config.precision,
        )
    if device.type == "cpu" and config.precision == "fp16":
        raise ConfigError(
            f"precision fp16 needs a CUDA device (most fp16 kernels do not run on the CPU); backend "
            f"{config.backend} runs on the CPU here: build fp32 (or bf16 with eager / compile)",
            field="precision", value=config.precision,
        )
    if len(config.alphas) > MAX_KEPT_ALPHAS:  # as `catrt serve` refuses to serve such a bundle
        raise ConfigError(
            f"a build has at most {MAX_KEPT_ALPHAS} alphas, got {len(config.alphas)} ({format_alphas(config.alphas)}): "
            f"catrt keeps the pruned graphs of {MAX_KEPT_ALPHAS} alphas per shape, so calls at more would remake one "
            f"at every call; build the alphas you use, at most {MAX_KEPT_ALPHAS}",
            field="alphas", value=len(config.alphas),
        )
    with _new_folders_removed_on_failure(Path(out_dir), Path(export_dir)):
        return _check_and_build(config, device, Path(out_dir), Path(export_dir), progress, sign_key)


@contextlib.contextmanager
def _new_folders_removed_on_failure(*folders: Path) -> Iterator[None]:
    """A build that fails removes the folders it made (`folders` and their missing parents) where they are still
    empty, so a refused build leaves nothing behind; a folder that existed before, a user's, is never touched."""
    made = {path for folder in folders for path in (folder.absolute(), *folder.absolute().parents) if not os.path.lexists(path)}
    try:
        yield
    except BaseException:
        for path in sorted(made, key=lambda path: len(path.parts), reverse=True):  # the deepest first
            with contextlib.suppress(OSError):  # not made after all, or not empty: left as it is
                os.rmdir(path)
        raise


def _check_and_build(
    config: BuildConfig, device: torch.device, out_dir: Path, export_dir: Path, progress: bool, sign_key: bytes | None,
) -> Path:
    """`build_engines` from its folders on: made (or refused) before the model loads, then the build itself."""
    _check_folder(out_dir, "out_dir")
    if BACKEND_BUILDS[config.backend].needs_onnx:
        _check_folder(export_dir, "export_dir")
        if export_dir.resolve() == out_dir.resolve():
            # The export of a build is published under the bundle's own name: it would replace an earlier bundle
            # before this one is verified, so a failed or interrupted build would leave no bundle there.
            raise ConfigError(
                f"export_dir and out_dir are both {echo_path(out_dir)}: the ONNX export would take the bundle's place while "
                f"it builds; give them different folders (--out / --export-dir)",
                field="export_dir", value=str(export_dir),
            )
    if config.height is not None and config.width is not None:  # the name is known before loading; else once loaded
        _check_name_length(config, out_dir, export_dir)
        _check_publishable(config, out_dir, export_dir)
    bar = tqdm(total=len(STAGES), desc="catrt build", disable=not progress)
    with bar:
        bar.set_postfix_str(STAGES[0])
        pipe = load_pipeline(config.model, device=device, dtype=config.dtype)
        pipe.set_progress_bar_config(disable=True)
        check_text_to_image(pipe, config.model)
        _refuse_quantized(pipe.transformer, config.model)  # before any adapter's checks, whose fixes are accelerate's
        check_pipeline_size(pipe, config.height, config.width, config.model)  # a model without a card: known once loaded
        check_text_length(pipe, pipeline_spec(pipe), config.max_sequence_length)
        config = _with_resolution(config, pipe)
        adapter = make_adapter(pipe.transformer)
        check_latent_channels(pipe, pipeline_spec(pipe))
        bar.update()
        return _build(config, pipe, adapter, device, out_dir, export_dir, bar, sign_key)


def _refuse_quantized(transformer: torch.nn.Module, model: str) -> None:
    """Refuse a quantized transformer (torchao's `quantize_` / `TorchAoConfig`, a GGUF or bitsandbytes checkpoint) before
    minutes of work: its weights are tensor subclasses or integer blocks, on which the build failed with a traceback
    after exporting (the manifest's config and weight digest cannot record them; ONNX export fell back to TorchScript).
    `catrt.accelerate` runs such a pipeline, its layers through their own quantized forwards. A weight that is no plain
    Parameter for another reason (a lazy module's, a sharded DTensor) is refused as what it is (`_refuse_unexportable`)."""
    if not isinstance(transformer, torch.nn.Module):  # no transformer at all: make_adapter names it, after the size checks
        return
    for name, tensor in transformer.named_parameters():
        if type(tensor) is not torch.nn.Parameter or not tensor.is_floating_point():
            _refuse_unexportable(transformer, name, tensor, model)
            kind = f"{type(tensor).__module__}.{type(tensor).__name__}"
            raise UnsupportedModelError(
                f"the transformer of {model} is quantized (its weight {name!r} is a {kind} of {tensor.dtype}), which "
                f"catrt build cannot export or record: build from the unquantized model (--precision bf16 or fp16 halves "
                f"it), or run the quantized pipeline with catrt.accelerate(pipe, config)",
                field="model", value=name,
            )


def _refuse_unexportable(transformer: torch.nn.Module, name: str, tensor: torch.Tensor, model: str) -> None:
    """Refuse, naming its module and the fix, a weight that is not quantized but cannot be exported either: a lazy
    module's (`torch.nn.LazyLinear` before its first forward: no shape, no data) or one sharded across processes (a
    `DTensor`, from FSDP2's `fully_shard` or tensor parallelism). Both were refused as "quantized", whose fix (build from
    the unquantized model) was no fix."""
    path = name.rpartition(".")[0]
    owner = type(transformer.get_submodule(path)).__name__
    module = f"module {path!r} ({owner})" if path else f"the transformer itself ({owner})"
    if isinstance(tensor, torch.nn.parameter.UninitializedParameter):
        raise UnsupportedModelError(
            f"the transformer of {model} has an uninitialised weight {name!r} (of {module}, a lazy module before its "
            f"first forward: no shape or values yet), which catrt build cannot export or record: load its weights, or "
            f"run the pipeline once so that it initialises, then build",
            field="model", value=name,
        )
    if type(tensor).__name__ == "DTensor" and type(tensor).__module__.startswith("torch.distributed"):
        raise UnsupportedModelError(
            f"the transformer of {model} is sharded across processes (its weight {name!r}, of {module}, is a "
            f"torch.distributed DTensor: FSDP2's fully_shard or tensor parallelism), which catrt build cannot export or "
            f"record: build in one process from the model loaded whole, without fully_shard or parallelize_module",
            field="model", value=name,
        )


def _build(
    config: BuildConfig,
    pipe: Any,
    adapter: Adapter,
    device: torch.device,
    out_dir: Path,
    export_dir: Path,
    bar: tqdm,
    sign_key: bytes | None = None,
) -> Path:
    name = config.build_name()
    _check_name_length(config, out_dir, export_dir)
    bar.set_description(f"catrt build {name}")
    backend = BACKEND_BUILDS[config.backend]
    _check_publishable(config, out_dir, export_dir)
    _check_same_model(out_dir / name, config.model)
    bar.set_postfix_str(STAGES[1])
    reference = _reference(config, pipe, adapter)
    specs = {graph: graph_spec(reference.inputs[graph], reference.outputs[graph]) for graph in reference.inputs}
    bar.update()
    if backend.needs_onnx:
        _check_no_bundle(export_dir / name)
    # Checked again as it is published: another build of another model folder of this name may have published meanwhile.
    with staged_folder(out_dir / name, check=lambda: _check_same_model(out_dir / name, config.model)) as staging:
        exporters = _export_and_write_engine(config, adapter, reference, tuple(specs), export_dir / name, staging, bar)
        bar.set_postfix_str(STAGES[4])
        verification = _verify(config, staging, specs, adapter, device, reference)
        bar.update()
        bar.set_postfix_str(STAGES[5])
        manifest = _manifest(config, pipe, device, reference, specs, verification, exporters, staging)
        if sign_key is not None:
            # Signed as it will be read back: the JSON round trip turns tuples into lists.
            manifest = replace(manifest, signature=sign_manifest(json.loads(json.dumps(manifest.to_dict())), sign_key))
        write_manifest(staging, manifest)
        bar.update()
    logger.info("built %s", out_dir / name)
    return out_dir / name


def _export_and_write_engine(
    config: BuildConfig, adapter: Adapter, reference: _Reference, graphs: tuple[str, ...], export_folder: Path,
    staging: Path, bar: tqdm,
) -> dict[str, str]:
    """Export the graphs (a backend that needs ONNX) and write the engine files into `staging` from this build's own
    export, then publish that export as `export_folder` (kept to inspect, also where the engine step failed); the
    exporters by graph. The engine is never written from `export_folder` itself: another build of this name (a second
    terminal, a CI matrix) may publish its export there meanwhile, and the files read were then that build's, or gone
    halfway (swapped out and removed)."""
    backend = BACKEND_BUILDS[config.backend]
    if not backend.needs_onnx:
        bar.update()
        bar.set_postfix_str(STAGES[3])
        backend.write_engine(export_folder, staging, config, graphs)
        bar.update()
        return {}
    bar.set_postfix_str(STAGES[2])
    failed: CatrtError | OSError | None = None
    # Checked again as it is published: another build whose --out is this --export-dir may have published there meanwhile.
    with staged_folder(export_folder, check=lambda: _check_no_bundle(export_folder)) as onnx_staging:
        exporters = export_graphs(adapter, reference.inputs, reference.outputs, onnx_staging, progress=not bar.disable)
        bar.update()
        bar.set_postfix_str(STAGES[3])
        try:
            backend.write_engine(onnx_staging, staging, config, graphs)
        # TensorRT could not parse or build a graph: the export it read is published to look at. A write the disk
        # refused is the engine folder's (raised past the export's block, which would name the export folder).
        except (CatrtError, OSError) as error:
            failed = error
    if failed is not None:
        raise failed
    bar.update()
    return exporters


def model_reference(model: str) -> str:
    """How a bundle names its model: a catrt name as it is, a diffusers folder as an absolute path, so the
    bundle loads from any working directory (a relative one would name another folder, or none, elsewhere)."""
    if loader_for(model) is not None or not path_is(Path(model) / "model_index.json", "file"):
        return model  # a name wins over a folder of the same name; anything else is refused when loading
    return os.path.abspath(model)


def _check_same_model(folder: Path, model: str) -> None:
    """A build replaces an earlier bundle of its name only if that is a build of the same model: a name holds a
    model folder's last component only, so two folders of one name (/a/sd3-ft, /b/sd3-ft) would replace each other."""
    try:
        earlier = read_manifest_data(folder).get("build", {}).get("model")
    except (CatrtError, AttributeError):
        return  # no bundle there, or not one this catrt reads: nothing of the user's is lost
    if isinstance(earlier, str) and earlier != model:
        raise ConfigError(
            f"{echo_path(folder)} holds a build of model {echo(earlier, PATH_ECHO_LIMIT)}, this one is of {echo(model, PATH_ECHO_LIMIT)}: it would replace it; build into "
            f"another --out, or remove {echo_path(folder)} first",
            field="out_dir", value=str(folder),
        )


def _check_no_bundle(export_folder: Path) -> None:
    """The ONNX export is published as `export_folder` (`<export_dir>/<name>`): an engine bundle there (an earlier
    build's --out) would be replaced by it."""
    if (export_folder / MANIFEST_FILE).exists():
        raise ConfigError(
            f"export_dir {echo_path(export_folder.parent)} holds the engine bundle {export_folder.name}: the ONNX export "
            f"would take its place; give another --export-dir (the default is export)",
            field="export_dir", value=str(export_folder.parent),
        )


def _check_publishable(config: BuildConfig, out_dir: Path, export_dir: Path) -> None:
    """Where the build will be published, checked before minutes of work: a user's file there is refused, not moved,
    and another user's bundle in a sticky folder (`--out /tmp`), which this user may not swap away, is refused."""
    name = config.build_name()
    refuse_non_folder(out_dir / name, "move it away, or build into another --out", field="out_dir")
    refuse_unreplaceable(out_dir / name, "build into another --out, or have its owner remove it", field="out_dir")
    if BACKEND_BUILDS[config.backend].needs_onnx:
        _refuse_nested(out_dir, export_dir, name)
        refuse_non_folder(export_dir / name, "move it away, or export into another --export-dir", field="export_dir")
        refuse_unreplaceable(export_dir / name, "export into another --export-dir, or have its owner remove it",
                             field="export_dir")


def _refuse_nested(out_dir: Path, export_dir: Path, name: str) -> None:
    """Refuse an --export-dir that is or is inside `<out>/<name>`, and an --out inside `<export-dir>/<name>`: the
    folder published there swapped the other folder away with it, so the user lost the export they asked to keep (or
    the build its staged bundle). Links are resolved, as publishing follows them."""
    _refuse_inside(export_dir, "export_dir", out_dir / name, "this build's bundle is published (--out)", "the ONNX export")
    _refuse_inside(out_dir, "out_dir", export_dir / name, "its ONNX export is published (--export-dir)", "the bundle it builds")


def _refuse_inside(folder: Path, field: str, published: Path, what: str, lost: str) -> None:
    real, target = Path(os.path.realpath(folder)), Path(os.path.realpath(published))
    if real == target or target in real.parents:
        raise ConfigError(
            f"{field} {echo_path(folder)} is {'' if real == target else 'inside '}{echo_path(published)}, where {what}: "
            f"publishing there would remove {lost}; give --out and --export-dir folders outside each other's <name> folder",
            field=field, value=str(folder),
        )


def _check_name_length(config: BuildConfig, out_dir: Path, export_dir: Path) -> None:
    """Refuse a build name no folder can have: its model folder's name and the settings (many alphas) make it, and a
    name over the filesystem's limit failed after the model loaded with an OSError traceback ('File name too long'),
    as did one within 14 bytes of it, whose staging folder `.<name>.tmp-XXXXXXXX` is longer."""
    name = config.build_name()
    folders = (out_dir, export_dir) if BACKEND_BUILDS[config.backend].needs_onnx else (out_dir,)
    longest = min(atomic_files.name_limit(folder) for folder in folders) - STAGING_OVERHEAD
    if len(os.fsencode(name)) > longest:
        raise ConfigError(
            f"the build name {echo(name, PATH_ECHO_LIMIT)} is {len(os.fsencode(name))} bytes, but its folder (staged as "
            f".<name>.tmp-XXXXXXXX) takes at most {longest} here: build from a model folder of a shorter name (a link "
            f"to it of a shorter name will do) or with fewer alphas",
            field="model", value=name,
        )


def _check_folder(folder: Path, name: str) -> None:
    """Make `folder` now, before minutes of work, or refuse it; a bundle folder is never a parent of bundles
    (one inside it would make it unloadable: it holds only its listed files)."""
    if path_is(folder / MANIFEST_FILE):
        raise ConfigError(
            f"{name} {echo_path(folder)} is an engine bundle; builds go beside it: give its parent folder (--out / --export-dir)",
            field=name, value=str(folder),
        )
    # realpath, not Path.resolve: a link loop on the way raised RuntimeError (a traceback) before writable_folder's line
    bundle = next((parent for parent in Path(os.path.realpath(folder)).parents if _is_bundle(parent)), None)
    if bundle is not None:
        raise ConfigError(
            f"{name} {echo_path(folder)} is inside the engine bundle {echo_path(bundle)}; a folder made there would make that bundle "
            f"unloadable: give a folder outside it (--out / --export-dir)",
            field=name, value=str(folder),
        )
    writable_folder(folder, f"{name} {echo_path(folder)}", "pick another (--out / --export-dir)", field=name)


def _is_bundle(folder: Path) -> bool:
    """Whether `folder` holds a catrt manifest (another program's manifest.json is no bundle). Called for every
    parent of a build's folders, so a folder without one is answered without reading (or listing) it."""
    if not os.path.lexists(folder / MANIFEST_FILE):
        return False
    try:
        data = read_manifest_data(folder)
    except CatrtError:
        return False
    return {"format", "build", "files"} <= set(data)


def _with_resolution(config: BuildConfig, pipe: Any) -> BuildConfig:
    """Fill an unset height / width with the model's default image size."""
    default = default_image_size(pipe)
    return config.resolved(height=config.height or default, width=config.width or default)


def _reference(config: BuildConfig, pipe: Any, adapter: Adapter) -> _Reference:
    try:
        sample = capture_step_sample(pipe, adapter, config)
    except CatrtError:
        raise
    except ValueError as error:  # the pipeline's own argument checks (a text length over its limit, say)
        raise ConfigError(
            f"{type(pipe).__name__} refused this build's settings: {error}; change the build flags", field="build",
        ) from error
    num_tokens = adapter.tokens_of(sample.hidden_states).shape[1]
    if (shared := shared_k(config.alphas, num_tokens)) is not None:
        other, alpha, k = shared
        raise ConfigError(
            f"alphas {other:g} and {alpha:g} both select k = {k} of the {num_tokens} image tokens "
            f"at {config.width}x{config.height}, so they would run the same pruned graph: drop one",
            field="alphas", value=list(config.alphas),
        )
    ks = tuple(config.num_selected(num_tokens, alpha) for alpha in config.alphas)
    inputs, outputs = reference_io(sample, adapter, ks)
    return _Reference(inputs, outputs, num_tokens, ks)


def _verify(
    config: BuildConfig, folder: Path, specs: dict[str, GraphSpec], adapter: Adapter, device: torch.device, reference: _Reference
) -> dict[str, Any]:
    """Run every graph (context, full, each pruned graph) on the built engines; over tolerance fails the build."""
    engine = ENGINES[config.backend](folder, specs, device, adapter)
    engine.load()
    tolerance = TOLERANCES[config.precision]
    errors = {}
    for graph, inputs in reference.inputs.items():
        outputs = engine.run(graph, specs[graph].prepare(inputs))
        for name, expected in reference.outputs[graph].items():
            got = outputs[name].float()
            scale = expected.float().abs().max().clamp_min(1e-6)
            errors[f"{graph}.{name}"] = float((got - expected.float()).abs().max() / scale)
    # A NaN error compares false with any tolerance: a non-finite output (fp16 overflow, say) fails the build too.
    worst = next((name for name, error in errors.items() if not math.isfinite(error)), None) or max(errors, key=errors.__getitem__)
    if not errors[worst] <= tolerance:
        raise BuildError(
            f"the {config.backend} engine's {worst} differs from the eager adapter by {errors[worst]:.3g} "
            f"(relative), over the {config.precision} tolerance {tolerance:g}; the build was not published",
            field=worst, value=errors[worst],
        )
    logger.info("verified against eager: worst relative error %.3g (%s)", errors[worst], worst)
    return {"max_relative_error": errors, "tolerance": tolerance, "passed": True}


def alpha_table(config: BuildConfig, reference: _Reference, verification: dict[str, Any]) -> list[dict[str, Any]]:
    """Per built alpha, in order: its k, its pruned graph and that graph's worst verification error."""
    errors = verification["max_relative_error"]
    table = []
    for alpha, k in zip(config.alphas, reference.ks, strict=True):
        graph = pruned_graph(k)
        worst = max(error for name, error in errors.items() if name.split(".")[0] == graph)
        table.append({"alpha": alpha, "k": k, "graph": graph, "max_relative_error": worst})
    return table


def _manifest(
    config: BuildConfig,
    pipe: Any,
    device: torch.device,
    reference: _Reference,
    specs: dict[str, GraphSpec],
    verification: dict[str, Any],
    exporters: dict[str, str],
    folder: Path,
) -> Manifest:
    files = describe_files(folder)
    return Manifest(
        build=config.to_dict(),
        model={
            "name": config.model,
            "pipeline_class": type(pipe).__name__,
            "transformer_class": type(pipe.transformer).__name__,
            "transformer_config": transformer_config(pipe.transformer),
            "transformer_sha256": weights_digest(pipe.transformer),
        },
        num_tokens=reference.num_tokens,
        alphas=alpha_table(config, reference, verification),
        graphs={graph: spec.to_dict() for graph, spec in specs.items()},
        versions=package_versions(),
        device=describe_device(device),
        files=files,
        total_size=sum(record["size"] for record in files.values()),
        verification=verification,
        exporters=exporters,
        sealed=build_seal(config.to_dict()),
    )
