"""catrt's TensorRT glue against a second, independent stand-in `tensorrt`, written from TensorRT's documented Python API.

This tests OUR code, not TensorRT. tests/test_tensorrt_glue.py drives the glue with a stand-in made to exercise
each failure path; this one was written separately, from the bindings' documentation (NVIDIA/TensorRT
python/docstrings/infer/pyCoreDoc.h, pyFoundationalTypesDoc.h, parsers/pyOnnxDoc.h and the signatures in
python/src), to catch the glue relying on anything beyond that API: only the documented names, argument names and
types (`set_tensor_address(name, memory: int)`, `execute_async_v3(stream_handle: int)`, `create_network(flags)`,
`parse_from_file(model: str)`...), the documented returns (None / False on failure, `Dims`, enum members, buffers).

It follows the release tags' python/src/infer/pyCore.cpp where the runtime's API changed: caller-owned context memory
(`ICudaEngine.device_memory_size_v2`, `IExecutionContext.set_device_memory(memory, size)`) from 10.1, with
`ExecutionContextAllocationStrategy` (10.0); `IStreamReaderV2` and `SeekPosition` from 10.7, its Python `read(num_bytes,
stream)` asked again by the binding until the count is served or the answer is empty, and a subclass that does not
run the base's `__init__` refused as pybind11 refuses it; `device_memory_size` (deprecated in 10.1) gone in 11. It is
instantiated as 10.0, 10.16 and 11.1. A context given caller-owned memory writes over the bytes its engine needs on
every run, as TensorRT's activations do, so memory overlapping an I/O tensor would corrupt the outputs.

Its builder really parses the exported ONNX file, weights in an external-data file beside it as catrt writes them,
and its "plan" is that model with the weights inline (a real plan embeds them too); its execution context really
runs the model (with ONNX Runtime, on the CPU) reading its inputs from and writing its outputs to the addresses the
glue bound. So the outputs the glue returns equal the graph's own only if every address, shape and dtype is right.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from catrt.build_config import BuildConfig
from catrt.engines.base import GraphSpec, TensorSpec
from catrt.engines.tensorrt import TensorRTEngine
from catrt.errors import CorruptBundleError, EngineMismatchError
from catrt.export import tensorrt as trt_export
from catrt.export.weights import SharedWeights
from catrt.manifest import file_digest

_ONNX_TO_TRT = {TensorProto.FLOAT: "FLOAT", TensorProto.FLOAT16: "HALF", TensorProto.INT64: "INT64", TensorProto.INT32: "INT32"}
_TRT_TO_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32}


def _incompatible(call: str, signature: str) -> TypeError:
    """pybind11's answer to arguments of the wrong type."""
    return TypeError(f"{call}(): incompatible function arguments. The following argument types are supported:\n    1. {signature}")


def documented_tensorrt(major: int, minor: int) -> types.ModuleType:
    """A minimal `tensorrt` module: the documented calls of a build and a run, nothing else."""
    trt = types.ModuleType("tensorrt")
    version = (major, minor)
    trt.deserialized_from: list[str] = []  # per deserialization: "buffer" or "stream reader"

    class ILogger:
        Severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})
        WARNING = Severity.WARNING  # exported into the class scope: trt.Logger.WARNING

    class Logger(ILogger):
        def __init__(self, min_severity: Any = ILogger.Severity.WARNING) -> None:
            self.min_severity = ILogger.Severity(min_severity)

    trt.Logger = Logger
    trt.DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT8 INT32 INT64 BOOL UINT8 FP8")
    trt.TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
    flags = {"TF32": 6, "REFIT": 4} if major >= 11 else {"FP16": 0, "INT8": 1, "REFIT": 4, "TF32": 6, "BF16": 17}
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    trt.NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0} if major >= 11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    )

    class Dims:
        def __init__(self, shape: list[int]) -> None:
            self._d = [int(d) for d in shape]

        def __len__(self) -> int:
            return len(self._d)

        def __getitem__(self, index: int) -> int:
            if not 0 <= index < len(self._d):
                raise IndexError("Out of bounds")
            return self._d[index]

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.strongly_typed = major >= 11 or bool(flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
            self.model: onnx.ModelProto | None = None

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
            self.network, self._errors = network, []

        def parse_from_file(self, model: str) -> bool:
            try:  # external data is found relative to the model's own path
                self.network.model = onnx.load(model)
            except Exception as error:  # noqa: BLE001 - the parser records the error and returns False
                self._errors.append(f"(parseFromFile): MODEL_DESERIALIZE_FAILED: {error}")
                return False
            return True

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> str:
            return self._errors[index]

    class ITimingCache:
        def __init__(self, data: bytes) -> None:
            self._data = data

        def serialize(self) -> memoryview:
            return memoryview(self._data or b"cache")

    class IBuilderConfig:
        def __init__(self) -> None:
            self._flags = {trt.BuilderFlag.TF32}  # "Enabled by default."
            self._cache: ITimingCache | None = None

        def set_flag(self, flag: Any) -> None:
            self._flags.add(trt.BuilderFlag(flag))

        def clear_flag(self, flag: Any) -> None:
            self._flags.discard(trt.BuilderFlag(flag))

        def get_flag(self, flag: Any) -> bool:
            return trt.BuilderFlag(flag) in self._flags

        def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache:
            return ITimingCache(bytes(memoryview(serialized_timing_cache)))

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            self._cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self._cache

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(int(flags))

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> memoryview | None:
            precision = [
                name for name in ("FP16", "BF16", "INT8") if name in trt.BuilderFlag.__members__ and config.get_flag(trt.BuilderFlag[name])
            ]
            if network.model is None or (network.strongly_typed and precision):
                return None  # API Usage Error: a precision flag on a strongly typed network
            return memoryview(network.model.SerializeToString())  # an IHostMemory: a buffer, weights inline

    trt.ExecutionContextAllocationStrategy = enum.Enum("ExecutionContextAllocationStrategy", "STATIC ON_PROFILE_CHANGE USER_MANAGED")

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine, strategy: Any) -> None:
            self.engine, self._addresses = engine, {}
            self.user_managed = strategy is trt.ExecutionContextAllocationStrategy.USER_MANAGED
            self.memory: tuple[int, int] | None = None

        def set_tensor_address(self, name: str, memory: int) -> bool:
            if type(memory) is not int:
                raise TypeError("set_tensor_address(): incompatible function arguments (memory: int)")
            if name not in self.engine.io:
                return False
            self._addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            if type(stream_handle) is not int:
                raise TypeError("execute_async_v3(): incompatible function arguments (stream_handle: int)")
            if set(self._addresses) != set(self.engine.io):
                return False  # every I/O tensor needs an address
            if self.user_managed:
                if self.memory is None or self.memory[1] < self.engine.activation_bytes:
                    return False  # no device memory (or too little) for its activations
                ctypes.memset(self.memory[0], 0xAB, self.engine.activation_bytes)  # the activations' scribbles
            feeds = {name: self._view(name).copy() for name, io in self.engine.io.items() if io[0] == "INPUT"}
            outputs = [name for name, io in self.engine.io.items() if io[0] == "OUTPUT"]
            for name, value in zip(outputs, self.engine.session.run(outputs, feeds)):
                self._view(name)[...] = value
            return True

        def _view(self, name: str) -> np.ndarray:
            _, shape, dtype = self.engine.io[name]
            count = int(np.prod(shape)) * np.dtype(_TRT_TO_NUMPY[dtype]).itemsize
            raw = (ctypes.c_ubyte * count).from_address(self._addresses[name])
            return np.frombuffer(raw, dtype=_TRT_TO_NUMPY[dtype]).reshape(shape)

    if version >= (10, 1):
        def set_device_memory(self: IExecutionContext, memory: int, size: int) -> None:
            if type(memory) is not int or memory < 0 or type(size) is not int:
                raise _incompatible("set_device_memory", "(self: tensorrt.IExecutionContext, memory: int, size: int) -> None")
            self.memory = (memory, size)

        IExecutionContext.set_device_memory = set_device_memory

    class ICudaEngine:
        def __init__(self, model: onnx.ModelProto) -> None:
            self.activation_bytes = 512 * len(model.graph.node)  # standing in for what TensorRT's tactics need
            self.session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            initializers = {init.name for init in model.graph.initializer}
            self.io: dict[str, tuple[str, list[int], str]] = {}
            for mode, values in (("INPUT", model.graph.input), ("OUTPUT", model.graph.output)):
                for value in values:
                    if value.name not in initializers:
                        tensor = value.type.tensor_type
                        shape = [d.dim_value for d in tensor.shape.dim]
                        self.io[value.name] = (mode, shape, _ONNX_TO_TRT[tensor.elem_type])
            self._names = list(self.io)

        @property
        def num_io_tensors(self) -> int:
            return len(self._names)

        def get_tensor_name(self, index: int) -> str:
            return self._names[index]

        def get_tensor_mode(self, name: str) -> Any:
            return trt.TensorIOMode[self.io[name][0]] if name in self.io else trt.TensorIOMode.NONE

        def get_tensor_shape(self, name: str) -> Dims:
            return Dims(self.io[name][1])

        def get_tensor_dtype(self, name: str) -> Any:
            return trt.DataType[self.io[name][2]]

        def create_execution_context(self, strategy: Any = trt.ExecutionContextAllocationStrategy.STATIC) -> IExecutionContext | None:
            if not isinstance(strategy, trt.ExecutionContextAllocationStrategy):
                raise _incompatible("create_execution_context", "(self: tensorrt.ICudaEngine, strategy: ExecutionContextAllocationStrategy = STATIC)")
            return IExecutionContext(self, strategy)

    if version >= (10, 1):
        ICudaEngine.device_memory_size_v2 = property(lambda self: self.activation_bytes)
    if version < (11, 0):
        ICudaEngine.device_memory_size = property(lambda self: self.activation_bytes)  # deprecated in 10.1

    reader_base: Any = None
    if version >= (10, 7):
        trt.SeekPosition = enum.Enum("SeekPosition", "SET CUR END")

        class Trampoline(type):
            def __call__(cls, *args: Any, **kwargs: Any) -> Any:
                instance = super().__call__(*args, **kwargs)
                if not getattr(instance, "_initialised", False):
                    raise TypeError("tensorrt.IStreamReaderV2.__init__() must be called when overriding __init__")
                return instance

        class IStreamReaderV2(metaclass=Trampoline):
            def __init__(self) -> None:
                self._initialised = True

        reader_base = trt.IStreamReaderV2 = IStreamReaderV2

    def read(reader: Any, num_bytes: int) -> bytes:
        """PyStreamReaderV2.read: the Python `read(num_bytes, stream)` asked until num_bytes are served or it answers
        with nothing (an exception in it counts as nothing)."""
        served = b""
        while len(served) < num_bytes:
            try:
                answer = bytes(memoryview(reader.read(num_bytes - len(served), 0))[: num_bytes - len(served)])
            except Exception:  # noqa: BLE001 - printed as "[ERROR] Exception caught in read()"
                answer = b""
            if not answer:
                break
            served += answer
        return served

    def streamed(reader: Any) -> bytes:
        """A plan read as a deserializer may: a header, back to the start, then on in requests to a short one."""
        read(reader, 16)
        if not reader.seek(0, trt.SeekPosition.SET):
            return b""
        data = b""
        while len(part := read(reader, 4096)) == 4096:
            data += part
        return data + part

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
            if reader_base is not None and isinstance(serialized_engine, reader_base):
                trt.deserialized_from.append("stream reader")
                data = streamed(serialized_engine)
            else:
                try:
                    data = bytes(memoryview(serialized_engine))
                except TypeError:
                    raise _incompatible("deserialize_cuda_engine", "(self: tensorrt.Runtime, serialized_engine: buffer)") from None
                trt.deserialized_from.append("buffer")
            try:
                return ICudaEngine(onnx.load_from_string(data))
            except Exception:  # noqa: BLE001 - "or None if it could not be deserialized"
                return None

    trt.Runtime, trt.Builder, trt.OnnxParser, trt.Dims = Runtime, Builder, OnnxParser, Dims
    return trt


# -- a small graph with the runtime's I/O names, its weight moved out to weights.bin by catrt's own export code ----

SPEC = GraphSpec(
    inputs=(TensorSpec("hidden_states", (2, 4, 16), "float32"), TensorSpec("timestep", (2,), "float32")),
    outputs=(TensorSpec("tokens", (2, 4, 16), "float32"),),
)
WEIGHT = np.arange(256, dtype=np.float32).reshape(16, 16) / 256  # 1 KiB: moved out of the graph


def _export(folder: Path) -> Path:
    """`full.onnx` computing tokens = hidden_states @ WEIGHT + timestep (per batch row), WEIGHT in weights.bin at its
    offset (catrt's SharedWeights, as `catrt build` writes every graph)."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["hidden_states", "weight"], ["projected"]),
            helper.make_node("Reshape", ["timestep", "column"], ["shift"]),
            helper.make_node("Add", ["projected", "shift"], ["tokens"]),
        ],
        "full",
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, [2, 4, 16]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [2, 4, 16])],
        initializer=[numpy_helper.from_array(WEIGHT, "weight"), numpy_helper.from_array(np.array([2, 1, 1], dtype=np.int64), "column")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folder.mkdir(parents=True)
    with SharedWeights(folder) as weights:
        weights.move_out("full", model)
        weights.save({"full": model})
    assert model.graph.initializer[0].data_location == TensorProto.EXTERNAL  # the parser must find weights.bin
    return folder


class _Stream:
    def __init__(self, handle: int) -> None:
        self.cuda_stream = handle

    def wait_stream(self, other: _Stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Event:
    def record(self, stream: _Stream) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


@contextmanager
def _no_device_switch() -> Iterator[None]:
    yield


@pytest.fixture(params=[(10, 0), (10, 16), (11, 1)], ids=["tensorrt10.0", "tensorrt10.16", "tensorrt11.1"])
def documented(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = documented_tensorrt(*request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_built_plan_loads_and_runs_at_the_bound_addresses(tmp_path: Path, documented: types.ModuleType, precision: str) -> None:
    onnx_dir = _export(tmp_path / "export")
    staging = tmp_path / "engines" / ".build.tmp-x"
    staging.mkdir(parents=True)
    trt_export.build_plans(onnx_dir, staging, BuildConfig("tiny-sd3", backend="tensorrt", precision=precision), ["full"])
    plan = staging / "full.plan"
    records = {plan.name: {"sha256": file_digest(plan), "size": plan.stat().st_size}}  # as the manifest records it

    engine = TensorRTEngine(staging, {"full": SPEC}, torch.device("cpu"), files=records)
    engine._stream = lambda: _Stream(0)  # type: ignore[method-assign]
    engine._new_stream = lambda: _Stream(0x5EED)  # type: ignore[method-assign]
    engine._event = _Event  # type: ignore[method-assign]
    engine._record_use = lambda tensor, stream: None  # type: ignore[method-assign]  # host tensors: nothing to defer
    engine._on_device = _no_device_switch  # type: ignore[method-assign]
    engine.load()
    hidden = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([3.0, 500.0])
    tokens = engine.run("full", SPEC.prepare({"hidden_states": hidden, "timestep": timestep}))["tokens"]
    expected = hidden @ torch.from_numpy(WEIGHT) + timestep[:, None, None]
    torch.testing.assert_close(tokens, expected)
    again = engine.run("full", SPEC.prepare({"hidden_states": -hidden, "timestep": timestep}))["tokens"]
    torch.testing.assert_close(again, -hidden @ torch.from_numpy(WEIGHT) + timestep[:, None, None])

    # 10.7 on: streamed through an IStreamReaderV2; 10.1 on: the context runs in the runtime's one shared block
    assert documented.deserialized_from == ["stream reader" if hasattr(documented, "IStreamReaderV2") else "buffer"]
    context, block = engine.contexts["full"], engine.scratch_memory
    if hasattr(engine.engines["full"], "device_memory_size_v2"):
        assert block is not None and block.numel() == engine.engines["full"].device_memory_size_v2
        assert context.user_managed and context.memory == (block.data_ptr(), block.numel())
    else:
        assert block is None and not context.user_managed


def _loaded(folder: Path) -> TensorRTEngine:
    engine = TensorRTEngine(folder, {"full": SPEC}, torch.device("cpu"))
    engine._on_device = _no_device_switch  # type: ignore[method-assign]
    engine.load()
    return engine


def test_a_plan_tensorrt_cannot_deserialize_is_refused_by_name(tmp_path: Path, documented: types.ModuleType) -> None:
    (tmp_path / "full.plan").write_bytes(b"\x00 not a plan")
    with pytest.raises(EngineMismatchError, match=r"could not deserialize the 'full' graph's full\.plan") as caught:
        _loaded(tmp_path)
    assert caught.value.field == "full.plan"


def test_an_engine_whose_io_differs_from_the_spec_is_refused_on_load(tmp_path: Path, documented: types.ModuleType) -> None:
    onnx_dir = _export(tmp_path / "export")
    trt_export.build_plans(onnx_dir, tmp_path, BuildConfig("tiny-sd3", backend="tensorrt"), ["full"])
    wider = GraphSpec(inputs=(TensorSpec("hidden_states", (2, 5, 16), "float32"), SPEC.inputs[1]), outputs=SPEC.outputs)
    engine = TensorRTEngine(tmp_path, {"full": wider}, torch.device("cpu"))
    engine._on_device = _no_device_switch  # type: ignore[method-assign]
    with pytest.raises(EngineMismatchError, match=r"'full' engine's input 'hidden_states' has shape \(2, 4, 16\)"):
        engine.load()


def test_a_plan_unlike_its_manifest_record_is_refused_naming_it(tmp_path: Path, documented: types.ModuleType) -> None:
    """Streamed (10.7 on) it is refused once read, before any context; read whole (before), before TensorRT sees it."""
    onnx_dir = _export(tmp_path / "export")
    trt_export.build_plans(onnx_dir, tmp_path, BuildConfig("tiny-sd3", backend="tensorrt"), ["full"])
    plan = tmp_path / "full.plan"
    records = {plan.name: {"sha256": "0" * 64, "size": plan.stat().st_size}}  # another file's digest
    engine = TensorRTEngine(tmp_path, {"full": SPEC}, torch.device("cpu"), files=records)
    engine._on_device = _no_device_switch  # type: ignore[method-assign]
    with pytest.raises(CorruptBundleError, match=r"engine file full\.plan in .* changed after the bundle's files were checked") as caught:
        engine.load()
    assert caught.value.field == "full.plan"
    assert engine.contexts == {}
    assert documented.deserialized_from == (["stream reader"] if hasattr(documented, "IStreamReaderV2") else [])
