"""Build TensorRT plans from the exported ONNX graphs (`tensorrt` is imported only when building).

Shapes are static, so one optimization profile-free engine per graph. Networks are strongly typed: the
ONNX graphs are exported in the build's precision (the pipeline is loaded in its dtype), and TensorRT
keeps every tensor in the type the graph gives it. TensorRT 11 builds only strongly typed networks
(its `BuilderFlag` has no FP16 / BF16 any more); TensorRT 10 needs the `STRONGLY_TYPED` creation flag
and refuses the FP16 / BF16 builder flags on such a network, so both are built the same way. TF32 is
turned off (TensorRT enables it by default): an fp32 graph computes in fp32, as torch's matmuls do by
default, and as the fp32 build's verification tolerance assumes. The timing cache lives beside the
engine folders and is reused by later builds (a cache this TensorRT or GPU cannot use is set aside
with a warning: it only speeds builds up).

Every builder call's result is checked and each failure raises a `BuildError` naming the graph.
Plans (and the shared timing cache) are written to a temporary file and renamed into place, so a
failed or interrupted build never leaves a truncated `<graph>.plan` in the staging folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from catrt import atomic_files
from catrt.build_config import BuildConfig
from catrt.errors import BuildError

logger = logging.getLogger(__name__)

TIMING_CACHE = "tensorrt-timing.cache"


def build_plans(onnx_dir: Path, engine_dir: Path, build: BuildConfig, graphs: Iterable[str]) -> None:
    """`<graph>.plan` for each of `graphs` (context, full, one pruned graph per k) from `onnx_dir`, written
    into `engine_dir` (the build's staging folder). `build`'s precision is already the ONNX graphs' own."""
    import tensorrt

    trt_logger = tensorrt.Logger(tensorrt.Logger.WARNING)
    cache_path = engine_dir.parent / TIMING_CACHE  # beside the engine folders, shared by later builds
    for graph in graphs:
        plan = _build_plan(tensorrt, trt_logger, graph, onnx_dir / f"{graph}.onnx", cache_path)
        atomic_files.write_bytes(engine_dir / f"{graph}.plan", memoryview(plan))  # IHostMemory is a buffer
        logger.info("built %s.plan (%d bytes)", graph, (engine_dir / f"{graph}.plan").stat().st_size)


def _build_plan(tensorrt: Any, trt_logger: Any, graph: str, onnx_path: Path, cache_path: Path) -> Any:
    """One graph's serialized engine; the timing cache is updated on disk after the build."""
    if not onnx_path.is_file():
        raise BuildError(f"the {graph!r} graph's ONNX file {onnx_path} is missing; export it first", field=f"{graph}.onnx")
    builder = _construct(tensorrt.Builder, trt_logger, graph=graph, what="create a builder")
    strongly_typed = 1 << int(tensorrt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = _checked(builder.create_network(strongly_typed), graph, "create a network")
    parser = _construct(tensorrt.OnnxParser, network, trt_logger, graph=graph, what="create an ONNX parser")
    # From the file's path, so the parser finds the external weights file beside it (graphs over 2 GB must have one).
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no parser error recorded"
        raise BuildError(f"TensorRT could not parse the {graph!r} graph's {onnx_path.name}: {errors}", field=f"{graph}.onnx")
    config = _checked(builder.create_builder_config(), graph, "create a builder config")
    config.clear_flag(tensorrt.BuilderFlag.TF32)
    _use_timing_cache(config, graph, cache_path)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(
            f"TensorRT failed to build the {graph!r} graph's {graph}.plan (see the TensorRT log above)", field=f"{graph}.plan"
        )
    cache = config.get_timing_cache()
    if cache is not None:
        atomic_files.write_bytes(cache_path, memoryview(cache.serialize()))
    return plan


def _use_timing_cache(config: Any, graph: str, cache_path: Path) -> None:
    """Start the build from the shared timing cache, or from an empty one if that cache does not fit."""
    try:
        saved = cache_path.read_bytes() if cache_path.is_file() else b""
    except OSError as error:  # another user's cache in a shared engines folder, say: a traceback before, not a slower build
        logger.warning("the TensorRT timing cache %s cannot be read (%s); building %r without it", cache_path, error.strerror, graph)
        saved = b""
    if saved:
        try:
            cache = config.create_timing_cache(saved)
        except Exception:  # a damaged blob may raise instead of returning None
            cache = None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        logger.warning(
            "the TensorRT timing cache %s does not fit this TensorRT or GPU; building %r without it", cache_path, graph
        )
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BuildError(f"TensorRT could not create a timing cache for the {graph!r} graph", field=f"{graph}.plan")


def _construct(cls: Any, *args: Any, graph: str, what: str) -> Any:
    """`cls(*args)` for a TensorRT class whose constructor wraps a factory (`Builder`, `OnnxParser`): where the
    factory makes no object, pybind11 raises a TypeError (it never returns None); a BuildError naming the graph."""
    try:
        return cls(*args)
    except TypeError as error:
        raise BuildError(
            f"TensorRT could not {what} for the {graph!r} graph (see the TensorRT log above): {error}", field=f"{graph}.plan"
        ) from error


def _checked(result: Any, graph: str, what: str) -> Any:
    if result is None:
        raise BuildError(f"TensorRT could not {what} for the {graph!r} graph (see the TensorRT log above)", field=f"{graph}.plan")
    return result
