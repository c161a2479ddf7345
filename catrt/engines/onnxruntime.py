"""The `onnxruntime` backend: the exported ONNX graphs run by ONNX Runtime with IO binding.

Inputs and outputs are torch tensors bound by address, so no step copies through numpy; outputs are
allocated by torch on the engine's device. The CUDA execution provider is used on a GPU where it is
installed, else the CPU provider.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import numpy as np
import torch

from catrt.engines.base import GRAPHS, Engine

logger = logging.getLogger(__name__)

_NUMPY_TYPES: dict[torch.dtype, type] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
}
_PROVIDERS: dict[str, str] = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


class OnnxRuntimeEngine(Engine):
    """One InferenceSession per graph over `<graph>.onnx` and the shared `weights.bin`."""

    name = "onnxruntime"
    package = "onnxruntime"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "the onnxruntime package is not installed (pip install onnxruntime)"
        return None

    @classmethod
    def default_device(cls) -> torch.device:
        import onnxruntime

        cuda = torch.cuda.is_available() and _PROVIDERS["cuda"] in onnxruntime.get_available_providers()
        return torch.device("cuda" if cuda else "cpu")

    def load(self) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Follow torch's thread setting, so one process has one notion of how many cores it may use.
        options.intra_op_num_threads = torch.get_num_threads()
        providers = [_PROVIDERS[self.device.type]] if self.device.type == "cuda" else []
        providers.append(_PROVIDERS["cpu"])
        self.sessions = {
            graph: onnxruntime.InferenceSession(str(self.folder / f"{graph}.onnx"), options, providers=providers)
            for graph in GRAPHS
        }
        logger.info("onnxruntime sessions on %s", self.sessions["full"].get_providers())

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self.sessions[graph]
        binding = session.io_binding()
        for name, tensor in inputs.items():
            self._bind(binding.bind_input, name, tensor)
        outputs = {
            spec.name: torch.empty(spec.shape, dtype=spec.torch_dtype, device=self.device)
            for spec in self.graphs[graph].outputs
        }
        for name, tensor in outputs.items():
            self._bind(binding.bind_output, name, tensor)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written on torch's stream
        session.run_with_iobinding(binding)
        return outputs

    def _bind(self, bind: Callable[..., None], name: str, tensor: torch.Tensor) -> None:
        device_id = tensor.device.index or 0
        bind(name, tensor.device.type, device_id, _NUMPY_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
