"""catrt's TensorRT glue (catrt/engines/tensorrt.py, catrt/export/tensorrt.py), driven on the CPU.

These tests exercise OUR code, not TensorRT: a small stand-in `tensorrt` module, injected into
`sys.modules`, deserializes "plans" that are JSON lists of declared I/O tensors, records every
address bound and every stream enqueued on, and can be told to fail (a runtime or builder that is not
made, a plan that does not deserialize, a context that is not created, an address or an enqueue that
is refused, a parse or a build that fails). It follows the return conventions of TensorRT's Python
bindings (python/src/infer/pyCore.cpp, python/docstrings/*): methods return None or False on failure,
while a constructor whose factory makes nothing raises pybind11's TypeError; enums are enum members
(flags are ints to shift by), shapes are `Dims` (len and indexing only), plans and timing caches are
buffers. It models TensorRT 10.16 by default and TensorRT 11 (no FP16 / BF16 builder flags, every network
strongly typed) where asked; in both, a strongly typed network with the FP16 / BF16 flag does not build,
as TensorRT refuses it. Where the runtime's API changed within 10 it models the minor version asked: caller-owned
context memory (`device_memory_size_v2`, `set_device_memory`) from 10.1, plans streamed through an `IStreamReaderV2`
(with `SeekPosition`) from 10.7, as the bindings' python/src/infer/pyCore.cpp of each release tag defines them; its
stream deserialization asks the reader as pyCore.cpp's `PyStreamReaderV2.read` does (again until the count asked is
served or the answer is empty; an exception in the reader is an empty answer). The CUDA stream, events and current device are replaced by CPU stand-ins
through the engine's `_stream` / `_event` / `_on_device` hooks. Whether real TensorRT engines compute
the right numbers is checked by tests/test_engines.py on a GPU with tensorrt installed.
"""

from __future__ import annotations

import enum
import gc
import hashlib
import json
import sys
import types
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from catrt.build_config import BuildConfig
from catrt.engines import verified_file
from catrt.engines.base import GraphSpec, TensorSpec
from catrt.engines.tensorrt import TensorRTEngine
from catrt.errors import BuildError, ConfigError, CorruptBundleError, EngineMismatchError, EngineRuntimeError
from catrt.export import tensorrt as trt_export

_TRT_DTYPE_NAMES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32"}
STREAM_HANDLE = 0x5EED  # the engine's own stream
ENGINE_DEVICE = "the engine's device"  # what the engine's `_on_device` stand-in makes current
CURRENT_HANDLE = 0  # torch's current stream: the legacy default stream, as in most programs


def _specs() -> dict[str, GraphSpec]:
    """Small hand-made graphs with the runtime's I/O names (batch 2, 16 tokens, k 4, width 8)."""
    f32, i64 = "float32", "int64"
    context = GraphSpec(
        inputs=(TensorSpec("encoder_hidden_states", (2, 3, 8), f32), TensorSpec("pooled_projections", (2, 8), f32)),
        outputs=(TensorSpec("pos_embed", (16, 8), f32),),
    )
    full = GraphSpec(
        inputs=(
            TensorSpec("hidden_states", (2, 16, 8), f32),
            TensorSpec("timestep", (2,), f32),
            TensorSpec("pos_embed", (16, 8), f32),
        ),
        outputs=(TensorSpec("tokens", (2, 16, 8), f32), TensorSpec("kv", (2, 2, 16, 8), f32)),
    )
    def pruned(k: int) -> GraphSpec:
        return GraphSpec(
            inputs=(
                TensorSpec("patches", (2, k, 8), f32),
                TensorSpec("indices", (2, k), i64),
                TensorSpec("timestep", (2,), f32),
                TensorSpec("kv_cache", (2, 2, 16, 8), f32),
                TensorSpec("pos_embed", (16, 8), f32),
            ),
            outputs=(TensorSpec("tokens", (2, k, 8), f32), TensorSpec("kv_rows", (2, 2, k, 8), f32)),
        )

    return {"context": context, "full": full, "pruned-k4": pruned(4), "pruned-k2": pruned(2)}  # a build of two alphas


GRAPH_NAMES = tuple(_specs())


# -- the stand-in tensorrt module ------------------------------------------------------------------


NULLPTR = "pybind11::init(): factory function returned nullptr"  # what a constructor raises where TensorRT made nothing
STREAM_REQUEST = 64  # bytes the stand-in TensorRT asks a stream reader for at a time
DEVICE_MEMORY = {"context": 512, "full": 4096, "pruned-k4": 3072, "pruned-k2": 2048}  # each engine's activation memory


def _incompatible(call: str, signature: str) -> TypeError:
    """pybind11's answer to arguments of the wrong type."""
    return TypeError(
        f"{call}(): incompatible function arguments. The following argument types are supported:\n    1. {signature}"
    )


class Dims:
    """`tensorrt.Dims`: a shape with len() and indexing (IndexError past the end), nothing else of a tuple's."""

    def __init__(self, shape: list[int]) -> None:
        self._d = list(shape)

    def __len__(self) -> int:
        return len(self._d)

    def __getitem__(self, index: int) -> int:
        return self._d[index]


class FakeTensorRT(types.ModuleType):
    """Just enough of TensorRT's Python API (10 by default, or 11) for the glue, with switches that make calls fail."""

    def __init__(self, major: int = 10, minor: int = 16) -> None:
        super().__init__("tensorrt")
        version = (major, minor)
        self.fail: dict[str, set[str]] = {
            "runtime": set(), "builder": set(), "deserialize": set(), "context": set(), "address": set(),
            "execute": set(), "parse": set(), "build": set(),
        }  # call -> graph names (or "graph.tensor" for "address", "*" for runtime and builder) on which it fails
        self.enqueued: list[dict[str, Any]] = []  # one record per execute_async_v3
        self.reject_timing_cache = False
        self.current_device: str | None = None  # set by the tests' `_on_device` stand-in
        self.deserialized_on: dict[str, str | None] = {}  # graph -> the current device when its plan was deserialized
        self.configs: list[Any] = []  # every builder config made, with its flags
        self.contexts: list[Any] = []  # every execution context made
        self.own_memory: list[int] = []  # the bytes each context TensorRT allocated memory for holds
        self.plan_sources: list[str] = []  # per deserialization: "buffer" or "reader"
        self.answers: list[int] = []  # the size of each buffer a stream reader answered with
        self.stream_ops: list[tuple[Any, ...]] = []  # ("seek", offset, "SET" | "CUR" | "END") / ("read", count) first
        self.on_request: Any = None  # called after each stream request (a test changes the file there)
        fake = self

        class Logger:
            WARNING = "WARNING"  # the real Logger.WARNING is an ILogger.Severity member

            def __init__(self, min_severity: str = WARNING) -> None:
                self.min_severity = min_severity

        DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT8 INT32 INT64 BOOL")
        TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
        if major >= 11:  # TensorRT 11: no precision flags, STRONGLY_TYPED kept (ignored) and renumbered
            BuilderFlag = enum.IntEnum("BuilderFlag", {"REFIT": 2, "TF32": 5, "STRIP_PLAN": 14, "REFIT_IDENTICAL": 15})
            NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
        else:
            BuilderFlag = enum.IntEnum(
                "BuilderFlag", {"FP16": 0, "INT8": 1, "REFIT": 4, "TF32": 6, "BF16": 17, "STRIP_PLAN": 19, "REFIT_IDENTICAL": 20}
            )
            NetworkDefinitionCreationFlag = enum.IntEnum(
                "NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
            )
        self.DataType, self.TensorIOMode, self.BuilderFlag = DataType, TensorIOMode, BuilderFlag
        self.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
        strongly_typed_bit = 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        Strategy = enum.Enum("ExecutionContextAllocationStrategy", {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2})
        self.ExecutionContextAllocationStrategy = Strategy

        class Context:
            def __init__(self, graph: str, need: int, strategy: Any) -> None:
                self.graph, self.need, self.strategy = graph, need, strategy
                self.addresses: dict[str, int] = {}
                self.memory: tuple[int, int] | None = None  # (address, size) the caller gave
                if strategy is not Strategy.USER_MANAGED:
                    fake.own_memory.append(need)

            def set_tensor_address(self, name: str, memory: int) -> bool:
                if not isinstance(memory, int):
                    raise TypeError(f"set_tensor_address(): memory must be an int, not {type(memory).__name__}")
                if f"{self.graph}.{name}" in fake.fail["address"]:
                    return False
                self.addresses[name] = memory
                return True

            def execute_async_v3(self, stream_handle: int) -> bool:
                if not isinstance(stream_handle, int):
                    raise TypeError(f"execute_async_v3(): stream_handle must be an int, not {type(stream_handle).__name__}")
                fake.enqueued.append({
                    "graph": self.graph, "stream": stream_handle, "addresses": dict(self.addresses),
                    "device": fake.current_device, "memory": self.memory,
                })
                if self.strategy is Strategy.USER_MANAGED and (self.memory is None or self.memory[1] < self.need):
                    return False  # TensorRT: a context without (enough) device memory does not run
                return self.graph not in fake.fail["execute"]

        if version >= (10, 1):
            def set_device_memory(self: Context, memory: int, size: int) -> None:
                if type(memory) is not int or memory < 0 or type(size) is not int:
                    raise _incompatible("set_device_memory", "(self: tensorrt.IExecutionContext, memory: int, size: int) -> None")
                self.memory = (memory, size)

            Context.set_device_memory = set_device_memory  # type: ignore[attr-defined]

        class Engine:
            def __init__(self, graph: str, io: list[list[Any]], need: int) -> None:
                self.graph, self.need = graph, need
                self.io = {name: (mode, shape, dtype) for name, mode, shape, dtype in io}
                self.names = [name for name, *_ in io]

            @property
            def num_io_tensors(self) -> int:
                return len(self.names)

            def get_tensor_name(self, index: int) -> str:
                return self.names[index]

            def get_tensor_mode(self, name: str) -> Any:
                return TensorIOMode[self.io[name][0]]

            def get_tensor_shape(self, name: str) -> Dims:
                return Dims(self.io[name][1])

            def get_tensor_dtype(self, name: str) -> Any:
                return DataType[self.io[name][2]]

            def create_execution_context(self, strategy: Any = Strategy.STATIC) -> Context | None:
                if not isinstance(strategy, Strategy):
                    raise _incompatible(
                        "create_execution_context",
                        "(self: tensorrt.ICudaEngine, strategy: tensorrt.ExecutionContextAllocationStrategy = STATIC) -> IExecutionContext",
                    )
                if self.graph in fake.fail["context"]:
                    return None
                fake.contexts.append(Context(self.graph, self.need, strategy))
                return fake.contexts[-1]

        if version >= (10, 1):
            Engine.device_memory_size_v2 = property(lambda self: self.need)  # type: ignore[attr-defined]
        if version < (11, 0):
            Engine.device_memory_size = property(lambda self: self.need)  # type: ignore[attr-defined]  # deprecated in 10.1

        reader_base: Any = None
        if version >= (10, 7):
            SeekPosition = enum.Enum("SeekPosition", {"SET": 0, "CUR": 1, "END": 2})

            class Trampoline(type):
                """pybind11 refuses an instance of a Python subclass whose __init__ did not run the base's."""

                def __call__(cls, *args: Any, **kwargs: Any) -> Any:
                    instance = super().__call__(*args, **kwargs)
                    if not getattr(instance, "_initialised", False):
                        raise TypeError("tensorrt.IStreamReaderV2.__init__() must be called when overriding __init__")
                    return instance

            class IStreamReaderV2(metaclass=Trampoline):
                def __init__(self) -> None:
                    self._initialised = True

            reader_base = self.IStreamReaderV2 = IStreamReaderV2
            self.SeekPosition = SeekPosition

        def request(reader: Any, count: int) -> bytes:
            """PyStreamReaderV2.read: ask again until `count` bytes are served or the answer is empty."""
            served = b""
            while len(served) < count:
                try:
                    answer = memoryview(reader.read(count - len(served), STREAM_HANDLE))  # py::buffer
                except Exception:  # noqa: BLE001 - the binding prints "[ERROR] Exception caught in read()", reads 0
                    answer = memoryview(b"")
                fake.answers.append(len(answer))
                if not len(answer):
                    break
                served += bytes(answer[: count - len(served)])
            if fake.on_request is not None:
                fake.on_request()
            return served

        def streamed(reader: Any) -> bytes | None:
            """The plan as TensorRT reads it: the test's seeks and reads first, then on from there until the plan is
            whole (a real plan says its own length: what follows it is never read) or the stream ends."""
            for op in fake.stream_ops:
                if op[0] == "seek" and not reader.seek(op[1], SeekPosition[op[2]]):
                    return None
                if op[0] == "read" and len(request(reader, op[1])) < op[1]:
                    return None
            data = b""
            while True:
                part = request(reader, STREAM_REQUEST)
                data += part
                try:
                    json.JSONDecoder().raw_decode(data.decode())
                    return data
                except ValueError:
                    if len(part) < STREAM_REQUEST:
                        return data

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                if "*" in fake.fail["runtime"]:
                    raise TypeError(NULLPTR)
                self.logger = logger

            def deserialize_cuda_engine(self, serialized_engine: Any) -> Engine | None:
                if reader_base is not None and isinstance(serialized_engine, reader_base):
                    fake.plan_sources.append("reader")
                    data = streamed(serialized_engine)
                else:
                    try:
                        data = bytes(memoryview(serialized_engine))  # any buffer
                    except TypeError:
                        raise _incompatible(
                            "deserialize_cuda_engine", "(self: tensorrt.Runtime, serialized_engine: buffer) -> tensorrt.ICudaEngine"
                        ) from None
                    fake.plan_sources.append("buffer")
                try:
                    plan = json.loads(data or b"")
                except ValueError:
                    return None  # "or None if it could not be deserialized"
                fake.deserialized_on[plan["graph"]] = fake.current_device
                if plan["graph"] in fake.fail["deserialize"]:
                    return None
                return Engine(plan["graph"], plan["io"], plan.get("device_memory", 0))

        # builder side
        class TimingCache:
            def __init__(self, blob: bytes) -> None:
                self.blob = blob

            def serialize(self) -> memoryview:  # an IHostMemory: a buffer
                return memoryview(self.blob + b"+")

        class BuilderConfig:
            def __init__(self) -> None:
                self.flags: set[Any] = {BuilderFlag.TF32}  # TF32 is on by default
                self.cache: TimingCache | None = None
                fake.configs.append(self)

            def set_flag(self, flag: Any) -> None:
                self.flags.add(BuilderFlag(flag))

            def clear_flag(self, flag: Any) -> None:
                self.flags.discard(BuilderFlag(flag))

            def get_flag(self, flag: Any) -> bool:
                return BuilderFlag(flag) in self.flags

            def create_timing_cache(self, serialized_timing_cache: Any) -> TimingCache:
                return TimingCache(bytes(memoryview(serialized_timing_cache)))

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                if fake.reject_timing_cache and cache.blob:
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self) -> TimingCache | None:
                return self.cache

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags = flags
                self.graph = ""

            @property
            def strongly_typed(self) -> bool:
                return major >= 11 or bool(self.flags & strongly_typed_bit)

        class ParserError:
            def __init__(self, desc: str) -> None:
                self._desc = desc

            def desc(self) -> str:
                return self._desc

            def __str__(self) -> str:
                return f"In node 3 with name: /foo and operator: Foo (parseNode): UNSUPPORTED_NODE: {self._desc}"

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                self.network = network
                self.errors: list[ParserError] = []

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def parse_from_file(self, model: str) -> bool:
                self.network.graph = Path(model).stem
                if self.network.graph in fake.fail["parse"]:
                    self.errors.append(ParserError("unsupported operator Foo"))
                    return False
                return True

            def get_error(self, index: int) -> ParserError:
                return self.errors[index]

        class Builder:
            def __init__(self, logger: Logger) -> None:
                if "*" in fake.fail["builder"]:
                    raise TypeError(NULLPTR)
                self.logger = logger

            def create_network(self, flags: int = 0) -> Network:
                return Network(flags)

            def create_builder_config(self) -> BuilderConfig:
                return BuilderConfig()

            def build_serialized_network(self, network: Network, config: BuilderConfig) -> memoryview | None:
                if network.graph in fake.fail["build"]:
                    return None
                precision_flags = {flag.name for flag in config.flags} & {"FP16", "BF16", "INT8"}
                if network.strongly_typed and precision_flags:
                    return None  # TensorRT: "API Usage Error (Parameter check failed, condition: !config.getFlag(...))"
                typing = "strongly-typed" if network.strongly_typed else "weakly-typed"
                flags = ",".join(sorted(flag.name for flag in config.flags))
                return memoryview(f"plan:{network.graph}:{typing}:{flags}".encode())  # an IHostMemory: a buffer

        for cls in (Logger, Runtime, OnnxParser, Builder):
            setattr(self, cls.__name__, cls)


class FakeStream:
    """A CUDA stream stand-in that logs, in one list shared by all, which stream waited for which."""

    def __init__(self, handle: int, log: list[tuple[int, int]]) -> None:
        self.cuda_stream, self.log = handle, log

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append((self.cuda_stream, other.cuda_stream))

    def synchronize(self) -> None:
        """The host waits for the stream's work: counted, and `on_synchronize` (if set) sees the moment."""
        self.synchronized = getattr(self, "synchronized", 0) + 1
        getattr(self, "on_synchronize", lambda: None)()


class FakeEvent:
    """A CUDA event stand-in: `done` says whether the work before its record has finished."""

    def __init__(self) -> None:
        self.done = False
        self.stream: Any = None

    def record(self, stream: Any) -> None:
        self.stream = stream
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def _plan(graph: str, spec: GraphSpec, drop: tuple[str, ...] = (), change: dict[str, dict[str, Any]] | None = None) -> bytes:
    """A stand-in plan declaring `spec`'s tensors, less `drop`, with fields of some tensors changed; its engine needs
    DEVICE_MEMORY[graph] bytes of activation memory."""
    io = []
    for mode, specs in (("INPUT", spec.inputs), ("OUTPUT", spec.outputs)):
        for s in specs:
            if s.name in drop:
                continue
            entry = {"name": s.name, "mode": mode, "shape": list(s.shape), "dtype": _TRT_DTYPE_NAMES[s.dtype]}
            entry.update((change or {}).get(s.name, {}))
            io.append([entry["name"], entry["mode"], entry["shape"], entry["dtype"]])
    return json.dumps({"graph": graph, "io": io, "device_memory": DEVICE_MEMORY[graph]}).encode()


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def trt_module() -> FakeTensorRT:
    """The stand-in the running test installed."""
    module = sys.modules["tensorrt"]
    assert isinstance(module, FakeTensorRT)
    return module


@contextmanager
def _current_device(fake: FakeTensorRT, device: str) -> Iterator[None]:
    """`torch.cuda.device(...)`'s stand-in: `device` is the stand-in TensorRT's current device inside."""
    previous, fake.current_device = fake.current_device, device
    try:
        yield
    finally:
        fake.current_device = previous


@pytest.fixture
def events() -> list[FakeEvent]:
    return []


def _engine(
    folder: Path, events: list[FakeEvent], plans: dict[str, bytes] | None = None, load: bool = True,
    files: dict[str, dict[str, Any]] | None = None,
) -> TensorRTEngine:
    """A TensorRT engine over stand-in plans (the context graph does not read `pooled_projections`); `files`: the
    manifest records it verifies the plans against."""
    folder.mkdir(exist_ok=True)
    for graph, data in {**_default_plans(), **(plans or {})}.items():
        (folder / f"{graph}.plan").write_bytes(data)
    engine = TensorRTEngine(folder, _specs(), torch.device("cpu"), files=files)

    def new_event() -> FakeEvent:
        events.append(FakeEvent())
        return events[-1]

    waits: list[tuple[int, int]] = []
    current, own = FakeStream(CURRENT_HANDLE, waits), FakeStream(STREAM_HANDLE, waits)
    engine._stream = lambda: current  # type: ignore[method-assign]
    engine._new_stream = lambda: own  # type: ignore[method-assign]
    engine._event = new_event  # type: ignore[method-assign]
    engine._record_use = lambda tensor, stream: None  # type: ignore[method-assign]  # host tensors: nothing to defer
    engine._on_device = lambda: _current_device(trt_module(), ENGINE_DEVICE)  # type: ignore[method-assign]
    if load:
        engine.load()
    return engine


def _default_plans() -> dict[str, bytes]:
    specs = _specs()
    return {graph: _plan(graph, specs[graph], drop=("pooled_projections",) if graph == "context" else ()) for graph in GRAPH_NAMES}


def _records(plans: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """The manifest's records of these plans: what the bundle's check verified the files against."""
    return {f"{graph}.plan": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for graph, data in plans.items()}


def _inputs(graph: str) -> dict[str, torch.Tensor]:
    """Prepared inputs for `graph` (through GraphSpec.prepare, as the engine's step functions do)."""
    spec = _specs()[graph]
    raw = {s.name: torch.zeros(s.shape, dtype=torch.float64 if s.dtype == "float32" else s.torch_dtype) for s in spec.inputs}
    return spec.prepare(raw)


# -- binding ---------------------------------------------------------------------------------------


def test_outputs_are_bound_to_the_same_preallocated_buffers_across_runs(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    engine = _engine(tmp_path, events)
    first_inputs = _inputs("full")
    first = engine.run("full", first_inputs)
    second = engine.run("full", _inputs("full"))
    assert [r["stream"] for r in trt.enqueued] == [STREAM_HANDLE, STREAM_HANDLE]
    for name in ("tokens", "kv"):
        assert first[name] is second[name]
        assert first[name].data_ptr() == second[name].data_ptr()
        assert trt.enqueued[0]["addresses"][name] == trt.enqueued[1]["addresses"][name] == first[name].data_ptr()
    for name, tensor in first_inputs.items():
        assert trt.enqueued[0]["addresses"][name] == tensor.data_ptr()


def test_runs_go_on_the_engines_own_stream_ordered_with_torchs_current_one(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    """Never on the legacy default stream (TensorRT syncs the host after each enqueue there): on the engine's own,
    which waits for torch's current stream before the run, and which torch's stream waits for after it."""
    engine = _engine(tmp_path, events)
    engine.run("full", _inputs("full"))
    engine.run("pruned-k4", _inputs("pruned-k4"))
    assert [record["stream"] for record in trt.enqueued] == [STREAM_HANDLE, STREAM_HANDLE]
    assert engine._own.log == [(STREAM_HANDLE, CURRENT_HANDLE), (CURRENT_HANDLE, STREAM_HANDLE)] * 2
    assert [event.stream for event in events] == [engine._own, engine._own]


def test_a_caller_out_tensor_is_bound_by_address(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    engine = _engine(tmp_path, events)
    cache = torch.zeros(2, 2, 16, 8)
    outputs = engine.run("full", _inputs("full"), out={"kv": cache})
    assert outputs["kv"] is cache
    assert trt.enqueued[-1]["addresses"]["kv"] == cache.data_ptr()
    assert "kv" not in engine._buffers["full"]  # no engine buffer for an output the caller provides
    assert trt.enqueued[-1]["addresses"]["tokens"] == engine._buffers["full"]["tokens"].data_ptr()


def test_only_the_tensors_the_engine_declares_are_bound(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    engine = _engine(tmp_path, events)
    engine.run("context", _inputs("context"))  # pooled_projections given, not declared by the context plan
    assert set(trt.enqueued[-1]["addresses"]) == {"encoder_hidden_states", "pos_embed"}


def test_a_declared_input_the_call_lacks_is_refused_by_name(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    engine = _engine(tmp_path, events)
    inputs = _inputs("pruned-k4")
    del inputs["indices"]
    with pytest.raises(EngineRuntimeError, match=r"'pruned-k4'.*'indices'") as caught:
        engine.run("pruned-k4", inputs)
    assert caught.value.field == "pruned-k4.indices"
    assert trt.enqueued == []


@pytest.mark.parametrize(
    ("name", "tensor", "problem"),
    [
        ("kv", torch.zeros(2, 2, 16, 8, dtype=torch.float16), "dtype"),
        ("kv", torch.zeros(2, 2, 8, 16).transpose(2, 3), "contiguous"),
        ("tokens", torch.zeros(2, 15, 8), "shape"),
    ],
)
def test_a_bound_tensor_unlike_the_engines_declaration_is_refused(
    tmp_path: Path, trt: FakeTensorRT, events: list, name: str, tensor: torch.Tensor, problem: str
) -> None:
    engine = _engine(tmp_path, events)
    with pytest.raises(EngineRuntimeError, match=rf"'full'.*'{name}'.*{problem}") as caught:
        engine.run("full", _inputs("full"), out={name: tensor})
    assert caught.value.field == f"full.{name}"
    assert trt.enqueued == []


# -- every TensorRT call checked -------------------------------------------------------------------


@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_a_plan_that_does_not_deserialize_names_its_graph(tmp_path: Path, trt: FakeTensorRT, events: list, graph: str) -> None:
    trt.fail["deserialize"].add(graph)
    with pytest.raises(EngineMismatchError, match=rf"'{graph}'.*{graph}\.plan") as caught:
        _engine(tmp_path, events)
    assert caught.value.field == f"{graph}.plan"


def test_a_missing_plan_file_names_it(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    engine = _engine(tmp_path, events, load=False)
    (tmp_path / "pruned-k4.plan").unlink()
    with pytest.raises(CorruptBundleError, match=r"'pruned-k4'.*pruned-k4\.plan"):
        engine.load()


def test_a_context_that_cannot_be_created_names_its_graph(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    trt.fail["context"].add("full")
    with pytest.raises(EngineRuntimeError, match=r"execution context for the 'full' graph") as caught:
        _engine(tmp_path, events)
    assert caught.value.field == "full"


def test_a_refused_tensor_address_names_graph_and_tensor(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    engine = _engine(tmp_path, events)
    trt.fail["address"].add("pruned-k4.kv_rows")
    with pytest.raises(EngineRuntimeError, match=r"'pruned-k4'.*'kv_rows'") as caught:
        engine.run("pruned-k4", _inputs("pruned-k4"))
    assert caught.value.field == "pruned-k4.kv_rows"
    assert trt.enqueued == []


def test_a_failed_enqueue_names_its_graph_and_still_holds_the_inputs(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    engine = _engine(tmp_path, events)
    trt.fail["execute"].add("pruned-k4")
    inputs = _inputs("pruned-k4")
    held = weakref.ref(inputs["patches"])
    with pytest.raises(EngineRuntimeError, match=r"failed to enqueue the 'pruned-k4' graph.*tokens.*kv_rows") as caught:
        engine.run("pruned-k4", inputs)
    assert caught.value.field == "pruned-k4"
    del inputs, caught
    assert held() is not None  # part of the work may be on the stream: held until its event completes


@pytest.mark.parametrize(
    ("graph", "plan_change", "tensor"),
    [
        ("full", {"change": {"hidden_states": {"shape": [2, 32, 8]}}}, "hidden_states"),
        ("pruned-k4", {"change": {"indices": {"dtype": "INT32"}}}, "indices"),
        ("full", {"change": {"kv": {"dtype": "HALF"}}}, "kv"),
        ("full", {"drop": ("kv",)}, "kv"),  # an output the runtime reads would never be written
        ("context", {"change": {"encoder_hidden_states": {"name": "text"}}}, "text"),  # not in the graph
    ],
)
def test_engine_io_unlike_the_graph_spec_is_refused_on_load(
    tmp_path: Path, trt: FakeTensorRT, events: list, graph: str, plan_change: dict[str, Any], tensor: str
) -> None:
    plan = _plan(graph, _specs()[graph], **plan_change)
    with pytest.raises(EngineMismatchError, match=rf"'{graph}'.*'{tensor}'") as caught:
        _engine(tmp_path, events, plans={graph: plan})
    assert caught.value.field == f"{graph}.{tensor}"


# -- keeping inputs alive --------------------------------------------------------------------------


def test_inputs_stay_referenced_until_their_event_completes(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    engine = _engine(tmp_path, events)
    inputs = _inputs("full")  # float64 -> float32 casts: nothing but the engine keeps these
    held = {name: weakref.ref(tensor) for name, tensor in inputs.items()}
    engine.run("full", inputs)
    del inputs
    assert all(ref() is not None for ref in held.values()), "released while the stream may still read them"
    assert events[0].stream is engine._own  # recorded on the stream the run was enqueued on

    engine.run("full", _inputs("full"))  # the first run's event has not completed yet
    assert all(ref() is not None for ref in held.values())

    events[0].done = True
    engine.run("full", _inputs("full"))  # a later run finds it complete and lets them go
    assert all(ref() is None for ref in held.values())
    assert len(events) == 2  # the completed event was reused for the third run


def test_synchronize_waits_for_and_releases_every_run(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    engine = _engine(tmp_path, events)
    inputs = _inputs("pruned-k4")
    held = weakref.ref(inputs["patches"])
    engine.run("pruned-k4", inputs)
    del inputs
    engine.synchronize()
    assert held() is None


# -- releasing the engine ----------------------------------------------------------------------------


def test_an_engine_dropped_with_runs_in_flight_waits_for_its_stream_before_its_memory_is_freed(
        tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    """Dropped (a bundle loaded again, a pipeline collected), the engine let its shared block, output buffers and held
    inputs go back to torch's allocator while its stream could still be running on them: the next user of that memory
    would get what the engine wrote. The stream is synchronized first, while all of them are still alive."""
    engine = _engine(tmp_path, events)
    inputs = _inputs("full")  # casts: only the engine holds them once the caller lets go
    outputs = engine.run("full", inputs)
    assert not events[0].done  # the run is still in flight
    memory = {"shared block": weakref.ref(engine.scratch_memory), "tokens": weakref.ref(outputs["tokens"])}
    memory.update((f"input {name}", weakref.ref(tensor)) for name, tensor in inputs.items())
    alive_at_sync: list[list[str]] = []
    engine._own.on_synchronize = lambda: alive_at_sync.append(sorted(name for name, ref in memory.items() if ref() is not None))
    del inputs, outputs, engine
    gc.collect()
    assert alive_at_sync == [sorted(memory)]  # one wait, before anything was let go
    assert [name for name, ref in memory.items() if ref() is not None] == []


def test_close_waits_once_releases_everything_and_a_closed_engine_refuses_to_run(
        tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    engine = _engine(tmp_path, events)
    engine.run("full", _inputs("full"))
    engine.close()
    engine.close()  # a second close does nothing
    assert engine._own.synchronized == 1
    assert (engine.contexts, engine.engines, engine._buffers, engine._in_flight) == ({}, {}, {}, [])
    assert engine.scratch_memory is None and engine.runtime is None
    with pytest.raises(EngineRuntimeError, match=r"^this tensorrt engine of .* was closed; load the bundle again") as caught:
        engine.run("full", _inputs("full"))
    assert caught.value.field == "engine"
    assert len(trt.enqueued) == 1
    never_run = _engine(tmp_path / "other", events)
    never_run.close()  # no stream yet: nothing to wait for
    assert never_run._own is None and never_run.contexts == {}


def test_released_output_buffers_are_marked_used_on_every_stream_torch_read_them_on(
        tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    """Torch reads an output on the stream current at the run; a buffer allocated under another stream would go back to
    that stream's pool, reusable at once there though the reads are not done: each buffer is recorded on every reader
    stream (`record_stream`; the allocation stream's own record is a no-op). The caller's own tensors are not."""
    engine = _engine(tmp_path, events)
    recorded: list[tuple[int, int]] = []
    engine._record_use = lambda tensor, stream: recorded.append((tensor.data_ptr(), stream.cuda_stream))  # type: ignore[method-assign]
    cache = torch.zeros(2, 2, 16, 8)
    engine.run("full", _inputs("full"), out={"kv": cache})
    side = FakeStream(0xA11, engine._own.log)
    engine._stream = lambda: side  # type: ignore[method-assign]
    engine.run("full", _inputs("full"), out={"kv": cache})
    engine.run("pruned-k4", _inputs("pruned-k4"))
    owned = [engine._buffers["full"]["tokens"], *engine._buffers["pruned-k4"].values()]
    assert recorded == []  # nothing while the engine lives: its next write waits for torch's stream
    engine.close()
    assert sorted(recorded) == sorted((t.data_ptr(), handle) for t in owned for handle in (CURRENT_HANDLE, 0xA11))


def test_a_pruned_step_runs_the_graph_of_its_k_and_an_unbuilt_k_is_refused(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    engine = _engine(tmp_path, events)
    assert set(engine.contexts) == set(GRAPH_NAMES)  # every pruned graph of the bundle is loaded
    cache = torch.zeros((2, 2, 16, 8))
    context = {"pos_embed": torch.zeros((16, 8))}
    for k in (2, 4, 2):
        indices = torch.arange(k).expand(2, -1).contiguous()
        tokens = engine.pruned_forward(torch.zeros((2, k, 8)), indices, torch.zeros(2), context, cache)
        assert tokens.shape == (2, k, 8)
    assert [record["graph"] for record in trt.enqueued] == ["pruned-k2", "pruned-k4", "pruned-k2"]
    with pytest.raises(ConfigError, match=r"no pruned graph for k=3 tokens; it was built for k in \[2, 4\]") as caught:
        engine.pruned_forward(torch.zeros((2, 3, 8)), torch.arange(3).expand(2, -1), torch.zeros(2), context, cache)
    assert caught.value.field == "alpha"


def test_not_capturable() -> None:
    assert TensorRTEngine.capturable is False and TensorRTEngine.cuda_graphs is False


# -- one activation memory block shared by every context ------------------------------------------


def test_every_context_is_given_one_block_of_the_most_memory_any_engine_needs(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    """Steps run one at a time on the runtime's one stream, so one block serves all the bundle's engines (a build of 8
    alphas held 10 blocks, each context allocating its own at creation)."""
    engine = _engine(tmp_path, events)
    block = engine.scratch_memory
    assert block is not None and block.dtype == torch.uint8 and block.device == engine.device
    assert block.numel() == max(DEVICE_MEMORY.values())
    assert [context.graph for context in trt.contexts] == list(GRAPH_NAMES)
    assert all(context.strategy is trt.ExecutionContextAllocationStrategy.USER_MANAGED for context in trt.contexts)
    assert {context.memory for context in trt.contexts} == {(block.data_ptr(), block.numel())}
    assert trt.own_memory == []  # no context allocated memory of its own
    for graph in GRAPH_NAMES:
        engine.run(graph, _inputs(graph))
    assert {record["memory"] for record in trt.enqueued} == {(block.data_ptr(), block.numel())}
    assert {record["stream"] for record in trt.enqueued} == {STREAM_HANDLE}  # one stream: runs never overlap


def test_the_runtime_holds_the_shared_block_as_long_as_it_lives(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    """The contexts get only its address: were the tensor not held, torch would hand the memory to other tensors."""
    engine = _engine(tmp_path, events)
    block = weakref.ref(engine.scratch_memory)
    gc.collect()
    assert block() is not None
    del engine
    gc.collect()
    assert block() is None


def test_a_tensorrt_without_caller_owned_memory_gives_each_context_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: list
) -> None:
    """TensorRT 10.0 has ExecutionContextAllocationStrategy.USER_MANAGED but neither device_memory_size_v2 nor
    set_device_memory (both 10.1): contexts are made as before, each with its own memory."""
    fake = FakeTensorRT(10, 0)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    engine = _engine(tmp_path, events)
    assert engine.scratch_memory is None
    assert all(context.strategy is fake.ExecutionContextAllocationStrategy.STATIC for context in fake.contexts)
    assert sorted(fake.own_memory) == sorted(DEVICE_MEMORY.values())
    engine.run("full", _inputs("full"))
    assert fake.enqueued[-1]["memory"] is None


def test_a_shared_block_the_device_cannot_hold_is_an_engine_error_naming_its_size(
    tmp_path: Path, trt: FakeTensorRT, events: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = torch.empty

    def out_of_memory(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("dtype") is torch.uint8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 KiB")
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", out_of_memory)
    with pytest.raises(EngineRuntimeError, match=r"could not allocate the 4096 bytes of activation memory .*out of GPU memory") as caught:
        _engine(tmp_path, events)
    assert caught.value.field == "tensorrt"
    assert trt.contexts == []


# -- plans streamed, verified against the manifest -------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """16-byte blocks, so a stand-in plan spans many."""
    monkeypatch.setattr(verified_file, "BLOCK", 16)
    return 16


def test_plans_are_streamed_a_block_at_a_time_and_load_when_they_match(
    tmp_path: Path, trt: FakeTensorRT, events: list, small_blocks: int
) -> None:
    engine = _engine(tmp_path, events, files=_records(_default_plans()))
    assert trt.plan_sources == ["reader"] * len(GRAPH_NAMES)  # never the whole plan as one buffer
    assert max(trt.answers) == small_blocks  # at most a block in host memory at a time
    assert set(engine.contexts) == set(GRAPH_NAMES)


def _change_once(path: Path, old: bytes, new: bytes, trt: FakeTensorRT | None = None) -> Any:
    """A hook that rewrites `path` in place (same size) once: `old` -> `new`; as the stand-in's `on_request`
    (given `trt`), at the first request made while TensorRT streams that plan."""
    assert len(old) == len(new)

    def change() -> None:
        data = path.read_bytes()
        streaming = trt is None or len(trt.plan_sources) == 1 + GRAPH_NAMES.index(path.stem)
        if streaming and old in data:
            with path.open("r+b") as file:  # in place: the reader's open file sees it
                file.seek(data.index(old))
                file.write(new)

    return change


def test_a_plan_changed_while_tensorrt_streams_it_is_refused_and_its_engine_never_runs(
    tmp_path: Path, trt: FakeTensorRT, events: list, small_blocks: int
) -> None:
    """The change lands after TensorRT's first request, in bytes it reads later: it deserializes them (a streamed read
    cannot be checked first), and the final digest refuses the engine before any context is made."""
    engine = _engine(tmp_path, events, files=_records(_default_plans()), load=False)
    trt.on_request = _change_once(tmp_path / "full.plan", b'"device_memory": 4096', b'"device_memory": 9096', trt)
    with pytest.raises(CorruptBundleError, match=r"engine file full\.plan in .* changed after the bundle's files were checked") as caught:
        engine.load()
    assert caught.value.field == "full.plan"
    assert "full" in trt.deserialized_on and "full" not in engine.engines
    assert trt.contexts == [] and trt.enqueued == []


def test_a_block_read_again_after_it_changed_is_refused(tmp_path: Path, trt: FakeTensorRT, events: list, small_blocks: int) -> None:
    """TensorRT reads on, seeks back to the start and reads again: the first block is read from the file again and
    compared with the digest taken on the first pass, so the changed bytes are never served."""
    engine = _engine(tmp_path, events, files=_records(_default_plans()), load=False)
    trt.stream_ops = [("read", 40), ("seek", 0, "SET")]
    trt.on_request = _change_once(tmp_path / "full.plan", b'{"graph": "full"', b'{"graph": "fuLL"', trt)  # block 0
    with pytest.raises(CorruptBundleError, match=r"engine file full\.plan .* changed after") as caught:
        engine.load()
    assert caught.value.field == "full.plan"
    assert "fuLL" not in trt.deserialized_on  # TensorRT got nothing of the changed block


@pytest.mark.parametrize(
    "ops",
    [
        [("seek", -10, "END"), ("read", 10), ("seek", 20, "SET"), ("read", 5), ("seek", -25, "CUR")],  # tail, skip, back
        [("read", 40), ("seek", 0, "SET")],  # read again from the start
    ],
    ids=["seeks", "reread"],
)
def test_a_plan_tensorrt_reads_out_of_order_loads_when_it_matches(
    tmp_path: Path, trt: FakeTensorRT, events: list, small_blocks: int, ops: list
) -> None:
    trt.stream_ops = ops
    engine = _engine(tmp_path, events, files=_records(_default_plans()))
    assert set(engine.contexts) == set(GRAPH_NAMES)


def test_a_seek_outside_the_plan_is_refused(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    trt.stream_ops = [("seek", 1, "END")]
    with pytest.raises(EngineMismatchError, match=r"could not deserialize the 'context' graph's context\.plan"):
        _engine(tmp_path, events, files=_records(_default_plans()))


def test_bytes_tensorrt_does_not_read_are_verified_too(tmp_path: Path, trt: FakeTensorRT, events: list, small_blocks: int) -> None:
    """TensorRT stops at the plan's end: a change after it (here in trailing bytes) is found by hashing the rest."""
    plans = {**_default_plans(), "full": _default_plans()["full"] + b" " * 100}
    engine = _engine(tmp_path, events, plans=plans, files=_records(plans), load=False)
    with (tmp_path / "full.plan").open("r+b") as file:
        file.seek(-1, 2)
        file.write(b"\n")
    with pytest.raises(CorruptBundleError, match=r"engine file full\.plan .* changed after") as caught:
        engine.load()
    assert caught.value.field == "full.plan"
    assert trt.answers and max(trt.answers) <= small_blocks


def test_a_read_error_while_tensorrt_streams_a_plan_is_named_not_taken_for_a_bad_plan(
    tmp_path: Path, trt: FakeTensorRT, events: list, small_blocks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorRT's binding catches what `read` raises, prints it and reads 0 bytes, so the plan fails to deserialize:
    the read error (here a transient EIO in the middle of full.plan) is kept and named, not "could not deserialize"."""
    plans = _default_plans()
    engine = _engine(tmp_path, events, plans=plans, files=_records(plans), load=False)
    read_at = verified_file.VerifiedFile._read_at
    failed: list[int] = []

    def flaky(self: verified_file.VerifiedFile, offset: int, count: int) -> bytes:
        if self.path.name == "full.plan" and offset > 0 and not failed:
            failed.append(offset)
            raise self._unreadable(OSError(5, "Input/output error"))
        return read_at(self, offset, count)

    monkeypatch.setattr(verified_file.VerifiedFile, "_read_at", flaky)
    with pytest.raises(CorruptBundleError, match=r"engine file full\.plan in .* cannot be read: Input/output error") as caught:
        engine.load()
    assert failed and caught.value.field == "full.plan"


def test_a_plan_of_another_size_than_recorded_is_refused_before_tensorrt_reads_it(
    tmp_path: Path, trt: FakeTensorRT, events: list
) -> None:
    engine = _engine(tmp_path, events, files=_records(_default_plans()), load=False)
    with (tmp_path / "full.plan").open("ab") as file:
        file.write(b" ")
    with pytest.raises(CorruptBundleError, match=r"engine file full\.plan .* changed after") as caught:
        engine.load()
    assert caught.value.field == "full.plan"
    assert "full" not in trt.deserialized_on


def test_a_tensorrt_without_stream_readers_gets_the_plan_as_one_buffer_checked_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: list
) -> None:
    """TensorRT 10.1 to 10.6 have no IStreamReaderV2: the whole plan is read, and checked before TensorRT sees it."""
    fake = FakeTensorRT(10, 6)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    engine = _engine(tmp_path, events, files=_records(_default_plans()))
    assert fake.plan_sources == ["buffer"] * len(GRAPH_NAMES)
    assert engine.scratch_memory is not None  # caller-owned memory is 10.1's

    changed = _engine(tmp_path / "changed", events, files=_records(_default_plans()), load=False)
    _change_once(tmp_path / "changed" / "full.plan", b'"device_memory": 4096', b'"device_memory": 9096')()
    fake.deserialized_on.clear()
    with pytest.raises(CorruptBundleError, match=r"engine file full\.plan .* changed after") as caught:
        changed.load()
    assert caught.value.field == "full.plan"
    assert "full" not in fake.deserialized_on


def test_a_plan_that_cannot_be_opened_is_named(tmp_path: Path, trt: FakeTensorRT, events: list, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(tmp_path, events, load=False)
    plan = tmp_path / "full.plan"
    open_file = verified_file.os.open

    def refused(path: Any, flags: int, *args: Any) -> int:
        if Path(path) == plan:
            raise PermissionError(13, "Permission denied", str(path))
        return open_file(path, flags, *args)

    monkeypatch.setattr(verified_file.os, "open", refused)
    with pytest.raises(CorruptBundleError, match=r"engine file full\.plan in .* cannot be read: Permission denied") as caught:
        engine.load()
    assert caught.value.field == "full.plan"


# -- the builder -----------------------------------------------------------------------------------


def _onnx_dir(tmp_path: Path) -> Path:
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    for graph in GRAPH_NAMES:
        (onnx_dir / f"{graph}.onnx").write_bytes(b"onnx")
    return onnx_dir


def _staging(tmp_path: Path) -> Path:
    staging = tmp_path / "engines" / ".build.tmp-x"
    staging.mkdir(parents=True)
    return staging


def test_build_plans_writes_one_plan_per_graph_atomically(tmp_path: Path, trt: FakeTensorRT) -> None:
    staging = _staging(tmp_path)
    trt_export.build_plans(_onnx_dir(tmp_path), staging, BuildConfig("tiny-sd3", backend="tensorrt", precision="fp16"), GRAPH_NAMES)
    assert sorted(p.name for p in staging.iterdir()) == sorted(f"{g}.plan" for g in GRAPH_NAMES)  # no temporaries left
    for graph in GRAPH_NAMES:
        assert (staging / f"{graph}.plan").read_bytes() == f"plan:{graph}:strongly-typed:".encode()
    cache = staging.parent / trt_export.TIMING_CACHE
    assert cache.read_bytes() == b"++++"  # shared by the four graphs, one build after another
    assert [p.name for p in staging.parent.iterdir() if p.name.startswith(".tensorrt")] == []


def test_a_timing_cache_tensorrt_rejects_is_set_aside(tmp_path: Path, trt: FakeTensorRT) -> None:
    staging = _staging(tmp_path)
    (staging.parent / trt_export.TIMING_CACHE).write_bytes(b"from another TensorRT")
    trt.reject_timing_cache = True
    trt_export.build_plans(_onnx_dir(tmp_path), staging, BuildConfig("tiny-sd3", backend="tensorrt"), GRAPH_NAMES)
    assert (staging / "pruned-k4.plan").is_file()


def test_a_timing_cache_this_user_cannot_read_is_built_without(tmp_path: Path, trt: FakeTensorRT, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's cache (mode 0600) in a shared engines folder: reading it raised PermissionError, a traceback; it
    only speeds builds up, so the build goes on without it (and writes its own)."""
    staging = _staging(tmp_path)
    cache = staging.parent / trt_export.TIMING_CACHE
    cache.write_bytes(b"another user's")
    read_bytes = Path.read_bytes

    def refused(path: Path) -> bytes:
        if path == cache:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refused)
    trt_export.build_plans(_onnx_dir(tmp_path), staging, BuildConfig("tiny-sd3", backend="tensorrt"), GRAPH_NAMES)
    assert sorted(p.name for p in staging.iterdir()) == sorted(f"{g}.plan" for g in GRAPH_NAMES)


@pytest.mark.parametrize(("call", "graph", "field"), [("parse", "full", "full.onnx"), ("build", "pruned-k4", "pruned-k4.plan")])
def test_builder_failures_name_the_graph(tmp_path: Path, trt: FakeTensorRT, call: str, graph: str, field: str) -> None:
    staging = _staging(tmp_path)
    trt.fail[call].add(graph)
    with pytest.raises(BuildError, match=rf"'{graph}'") as caught:
        trt_export.build_plans(_onnx_dir(tmp_path), staging, BuildConfig("tiny-sd3", backend="tensorrt"), GRAPH_NAMES)
    assert caught.value.field == field
    assert not (staging / f"{graph}.plan").exists()
    assert all(not p.name.startswith(".") for p in staging.iterdir())


def test_a_missing_onnx_graph_names_it(tmp_path: Path, trt: FakeTensorRT) -> None:
    onnx_dir = _onnx_dir(tmp_path)
    (onnx_dir / "context.onnx").unlink()
    with pytest.raises(BuildError, match=r"'context'") as caught:
        trt_export.build_plans(onnx_dir, _staging(tmp_path), BuildConfig("tiny-sd3", backend="tensorrt"), GRAPH_NAMES)
    assert caught.value.field == "context.onnx"


@pytest.mark.parametrize("major", [10, 11])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_every_precision_builds_strongly_typed_without_precision_flags_or_tf32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, major: int, precision: str
) -> None:
    """The ONNX graphs are exported in the build's dtype, so the network takes its types from them: TensorRT 11 has no
    FP16 / BF16 builder flag at all (an fp16 build was refused there), and TensorRT 10 does not build a strongly typed
    network with one. TF32, on by default, is off: an fp32 graph computes in fp32 as the fp32 tolerance assumes."""
    fake = FakeTensorRT(major)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    staging = _staging(tmp_path)
    trt_export.build_plans(_onnx_dir(tmp_path), staging, BuildConfig("tiny-sd3", backend="tensorrt", precision=precision), GRAPH_NAMES)
    for graph in GRAPH_NAMES:
        assert (staging / f"{graph}.plan").read_bytes() == f"plan:{graph}:strongly-typed:".encode()
    assert len(fake.configs) == len(GRAPH_NAMES)
    assert all(not config.get_flag(fake.BuilderFlag.TF32) for config in fake.configs)


@pytest.mark.parametrize("major", [10, 11])
def test_the_strongly_typed_creation_flag_is_shifted_by_this_tensorrts_own_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, major: int
) -> None:
    """kSTRONGLY_TYPED is bit 1 in TensorRT 10 and bit 0 in 11 (where it is ignored): never a hard-coded 2."""
    fake = FakeTensorRT(major)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    created: list[int] = []
    create_network = fake.Builder.create_network

    def recording(self: Any, flags: int = 0) -> Any:
        created.append(flags)
        return create_network(self, flags)

    monkeypatch.setattr(fake.Builder, "create_network", recording)
    trt_export.build_plans(_onnx_dir(tmp_path), _staging(tmp_path), BuildConfig("tiny-sd3", backend="tensorrt"), ("full",))
    assert created == [2 if major == 10 else 1]


def test_a_parse_failure_reports_tensorrts_parser_errors(tmp_path: Path, trt: FakeTensorRT) -> None:
    trt.fail["parse"].add("full")
    with pytest.raises(BuildError, match=r"could not parse the 'full' graph's full\.onnx: In node 3 .*UNSUPPORTED_NODE: unsupported operator Foo"):
        trt_export.build_plans(_onnx_dir(tmp_path), _staging(tmp_path), BuildConfig("tiny-sd3", backend="tensorrt"), GRAPH_NAMES)


def test_a_builder_tensorrt_cannot_make_is_a_build_error(tmp_path: Path, trt: FakeTensorRT) -> None:
    """tensorrt.Builder(logger) raises pybind11's TypeError where TensorRT makes no builder (it never returns None)."""
    trt.fail["builder"].add("*")
    with pytest.raises(BuildError, match=r"could not create a builder for the 'context' graph .*factory function returned nullptr") as caught:
        trt_export.build_plans(_onnx_dir(tmp_path), _staging(tmp_path), BuildConfig("tiny-sd3", backend="tensorrt"), GRAPH_NAMES)
    assert caught.value.field == "context.plan"


# -- runtime conventions ---------------------------------------------------------------------------


def test_a_runtime_tensorrt_cannot_make_is_an_engine_error(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    """tensorrt.Runtime(logger) raises pybind11's TypeError where TensorRT makes no runtime (it never returns None)."""
    trt.fail["runtime"].add("*")
    with pytest.raises(EngineRuntimeError, match=r"could not create a runtime .*factory function returned nullptr") as caught:
        _engine(tmp_path, events)
    assert caught.value.field == "tensorrt"


def test_plans_are_deserialized_and_enqueued_on_the_engines_device(tmp_path: Path, trt: FakeTensorRT, events: list) -> None:
    """TensorRT binds an engine to the CUDA device current at deserialization and runs it there: without making the
    engine's device current, a bundle loaded on cuda:1 would land on cuda:0."""
    engine = _engine(tmp_path, events)
    assert trt.deserialized_on == dict.fromkeys(GRAPH_NAMES, ENGINE_DEVICE)
    engine.run("full", _inputs("full"))
    assert trt.enqueued[-1]["device"] == ENGINE_DEVICE
    assert trt.current_device is None  # and made current only for the while


def test_the_device_made_current_is_the_engines() -> None:
    engine = TensorRTEngine(Path("unused"), _specs(), torch.device("cuda", 1))
    assert engine._on_device().idx == 1  # torch.cuda.device(cuda:1); entering it is what needs a GPU
