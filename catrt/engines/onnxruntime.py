"""The `onnxruntime` backend: the exported ONNX graphs run by ONNX Runtime with IO binding.

Inputs and outputs are torch tensors bound by address, so no step copies through numpy. Outputs go
into buffers allocated once, on first use (or the caller's own tensors, such as the runtime's K/V cache).
The sessions (context, full, one pruned graph per built alpha) share one copy of the weights: `weights.bin` is read once
into memory and each distinct initializer is handed to every session that uses it (`add_initializer`), so loading costs
one copy of the weights, not one per graph. `weights.bin` and its index `initializers.json` are read by catrt and checked
as read against the manifest `catrt.load` checked, so a file written in place after that check is refused naming it,
and one written after the load changes nothing. What ONNX Runtime reads itself, by path, while the sessions are made
(each graph, and from `weights.bin` the weights its optimizations fold) is hashed by catrt just before and must be the
same file, unwritten, once they are made (`VerifiedFile.check_unchanged`). Handing ONNX Runtime a graph's bytes instead
would not do: ONNX Runtime 1.18 and 1.19 (tried here) then look for `weights.bin` in the working directory when their
optimizations fold a weight, and fail. The CUDA execution provider is used on a GPU where it is
installed, else the CPU provider. ONNX Runtime uses a shared initializer as it is only where it
already lies on the device its session planned for it (its session-state code says so), so on CUDA
the floating-point weights are copied to the GPU once at load and shared from there, as torch tensors
handed over by DLPack (`SharedInitializers`: `add_initializer` takes only memory its caller owns); one
ONNX Runtime plans elsewhere gets a session copy of its own, and ONNX Runtime logs a warning naming it.
The CUDA provider runs on the engine's GPU (`device_id`), with TF32 as torch's matmuls have it
(`use_tf32`); a session ONNX Runtime could not give it is refused at load. Not run here (the lent GPU
machine has ONNX Runtime's CPU build).
ONNX Runtime's TensorRT execution provider is left out even where installed: it builds a TensorRT engine per
session, each with its own copy of the weights, where these sessions share one (TensorRT is the `tensorrt` backend).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from catrt.engines.base import Engine
from catrt.errors import EngineMismatchError

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
    precisions = ("fp32", "fp16")
    precision_note = (
        "ONNX Runtime's CPU provider has no bf16 kernels (MatMul, Add), the shared weights are numpy views of "
        "weights.bin and numpy has no bfloat16, and bf16 on its CUDA provider is untried; build fp32 (or fp16 on a "
        "CUDA device) with onnxruntime, or bf16 with the eager or compile backend (tensorrt on a GPU)"
    )

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

        from catrt.engines.shared_weights import SharedInitializers
        from catrt.engines.verified_file import hashed_file

        if self.device.type == "cuda" and self.device.index is None:  # torch's current GPU, fixed for this engine
            self.device = torch.device("cuda", torch.cuda.current_device())
        providers = [(_PROVIDERS["cuda"], self.cuda_options())] if self.device.type == "cuda" else []
        providers.append(_PROVIDERS["cpu"])
        self.initializers = SharedInitializers(self.folder, self.device, self.files)
        self.sessions: dict[str, Any] = {}
        read_by_onnxruntime: list[Any] = []  # VerifiedFile of each graph, hashed before ONNX Runtime reads it
        for graph in self.graphs:
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Follow torch's thread setting, so one process has one notion of how many cores it may use.
            options.intra_op_num_threads = torch.get_num_threads()
            # Prepacking would give each session its own packed copy of every MatMul weight (measured:
            # 3 copies of the weights instead of 1; no slower without it on the CPU).
            options.add_session_config_entry("session.disable_prepacking", "1")
            path = self.folder / f"{graph}.onnx"
            self.initializers.add_to(options, path)
            if self.files is not None:  # hashed here, read by ONNX Runtime from its path next: checked unchanged after
                read_by_onnxruntime.append(hashed_file(path, self.files.get(path.name)))
            self.sessions[graph] = onnxruntime.InferenceSession(str(path), options, providers=providers)
            self._check_cuda_provider(onnxruntime.__version__, graph)
        self.initializers.loaded()  # weights.bin: ONNX Runtime read from it the weights its optimizations fold
        for graph_file in read_by_onnxruntime:
            graph_file.check_unchanged("ONNX Runtime")
        self.input_names = {graph: {i.name for i in session.get_inputs()} for graph, session in self.sessions.items()}
        logger.info("onnxruntime sessions on %s", self.sessions["full"].get_providers())

    def _check_cuda_provider(self, version: str, graph: str) -> None:
        """A CUDA engine's session has the CUDA provider: where ONNX Runtime cannot start it (the CUDA or cuDNN
        libraries it needs missing, say) it logs why and runs the session on the CPU provider, and the GPU tensors
        bound to it failed at the first run with no word of the cause."""
        found = self.sessions[graph].get_providers()
        if self.device.type == "cuda" and _PROVIDERS["cuda"] not in found:
            raise EngineMismatchError(
                f"onnxruntime {version} could not start its CUDA provider for the {graph!r} graph (its log above says "
                f"why: usually CUDA or cuDNN libraries it needs are missing) and would run it on {', '.join(found)}; "
                f"install the CUDA and cuDNN versions this onnxruntime-gpu needs",
                field="backend", value=found,
            )

    def cuda_options(self) -> dict[str, str]:
        """The CUDA provider's options: the engine's GPU (the provider's default is GPU 0, wherever torch's tensors and
        the shared weights lie), and TF32 as torch's matmuls have it (the provider's default is on, which puts an fp32
        build's graphs ~1e-3 off the fp32 eager model it is verified against)."""
        return {"device_id": str(self.device.index), "use_tf32": "1" if torch_matmul_tf32() else "0"}

    def run(
        self, graph: str, inputs: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        self._check_open()
        session = self.sessions[graph]
        binding = session.io_binding()
        for name, tensor in inputs.items():
            if name in self.input_names[graph]:  # exporters drop inputs a graph does not read
                self._bind(binding.bind_input, name, tensor)
        outputs = self.outputs_of(graph, out)
        for name, tensor in outputs.items():
            self._bind(binding.bind_output, name, tensor)
        if self.device.type == "cuda":
            # ONNX Runtime's CUDA provider runs on streams of its own, which wait for nothing of torch's: the inputs
            # torch wrote (and its reads of the buffers this run overwrites) are finished first. Without run options
            # (disable_synchronize_execution_providers is "0") the run returns once its streams are done, so torch
            # reads the outputs, and frees the inputs `prepare` cast, only after ONNX Runtime is through with them.
            stream = torch.cuda.current_stream(self.device)
            self._read_on(stream)
            stream.synchronize()
        session.run_with_iobinding(binding)
        return outputs

    def _release(self) -> None:
        """The sessions, then the weights they were given. Nothing of ONNX Runtime's is still running on the device:
        each run returned once its streams were done (`_finish_device_work` has nothing to wait for)."""
        getattr(self, "sessions", {}).clear()
        self.initializers = None

    def _bind(self, bind: Callable[..., None], name: str, tensor: torch.Tensor) -> None:
        device_id = tensor.device.index or 0
        bind(name, tensor.device.type, device_id, _NUMPY_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())


def torch_matmul_tf32() -> bool:
    """Whether torch's fp32 CUDA matmuls use TF32, however it was set. Read from `fp32_precision` where torch has it
    (2.9 and later; it resolves `torch.backends.fp32_precision` and the legacy flags): reading the legacy `allow_tf32`
    raises a RuntimeError ("mix of the legacy and new APIs") once TF32 was turned on with the new settings."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is None:  # torch before 2.9
        return bool(torch.backends.cuda.matmul.allow_tf32)
    return precision == "tf32"
