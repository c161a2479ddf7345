"""Build TensorRT plans from the exported ONNX graphs (`tensorrt` is imported only when building).

Shapes are static, so one optimization profile-free engine per graph; fp16 / bf16 are builder flags
over the same ONNX. The timing cache lives beside the engine folders and is reused by later builds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from catrt.build_config import BuildConfig
from catrt.engines.base import GRAPHS
from catrt.errors import BuildError

logger = logging.getLogger(__name__)

TIMING_CACHE = "tensorrt-timing.cache"
_FLAGS: dict[str, tuple[str, ...]] = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",)}


def build_plans(onnx_dir: Path, engine_dir: Path, build: BuildConfig) -> None:
    """`<graph>.plan` for every graph of `onnx_dir`, written into `engine_dir`."""
    import tensorrt

    logger_ = tensorrt.Logger(tensorrt.Logger.WARNING)
    cache_path = engine_dir.parent / TIMING_CACHE  # beside the engine folders, shared by later builds
    for graph in GRAPHS:
        builder = tensorrt.Builder(logger_)
        network = builder.create_network(0)
        parser = tensorrt.OnnxParser(network, logger_)
        if not parser.parse_from_file(str(onnx_dir / f"{graph}.onnx")):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BuildError(f"TensorRT could not parse {graph}.onnx: {errors}", field=f"{graph}.onnx")
        config = builder.create_builder_config()
        for flag in _FLAGS[build.precision]:
            config.set_flag(getattr(tensorrt.BuilderFlag, flag))
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BuildError(f"TensorRT failed to build {graph}.plan (see the TensorRT log above)", field=f"{graph}.plan")
        (engine_dir / f"{graph}.plan").write_bytes(bytes(plan))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))

