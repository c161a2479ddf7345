"""The `tensorrt` backend: serialized TensorRT engines (`<graph>.plan`) run on torch CUDA tensors.

Tensors are bound by address (`set_tensor_address`) and the engine is enqueued on torch's current
stream, so no copy and no host sync happens inside a step. `tensorrt` is imported only on load.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from catrt.engines.base import GRAPHS, Engine

logger = logging.getLogger(__name__)


class TensorRTEngine(Engine):
    """One execution context per graph; plans are tied to the GPU's compute capability."""

    name = "tensorrt"
    package = "tensorrt"
    device_fields = ("kind", "compute_capability")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch.cuda.is_available():
            return "TensorRT needs an NVIDIA GPU and torch with CUDA; none is available here"
        if importlib.util.find_spec("tensorrt") is None:
            return "the tensorrt package is not installed (pip install 'catrt[tensorrt]')"
        return None

    @classmethod
    def default_device(cls) -> torch.device:
        return torch.device("cuda")

    def load(self) -> None:
        import tensorrt

        runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
        self.engines = {graph: runtime.deserialize_cuda_engine((self.folder / f"{graph}.plan").read_bytes()) for graph in GRAPHS}
        self.contexts = {graph: engine.create_execution_context() for graph, engine in self.engines.items()}

    def run(
        self, graph: str, inputs: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        context = self.contexts[graph]
        outputs = self.outputs_of(graph, out)
        for name, tensor in {**inputs, **outputs}.items():
            context.set_tensor_address(name, tensor.data_ptr())
        context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream)
        return outputs
