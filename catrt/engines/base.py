"""The engine contract: static-shape graphs of three kinds ("context", "full", "pruned") run on named tensors.

The step graphs' I/O is declared once, in `catrt/contract.py` (re-exported here); the runtime, the
engines, the export and the build read it from there:

- "context" (once per generation): the adapter's `context_inputs` -> the tensors its weights make of
  them (`prepare_context`: the positional table, PixArt's cross-attention K/V);
- "full": `FULL.inputs` plus the whole context -> `FULL.outputs` (tokens, every K/V row);
- "pruned-k<k>", one per built alpha: `PRUNED.inputs` plus the context -> `PRUNED.outputs` (the k
  tokens, their K/V rows). k is static in each, so a bundle built for several alphas holds one pruned
  graph per k (`pruned_graph`), and a step runs the one its indices' k names.

Every backend implements `load` and `run`; the shared `prepare_context` / `full_forward` /
`pruned_forward` give any engine the runtime's step-function interface (`catrt.contract.StepFunctions`).
Backends that run exported graphs write outputs into buffers allocated once, on first use (the full
graph's K/V straight into the runtime's cache) and scatter the pruned graph's K/V rows into the cache in place.

Releasing an engine (`close()`, or dropping it: `__del__` closes it) hands its device buffers back to torch's caching
allocator only once the device is done with them: a block freed while a run still reads or writes it could be handed
to new work at once (a silent wrong result for the next user of that memory). Each backend first waits for its own
device work (`_finish_device_work`: TensorRT's stream; ONNX Runtime's runs are done when they return), then lets go of
its objects (`_release`). Torch itself reads the outputs after each run, on the stream current then; a freed block is
reusable at once on the stream it was allocated on, which need not be that one, so each output buffer is first marked
as used on every stream torch read it on (`record_stream`: the allocator reuses it only after those streams' work
queued until the release; free where it is the allocation stream). Nothing of this runs per step.
"""

from __future__ import annotations

import logging
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from catrt.contract import FULL, PRUNED, pruned_graph, pruned_k
from catrt.errors import ConfigError, EngineRuntimeError
from catrt.models.base import Adapter, Context

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, static shape and dtype (a `DTYPES` key)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(data["name"], tuple(data["shape"]), data["dtype"])


@dataclass(frozen=True)
class GraphSpec:
    """The I/O of one graph, in the graph's input and output order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def check(self, tensors: dict[str, torch.Tensor]) -> None:
        """Every input present with the shape the graph was built for; else a ConfigError naming it."""
        for spec in self.inputs:
            tensor = tensors.get(spec.name)
            if tensor is None:
                raise ConfigError(f"the engine needs input {spec.name!r}, which this call did not provide", field=spec.name)
            if tuple(tensor.shape) != spec.shape:
                raise ConfigError(
                    f"input {spec.name!r} has shape {tuple(tensor.shape)} but the engine was built for {spec.shape}; "
                    f"call it with the build's resolution, batch and text length or build another engine",
                    field=spec.name,
                    value=tuple(tensor.shape),
                )

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs in graph order, checked, cast to the graph's dtypes and contiguous.

        Casts and copies are new tensors: a backend that runs asynchronously keeps them alive until
        its work is done. A floating-point tensor for an integer input is refused, naming it, where it holds a
        fraction (or is not finite): the cast would drop it (a PixArt build takes DPM-Solver's whole timesteps as int64;
        Euler's are fractional). Whole ones cast exactly and run (Euler's "leading" or "trailing" spacing gives whole
        float32 timesteps). Reading the values waits for the device, only on that path; no engine that runs this
        is captured in a CUDA graph.
        """
        self.check(tensors)
        for spec in self.inputs:
            tensor = tensors[spec.name]
            given = tensor.dtype
            if given.is_floating_point and not spec.torch_dtype.is_floating_point and not bool((tensor.frac() == 0).all()):
                raise ConfigError(
                    f"input {spec.name!r} is {str(given).removeprefix('torch.')} but the engine was built for "
                    f"{spec.dtype} (whole numbers: the build's scheduler gave whole timesteps), and the cast would drop "
                    f"its fractions; run a scheduler with whole timesteps, such as the pipeline's own, DDIM or "
                    f"DPM-Solver, or accelerate the pipeline without the bundle",
                    field=spec.name, value=str(given).removeprefix("torch."),
                )
        return {spec.name: tensors[spec.name].to(spec.torch_dtype).contiguous() for spec in self.inputs}

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        return cls(
            tuple(TensorSpec.from_dict(s) for s in data["inputs"]),
            tuple(TensorSpec.from_dict(s) for s in data["outputs"]),
        )


class Engine(ABC):
    """A backend running a build's graphs on `device`.

    Subclasses say which package's version a bundle must match (`package`), which device fields
    must match the build machine's (`device_fields`), where they can run, whether they run the
    PyTorch transformer (`needs_transformer`: eager, compile) or carry their own weights, and
    whether their steps may be captured in a CUDA graph.
    """

    name: ClassVar[str]
    package: ClassVar[str | None] = None
    device_fields: ClassVar[tuple[str, ...]] = ("kind",)
    #: Picked by `--backend auto` only on a GPU (on a CPU it is slower to build than it gains).
    gpu_only_in_auto: ClassVar[bool] = False
    #: Runs the PyTorch transformer's weights (the bundle has none of its own).
    needs_transformer: ClassVar[bool] = False
    #: Precisions a build for this backend may use, and why others are refused.
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16")
    precision_note: ClassVar[str] = ""
    #: Its steps can run inside a CUDA graph capture; `cuda_graphs`: the runtime captures them by default.
    capturable: ClassVar[bool] = False
    cuda_graphs: ClassVar[bool] = False

    def __init__(
        self,
        folder: Path,
        graphs: dict[str, GraphSpec],
        device: torch.device,
        adapter: Adapter | None = None,
        *,
        files: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """`files`: the checked manifest's records ({"sha256", "size"} by file name), for a backend that verifies what
        it reads after the bundle's check (tensorrt); None where the files were not checked (a build's own staging)."""
        if self.needs_transformer and adapter is None:
            raise ConfigError(f"the {self.name} backend runs the PyTorch transformer: pass its adapter", field="backend")
        self.folder = folder
        self.graphs = graphs
        self.device = device
        self.adapter = adapter
        self.files = files
        self._buffers: dict[str, dict[str, torch.Tensor]] = {}
        #: The streams torch read this engine's outputs on (torch's current stream of each run), by handle.
        self._readers: dict[int, Any] = {}
        self.closed = False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here (a missing package or device), or None."""
        return None

    @classmethod
    def default_device(cls) -> torch.device:
        """The device a build for this backend targets on this machine."""
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @abstractmethod
    def load(self) -> None:
        """Make the graphs runnable (deserialize, compile, create sessions)."""

    @abstractmethod
    def run(
        self, graph: str, inputs: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Run `graph` on prepared inputs (graph order, graph dtypes, on `device`); outputs by name.

        Outputs are buffers owned by the engine and overwritten by the next run of the graph, except
        those named in `out`, which are written into the caller's tensors.
        """

    def close(self) -> None:
        """Let go of the engine's device buffers and backend objects, once the device is done with them (see the module
        docstring); a closed engine refuses to run. Closing twice does nothing. Not to be called while another thread
        runs the engine (as `run` is not): close it from the thread that runs it, or once its calls have returned; a
        dropped engine is closed by `__del__`, when nothing can run it any more."""
        if self.closed:
            return
        self.closed = True
        self._finish_device_work()
        self._release()
        for buffers in self._buffers.values():
            for tensor in buffers.values():
                for stream in self._readers.values():
                    self._record_use(tensor, stream)
        self._buffers.clear()

    def __del__(self) -> None:
        if getattr(self, "closed", True) or sys.is_finalizing():  # half made, closed, or the interpreter is exiting
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - a finalizer cannot raise; a device that cannot be waited for is broken
            logger.warning("releasing the %s engine of %s failed", self.name, self.folder, exc_info=True)

    def _finish_device_work(self) -> None:
        """Wait until the device no longer uses the engine's memory (a backend that runs asynchronously overrides it)."""

    def _release(self) -> None:
        """Let go of the backend's own objects (sessions, contexts, device memory); `close` calls it after
        `_finish_device_work`."""

    def _read_on(self, stream: Any) -> None:
        """Note that torch reads this run's outputs on `stream` (its `cuda_stream` handle names it)."""
        self._readers.setdefault(stream.cuda_stream, stream)

    def _record_use(self, tensor: torch.Tensor, stream: Any) -> None:
        """Mark `tensor` as used on `stream`: once freed, the caching allocator reuses it only after that stream's work
        queued until then (a no-op on the stream it was allocated on)."""
        tensor.record_stream(stream)

    def _check_open(self) -> None:
        if self.closed:
            raise EngineRuntimeError(
                f"this {self.name} engine of {self.folder} was closed; load the bundle again to run it", field="engine"
            )

    def pruned_graph_for(self, indices: torch.Tensor) -> str:
        """The pruned graph computing `indices.shape[-1]` tokens; a k the bundle was not built for is a ConfigError."""
        k = int(indices.shape[-1])
        graph = pruned_graph(k)
        if graph not in self.graphs:
            built = sorted(found for found in map(pruned_k, self.graphs) if found is not None)
            raise ConfigError(
                f"this engine has no pruned graph for k={k} tokens; it was built for k in {built}: call it with one "
                f"of the built alphas or build one for this alpha",
                field="alpha", value=k,
            )
        return graph

    def describe(self) -> dict[str, Any]:
        """What this engine was built for and runs on."""
        return {
            "backend": self.name,
            "device": str(self.device),
            "folder": str(self.folder),
            "graphs": {name: spec.to_dict() for name, spec in self.graphs.items()},
        }

    def outputs_of(self, graph: str, out: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Where each output of `graph` goes: the caller's tensor in `out`, else the engine's own buffer.

        The engine's buffers are allocated on first use and reused by every later run, so the
        steady state allocates nothing (and an output always bound to the caller's tensor, such as
        the full graph's K/V, gets no buffer at all).
        """
        buffers = self._buffers.setdefault(graph, {})
        outputs = {}
        for spec in self.graphs[graph].outputs:
            if out is not None and spec.name in out:
                outputs[spec.name] = out[spec.name]
                continue
            if spec.name not in buffers:
                buffers[spec.name] = torch.empty(spec.shape, dtype=spec.torch_dtype, device=self.device)
            outputs[spec.name] = buffers[spec.name]
        return outputs

    # -- the runtime's step functions -----------------------------------------------------------

    def prepare_context(self, inputs: Context, latent_shape: tuple[int, ...]) -> Context:
        """The "context" graph: inputs plus what the weights make of them."""
        return {**inputs, **self.run("context", self.graphs["context"].prepare(inputs))}

    def full_forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, context: Context, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        """The full graph; its K/V output is written straight into `kv_cache` where the layout allows."""
        inputs = self.graphs["full"].prepare(FULL.bind((hidden_states, timestep), context))
        direct = _fits(kv_cache, self.graphs["full"].output("kv"))
        outputs = self.run("full", inputs, out={"kv": kv_cache} if direct else None)
        if not direct:
            kv_cache.copy_(outputs["kv"])
        return outputs["tokens"]

    def pruned_forward(
        self,
        patches: torch.Tensor,
        indices: torch.Tensor,
        timestep: torch.Tensor,
        context: Context,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """The pruned graph of this k, then its K/V rows (S, B, k, D) scattered into `kv_cache` in place."""
        graph = self.pruned_graph_for(indices)
        outputs = self.run(graph, self.graphs[graph].prepare(PRUNED.bind((patches, indices, timestep, kv_cache), context)))
        rows = outputs["kv_rows"]
        index = indices.view(1, *indices.shape, 1).expand(rows.shape[0], -1, -1, rows.shape[-1])
        kv_cache.scatter_(2, index, rows.to(kv_cache.dtype))
        return outputs["tokens"]


def _fits(tensor: torch.Tensor, spec: TensorSpec) -> bool:
    """Whether a graph output can be bound to `tensor` itself."""
    return tuple(tensor.shape) == spec.shape and tensor.dtype == spec.torch_dtype and tensor.is_contiguous()
