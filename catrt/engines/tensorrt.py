"""The `tensorrt` backend: serialized TensorRT engines (`<graph>.plan`) run on torch CUDA tensors.

Tensors are bound by address (`set_tensor_address`), so no copy happens inside a step. The engine is
enqueued on a stream of its own, ordered after torch's current stream and before its next work by
stream waits: torch's current stream is usually the legacy default stream, on which TensorRT
synchronizes the host after every enqueue. `tensorrt` is imported only on load.

Every TensorRT call's result is checked: a plan that does not deserialize, a context that cannot be
created, an I/O tensor whose name, shape or dtype differs from the build's `GraphSpec`, an address
that is not accepted or an enqueue that fails raises a catrt error naming the graph and the tensor,
instead of leaving uninitialised buffers as the step's output.

TensorRT binds an engine to the CUDA device current when it is deserialized, and its contexts run
there: loading and each enqueue make the engine's device current, so a bundle loaded on `cuda:1`
does not land on (and enqueue on) `cuda:0`.

Plans are streamed, not read whole into host memory, where TensorRT deserializes from an `IStreamReaderV2` (10.7 and
later; 11 has no other stream reader): a block of the file at a time (`catrt.engines.verified_file`), seeks allowed.
The bytes TensorRT reads are checked against the sha256 and size the checked manifest records: a plan changed since
the bundle's check is refused, naming it, once TensorRT has read it and before any context is made (its engine is
dropped, never run). An older TensorRT gets the plan as one buffer, checked the same way.

The engines share one activation (scratch) memory block, the largest any of them needs, where TensorRT lets the
caller own it (10.1 and later: `create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)`,
`ICudaEngine.device_memory_size_v2`, `IExecutionContext.set_device_memory(memory, size)`, looked up as attributes);
an older TensorRT gives each context its own, as before. Sharing is safe because every context enqueues on this
runtime's one stream: TensorRT uses the memory from an enqueue until that run completes, and runs on one stream do
not overlap.

Only the tensors the engine declares as I/O are bound (exporters drop graph inputs a graph does not
read); a declared input the call lacks is an error naming it.

Not capturable: running these steps inside a CUDA graph capture has not been verified here (and the
keep-alive bookkeeping of `run` queries CUDA events, which a capture does not allow).

Released (`close()`, or the engine dropped), the engine's stream is synchronized before anything it used is let go: the
shared activation block, the output buffers, the inputs held for runs, the contexts and engines. TensorRT's contract
for `enqueueV3` is that memory registered for a run is not released before the stream is synchronized, and that covers
its own objects too, which `record_stream` (a torch tensor's deferred reuse) would not. The host waits once per release
for the runs still queued, never per step.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

from catrt.engines.base import DTYPES, Engine, GraphSpec
from catrt.engines.verified_file import VerifiedFile
from catrt.errors import CorruptBundleError, EngineMismatchError, EngineRuntimeError


# TensorRT's `DataType` member names for the dtypes a graph may use (looked up on the imported module).
_TRT_DTYPES: dict[str, torch.dtype] = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT64": torch.int64,
    "INT32": torch.int32,
}


@dataclass(frozen=True)
class _IOTensor:
    """One I/O tensor a TensorRT engine declares, as checked against the graph's spec on load."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _InFlight:
    """The tensors one enqueued run reads or writes, held until `event` (recorded after it) completes."""

    event: Any
    tensors: tuple[torch.Tensor, ...]


class TensorRTEngine(Engine):
    """One execution context per graph; plans are tied to the GPU's compute capability.

    Keeping inputs alive: `GraphSpec.prepare` may hand `run` fresh tensors (a cast, a contiguous
    copy) that nothing else references, while the enqueued engine reads them later on its stream.
    Each run therefore keeps every tensor it bound, together with a CUDA event recorded on the
    stream right after the enqueue, and drops them only once a later `run` finds that event complete
    (`event.query()`, which does not block the host). Releasing "when the next run of the graph is
    enqueued on the same stream" would not be enough: torch's caching allocator may hand a freed
    block to new work on the stream that *allocated* it, which need not be the stream the engine ran
    on, so only the event proves the engine is done with the memory. Held sets are bounded by how far
    the host runs ahead of the GPU; `synchronize()` waits for and drops all of them.
    """

    name = "tensorrt"
    package = "tensorrt"
    device_fields = ("kind", "compute_capability")
    capturable = False  # not verified under CUDA-graph capture (see the module docstring)

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

    # -- loading --------------------------------------------------------------------------------

    def load(self) -> None:
        import tensorrt

        self._trt_logger = tensorrt.Logger(tensorrt.Logger.WARNING)
        # Kept for the engines' lifetime: engines must not outlive the runtime that deserialized them. Where
        # TensorRT makes no runtime, pybind11 raises a TypeError from the constructor (it never returns None).
        try:
            self.runtime = tensorrt.Runtime(self._trt_logger)
        except TypeError as error:
            raise EngineRuntimeError(
                f"TensorRT could not create a runtime (see the TensorRT log above): {error}", field="tensorrt"
            ) from error
        self.engines: dict[str, Any] = {}
        self.contexts: dict[str, Any] = {}
        self.io: dict[str, tuple[_IOTensor, ...]] = {}
        self._in_flight: list[_InFlight] = []
        self._spare_events: list[Any] = []
        self._own: Any = None  # the stream runs are enqueued on, made at the first run
        #: The activation memory every context shares (uint8, on the device), held as long as they are; None where
        #: this TensorRT has each context allocate its own.
        self.scratch_memory: torch.Tensor | None = None
        trt_dtypes = {
            getattr(tensorrt.DataType, key): dtype for key, dtype in _TRT_DTYPES.items() if hasattr(tensorrt.DataType, key)
        }
        with self._on_device():
            for graph in self.graphs:  # context, full and every pruned graph of the bundle
                self._load_graph(tensorrt, graph, trt_dtypes)
            self._create_contexts(tensorrt)

    def _load_graph(self, tensorrt: Any, graph: str, trt_dtypes: dict[Any, torch.dtype]) -> None:
        """Deserialize one graph's plan, verified against its manifest record, and check its I/O against the spec."""
        plan = self.folder / f"{graph}.plan"
        if not plan.is_file():
            raise CorruptBundleError(
                f"the {graph!r} graph's engine file {plan.name} is missing from {self.folder}", field=plan.name
            )
        with VerifiedFile(plan, None if self.files is None else self.files.get(plan.name)) as source:
            engine = self.runtime.deserialize_cuda_engine(_plan_source(tensorrt, source))
            source.finish()  # a plan changed since the bundle's check: refused here, its engine dropped unrun
        if engine is None:
            raise EngineMismatchError(
                f"TensorRT could not deserialize the {graph!r} graph's {plan.name} (built by another TensorRT "
                f"version or for another GPU, or damaged; see the TensorRT log above); rebuild the engine",
                field=plan.name,
            )
        self.engines[graph] = engine
        self.io[graph] = _declared_io(graph, engine, self.graphs[graph], tensorrt.TensorIOMode.INPUT, trt_dtypes)

    def _create_contexts(self, tensorrt: Any) -> None:
        """One execution context per graph, all given `scratch_memory` where this TensorRT lets the caller own it."""
        strategy = getattr(getattr(tensorrt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        shared = strategy is not None and all(hasattr(engine, "device_memory_size_v2") for engine in self.engines.values())
        size = max((int(engine.device_memory_size_v2) for engine in self.engines.values()), default=0) if shared else 0
        if shared:
            self.scratch_memory = self._allocate_scratch(size)
        for graph, engine in self.engines.items():
            context = engine.create_execution_context(strategy) if shared else engine.create_execution_context()
            if context is None:
                raise EngineRuntimeError(
                    f"TensorRT could not create an execution context for the {graph!r} graph "
                    f"(often out of GPU memory; see the TensorRT log above)",
                    field=graph,
                )
            if self.scratch_memory is not None:
                context.set_device_memory(self.scratch_memory.data_ptr(), size)
            self.contexts[graph] = context

    def _allocate_scratch(self, size: int) -> torch.Tensor:
        """`size` bytes on the engine's device (torch's caching allocator aligns blocks to 512 bytes; TensorRT asks 256)."""
        try:
            return torch.empty(size, dtype=torch.uint8, device=self.device)
        except torch.cuda.OutOfMemoryError as error:
            raise EngineRuntimeError(
                f"could not allocate the {size} bytes of activation memory the bundle's TensorRT engines share on "
                f"{self.device} (out of GPU memory); free some, or load fewer bundles on this GPU",
                field="tensorrt", value=size,
            ) from error

    # -- running --------------------------------------------------------------------------------

    def run(
        self, graph: str, inputs: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        self._check_open()
        self._release_finished()
        context = self.contexts[graph]
        outputs = self.outputs_of(graph, out)
        bound = []
        for io in self.io[graph]:
            tensor = (inputs if io.is_input else outputs).get(io.name)
            if tensor is None:
                kind = "input" if io.is_input else "output"
                raise EngineRuntimeError(
                    f"the {graph!r} engine declares {kind} {io.name!r}, which this call did not provide",
                    field=f"{graph}.{io.name}",
                )
            self._check_bound(graph, io, tensor)
            if not context.set_tensor_address(io.name, tensor.data_ptr()):
                raise EngineRuntimeError(
                    f"TensorRT refused the address of the {graph!r} graph's tensor {io.name!r} "
                    f"(see the TensorRT log above)",
                    field=f"{graph}.{io.name}",
                )
            bound.append(tensor)
        current = self._stream()
        self._read_on(current)
        if self._own is None:
            self._own = self._new_stream()
        self._own.wait_stream(current)  # the inputs torch wrote before this call
        with self._on_device():
            enqueued = context.execute_async_v3(self._own.cuda_stream)
        # Held even when the enqueue failed: part of the engine's work may already be on the stream.
        event = self._spare_events.pop() if self._spare_events else self._event()
        event.record(self._own)
        current.wait_stream(self._own)  # torch's next work reads the outputs
        self._in_flight.append(_InFlight(event, tuple(bound)))
        if not enqueued:
            raise EngineRuntimeError(
                f"TensorRT failed to enqueue the {graph!r} graph (see the TensorRT log above); its outputs "
                f"{[io.name for io in self.io[graph] if not io.is_input]} were not written",
                field=graph,
            )
        return outputs

    def synchronize(self) -> None:
        """Wait for every enqueued run (a host sync; not used by `run`) and drop the tensors held for them."""
        for entry in self._in_flight:
            entry.event.synchronize()
        self._release_finished()

    def _finish_device_work(self) -> None:
        """Wait for every run on the engine's stream (a host sync, once per release), then drop the held inputs."""
        if getattr(self, "_own", None) is not None:
            self._own.synchronize()
        self._in_flight = []

    def _release(self) -> None:
        """Contexts, then the engines they were made from, then the runtime that deserialized those, then the memory."""
        for name in ("contexts", "engines"):
            getattr(self, name, {}).clear()
        self.runtime = self.scratch_memory = None

    def _release_finished(self) -> None:
        """Drop the tensors of runs whose event has completed; their events are reused."""
        if not self._in_flight:
            return
        pending = []
        for entry in self._in_flight:
            if entry.event.query():
                self._spare_events.append(entry.event)
            else:
                pending.append(entry)
        self._in_flight = pending

    def _check_bound(self, graph: str, io: _IOTensor, tensor: torch.Tensor) -> None:
        """A tensor about to be bound has the engine's shape and dtype, is contiguous and on the device."""
        problem = None
        if tuple(tensor.shape) != io.shape:
            problem = f"has shape {tuple(tensor.shape)} but the engine's is {io.shape}"
        elif tensor.dtype != io.dtype:
            problem = f"has dtype {tensor.dtype} but the engine's is {io.dtype}"
        elif not tensor.is_contiguous():
            problem = "is not contiguous (TensorRT reads and writes dense row-major memory)"
        elif tensor.device.type != self.device.type or (
            self.device.index is not None and tensor.device.index not in (None, self.device.index)
        ):
            problem = f"is on {tensor.device} but the engine runs on {self.device}"
        if problem is not None:
            kind = "input" if io.is_input else "output"
            raise EngineRuntimeError(
                f"the {graph!r} graph's {kind} {io.name!r} {problem}", field=f"{graph}.{io.name}", value=tuple(tensor.shape)
            )

    # Small injectable pieces: the only CUDA calls of `run` (tests replace them with CPU stand-ins).

    def _on_device(self) -> Any:
        """A context in which the engine's device is CUDA's current one (TensorRT loads and runs there)."""
        return torch.cuda.device(self.device)

    def _stream(self) -> Any:
        """Torch's current stream on the engine's device, which runs the step's other work."""
        return torch.cuda.current_stream(self.device)

    def _new_stream(self) -> Any:
        """The engine's own (non-default) stream to enqueue on; `.cuda_stream` is its handle."""
        return torch.cuda.Stream(self.device)

    def _event(self) -> Any:
        """A new event, recorded on the stream after each enqueue."""
        return torch.cuda.Event()


def _plan_source(tensorrt: Any, source: VerifiedFile) -> Any:
    """What `deserialize_cuda_engine` reads: an `IStreamReaderV2` over `source` (TensorRT >= 10.7), else its bytes,
    checked before TensorRT sees them."""
    reader_base = getattr(tensorrt, "IStreamReaderV2", None)
    if reader_base is None:
        plan = source.whole()
        source.finish()
        return plan
    whence = {tensorrt.SeekPosition.SET: os.SEEK_SET, tensorrt.SeekPosition.CUR: os.SEEK_CUR, tensorrt.SeekPosition.END: os.SEEK_END}

    class PlanReader(reader_base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            reader_base.__init__(self)  # pybind11 trampolines: the base must be initialised explicitly

        def read(self, num_bytes: int, stream: int) -> memoryview:
            return source.read(num_bytes)  # one block at most; TensorRT asks again for the rest

        def seek(self, offset: int, where: Any) -> bool:
            return source.seek(offset, whence[where])

    return PlanReader()


def _declared_io(
    graph: str, engine: Any, spec: GraphSpec, input_mode: Any, trt_dtypes: dict[Any, torch.dtype]
) -> tuple[_IOTensor, ...]:
    """The engine's I/O tensors, each checked against the graph's spec (name, direction, shape, dtype)."""
    spec_inputs = {s.name: s for s in spec.inputs}
    spec_outputs = {s.name: s for s in spec.outputs}
    declared = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == input_mode
        expected = (spec_inputs if is_input else spec_outputs).get(name)
        kind = "input" if is_input else "output"
        if expected is None:
            raise EngineMismatchError(
                f"the {graph!r} engine declares an {kind} {name!r} that the build's graph does not have; rebuild the engine",
                field=f"{graph}.{name}",
            )
        dims = engine.get_tensor_shape(name)  # a tensorrt.Dims: len() and indexing, like a tuple
        shape = tuple(int(dims[i]) for i in range(len(dims)))
        trt_dtype = engine.get_tensor_dtype(name)
        dtype = trt_dtypes.get(trt_dtype)
        if shape != expected.shape:
            raise EngineMismatchError(
                f"the {graph!r} engine's {kind} {name!r} has shape {shape} but the build's graph has {expected.shape}; "
                f"rebuild the engine",
                field=f"{graph}.{name}",
                value=shape,
            )
        if dtype != DTYPES[expected.dtype]:
            raise EngineMismatchError(
                f"the {graph!r} engine's {kind} {name!r} has TensorRT dtype {trt_dtype} but the build's graph has "
                f"{expected.dtype}; rebuild the engine",
                field=f"{graph}.{name}",
                value=str(trt_dtype),
            )
        declared.append(_IOTensor(name, is_input, shape, dtype))
    missing = [name for name in spec_outputs if name not in {io.name for io in declared if not io.is_input}]
    if missing:
        raise EngineMismatchError(
            f"the {graph!r} engine does not write the graph's output {missing[0]!r}; rebuild the engine",
            field=f"{graph}.{missing[0]}",
        )
    return tuple(declared)
