"""Backends that run a build's graphs, chosen by name from `ENGINES`."""

from __future__ import annotations

import torch

from catrt.engines.base import Engine, GraphSpec, TensorSpec
from catrt.engines.compile import CompileEngine
from catrt.engines.eager import EagerEngine
from catrt.engines.onnxruntime import OnnxRuntimeEngine
from catrt.engines.tensorrt import TensorRTEngine
from catrt.errors import ConfigError, echo

ENGINES: dict[str, type[Engine]] = {
    engine.name: engine for engine in (EagerEngine, CompileEngine, OnnxRuntimeEngine, TensorRTEngine)
}
#: `--backend auto` takes the first available: TensorRT on a GPU, else compile on a GPU, else ONNX Runtime.
AUTO_PREFERENCE: tuple[str, ...] = ("tensorrt", "compile", "onnxruntime")


def resolve_backend(name: str) -> str:
    """A concrete backend name; "auto" picks by the machine, a named one must be able to run here."""
    if name == "auto":
        gpu = torch.cuda.is_available()
        for candidate in AUTO_PREFERENCE:
            engine = ENGINES[candidate]
            if engine.unavailable_reason() is None and (gpu or not engine.gpu_only_in_auto):
                return candidate
        raise ConfigError("no backend can run on this machine (install onnxruntime)", field="backend", value=name)
    engine = ENGINES.get(name)
    if engine is None:
        raise ConfigError(f"unknown backend {echo(name)}; known: auto, {', '.join(ENGINES)}", field="backend", value=name)
    reason = engine.unavailable_reason()
    if reason is not None:
        raise ConfigError(f"backend {echo(name)} cannot run here: {reason}", field="backend", value=name)
    return name


__all__ = ["AUTO_PREFERENCE", "ENGINES", "Engine", "GraphSpec", "TensorSpec", "resolve_backend"]
