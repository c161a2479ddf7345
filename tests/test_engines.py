"""Engine builds and bundles: export, backends, manifest checks, atomic publishing, CLI.

Generation on a built engine must match the eager runtime for the same seed within
GENERATION_TOLERANCE (max |engine - eager| / max |eager| over the output latents); fp32 ONNX Runtime
and torch.compile differ from eager by float rounding only (about 1e-6).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import onnx
import pytest
import torch

import catrt
from catrt import build as build_module
from catrt.build import build_engines
from catrt.build_config import BACKENDS, BuildConfig
from catrt.cli import main
from catrt.contract import FULL, PRUNED, pruned_graph, step_shapes
from catrt.engines import ENGINES, GraphSpec, TensorSpec, resolve_backend
from catrt.engines.tensorrt import TensorRTEngine
from catrt.errors import BuildError, ConfigError, CorruptBundleError, EngineMismatchError
from catrt.export import BACKEND_BUILDS
from catrt.manifest import MANIFEST_FILE, file_digest, read_manifest
from catrt.models import make_adapter
from catrt.provenance import environment_problems, package_versions
from tests.conftest import TINY_NAMES, call_kwargs

GENERATION_TOLERANCE = 1e-4
SIZE = {"height": 64, "width": 96, "steps": 12, "t0": 4, "max_sequence_length": 16}  # as tests.conftest.call_kwargs
TRT_SKIP = TensorRTEngine.unavailable_reason()
# One build per layout: tiny-flux-schnell's graphs are tiny-flux's without the guidance input.
BUILT_NAMES = [name for name in TINY_NAMES if name != "tiny-flux-schnell"]
# Rows of the graphs' latents at batch 2: classifier-free guidance doubles them; FLUX's distilled guidance does not.
LATENTS = {"tiny-sd3": [4, 16, 8, 12], "tiny-sd3.5": [4, 16, 8, 12], "tiny-pixart": [4, 4, 8, 12], "tiny-flux": [2, 24, 64]}


def _config(model: str, backend: str = "onnxruntime", **overrides: Any) -> BuildConfig:
    return BuildConfig(model, backend=backend, **{"batch": 2, "alphas": (0.3,), **SIZE, **overrides})


def _build(config: BuildConfig, root: Path) -> Path:
    return build_engines(config, out_dir=root / "engines", export_dir=root / "export", progress=False)


@pytest.fixture(scope="module")
def onnx_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One ONNX Runtime build per tiny model, shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("builds")
    return {name: _build(_config(name), root) for name in BUILT_NAMES}


@pytest.fixture()
def bundle_copy(onnx_builds: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the tiny-sd3 bundle that a test may damage."""
    return Path(shutil.copytree(onnx_builds["tiny-sd3"], tmp_path / onnx_builds["tiny-sd3"].name))


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def _external_bytes(path: Path) -> int:
    """Bytes of the initializers a graph keeps in external data."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(
        int(entry.value) for tensor in model.graph.initializer for entry in tensor.external_data if entry.key == "length"
    )


def _edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = folder / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# -- builds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILT_NAMES)
def test_build_writes_a_verified_bundle_with_shared_weights(name: str, onnx_builds: dict[str, Path]) -> None:
    folder = onnx_builds[name]
    assert folder.name == f"{name}-96x64-b2-s12-t4-a0.30-l16-fp32-onnxruntime"  # WxH
    manifest = read_manifest(folder)
    assert BuildConfig.from_dict(manifest.build) == _config(name)  # config from the manifest, not the name
    k = math.ceil(0.3 * 24)
    assert (manifest.num_tokens, manifest.k) == (24, k)
    assert manifest.alphas == [{"alpha": 0.3, "k": k, "graph": f"pruned-k{k}", "max_relative_error": manifest.alphas[0]["max_relative_error"]}]
    assert manifest.device == {"kind": "cpu"}
    assert {"catrt", "torch", "diffusers", "onnx", "onnxruntime"} <= set(manifest.versions)
    assert manifest.exporters == {"context": "dynamo", "full": "dynamo", f"pruned-k{k}": "dynamo"}
    assert sorted(manifest.files) == ["context.onnx", "full.onnx", "initializers.json", f"pruned-k{k}.onnx", "weights.bin"]
    assert all(file_digest(folder / f) == record["sha256"] for f, record in manifest.files.items())
    assert manifest.total_size == sum(record["size"] for record in manifest.files.values())
    assert max(manifest.verification["max_relative_error"].values()) < manifest.verification["tolerance"] == 1e-3
    assert [spec["name"] for spec in manifest.graphs[f"pruned-k{k}"]["inputs"]][:4] == ["patches", "indices", "timestep", "kv_cache"]
    assert manifest.graphs["full"]["inputs"][0] == {"name": "hidden_states", "shape": LATENTS[name], "dtype": "float32"}

    export = folder.parent.parent / "export" / folder.name
    for graph in ("context", "full", f"pruned-k{k}"):
        onnx.checker.check_model(str(export / f"{graph}.onnx"))  # path-based: the external data is checked too
        assert (export / f"{graph}.onnx").read_bytes() == (folder / f"{graph}.onnx").read_bytes()
    # Weights shared by the step graphs are stored once: the file is about the larger step graph's
    # weights plus the context graph's own (PixArt's caption projection and cross-attention K/V).
    full, pruned, context = (_external_bytes(export / f"{graph}.onnx") for graph in ("full", f"pruned-k{k}", "context"))
    stored = (folder / "weights.bin").stat().st_size
    assert stored < 1.05 * (max(full, pruned) + context) and stored < 0.9 * (full + pruned + context)
    assert not list(folder.parent.glob(".*"))  # no temporary folder left behind


@pytest.mark.parametrize("name", BUILT_NAMES)
def test_built_graphs_have_the_declared_io(name: str, onnx_builds: dict[str, Path], tiny_pipelines: dict[str, Any]) -> None:
    manifest = read_manifest(onnx_builds[name])
    adapter = make_adapter(tiny_pipelines[name].transformer)
    graphs = {graph: GraphSpec.from_dict(spec) for graph, spec in manifest.graphs.items()}
    latents = graphs["full"].inputs[0]
    timestep = graphs["full"].inputs[1].torch_dtype
    (k,) = (entry["k"] for entry in manifest.alphas)
    declared = step_shapes(adapter, latents.shape, k, latents.torch_dtype, timestep)
    for step, graph in ((FULL, "full"), (PRUNED, pruned_graph(k))):
        spec = graphs[graph]
        assert tuple(s.name for s in spec.inputs[: len(step.inputs)]) == step.inputs
        assert tuple(s.name for s in spec.outputs) == step.outputs
        got = {s.name: (s.shape, s.torch_dtype) for s in (*spec.inputs[: len(step.inputs)], *spec.outputs)}
        assert got == declared[step.graph]
    session_inputs = {path.stem: [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
                      for path in onnx_builds[name].glob("*.onnx")}
    for graph, spec in graphs.items():
        assert session_inputs[graph] == [s.name for s in spec.inputs]  # the ONNX graph takes what the manifest says


@pytest.mark.parametrize("name", BUILT_NAMES)
def test_generation_on_onnxruntime_matches_eager_runtime(name: str, onnx_builds: dict[str, Path], tiny_pipelines: dict[str, Any]) -> None:
    fast = catrt.load(onnx_builds[name])
    fast.set_progress_bar_config(disable=True)
    pipe = tiny_pipelines[name]
    expected = catrt.accelerate(pipe, _config(name).cat_config())(**call_kwargs(pipe)).images
    got = fast(**call_kwargs(pipe)).images
    assert _relative_error(got, expected) < GENERATION_TOLERANCE


def test_engine_defaults_to_the_build_settings(onnx_builds: dict[str, Path]) -> None:
    fast = catrt.load(onnx_builds["tiny-pixart"], catrt.CATConfig(alpha=0.3, t0=4, trace=True))
    fast.set_progress_bar_config(disable=True)
    images = fast(["a cat", "a dog"], output_type="latent").images  # size, steps, text length: the build's
    assert images.shape == (2, 4, 8, 12)
    assert fast.engine.describe()["backend"] == "onnxruntime"
    assert [record.kind for record in fast.last_trace].count("pruned") == 8


def test_a_scheduler_set_on_a_loaded_bundle_is_the_one_its_calls_run(onnx_builds: dict[str, Path]) -> None:
    """`loaded.scheduler = X` was set on the EnginePipeline wrapper, where no call reads it: a PNDM scheduler (more
    timesteps than steps) ran unrefused. It reaches the pipeline (refused by name now); the wrapper's own stay its own."""
    import diffusers

    fast = catrt.load(onnx_builds["tiny-pixart"])
    fast.set_progress_bar_config(disable=True)
    fast.scheduler = diffusers.PNDMScheduler.from_config(fast.scheduler.config, skip_prk_steps=True)
    assert fast.pipe.scheduler is fast.scheduler and "scheduler" not in vars(fast) and "scheduler" not in vars(fast.accelerated)
    with pytest.raises(ConfigError, match="PNDMScheduler set 13 timesteps for 12 steps") as error:
        fast(["a cat", "a dog"], output_type="latent")
    assert error.value.field == "scheduler"
    fast.engine = fast.engine  # an EnginePipeline attribute: set on it
    assert "engine" in vars(fast)


def test_a_loaded_bundles_trace_is_the_refused_calls_not_the_one_before(onnx_builds: dict[str, Path]) -> None:
    """The bundle's own refusals (an unbuilt alpha, another size) came before the accelerated pipeline's call, so
    `last_trace` still showed the call before's steps, as if the refused call had run them."""
    fast = catrt.load(onnx_builds["tiny-sd3"], catrt.CATConfig(alpha=0.3, t0=4, trace=True))
    fast.set_progress_bar_config(disable=True)
    fast(["a cat", "a dog"], output_type="latent")
    assert len(fast.last_trace) == SIZE["steps"]  # precondition: a trace to be left behind
    with pytest.raises(ConfigError, match="this engine was built for alpha in 0.3, not alpha=0.5"):
        fast(["a cat", "a dog"], output_type="latent", alpha=0.5)
    assert fast.last_trace == []


def test_a_config_set_on_a_loaded_bundle_is_held_to_the_build_as_loads_is(onnx_builds: dict[str, Path]) -> None:
    """`loaded.config = ...` reaches the accelerated pipeline's run config, so it is checked as `load(config=...)` is:
    a t0 the engine was not built for ran unrefused; a dict is refused naming config. `del loaded.x` removes the `x`
    that `loaded.x = ...` set on the pipeline (it raised AttributeError)."""
    fast = catrt.load(onnx_builds["tiny-sd3"])
    with pytest.raises(ConfigError, match=r"this engine was built for t0=4, the config asks for t0=2") as error:
        fast.config = catrt.CATConfig(alpha=0.3, t0=2)
    assert error.value.field == "t0" and fast.accelerated.config.t0 == 4
    with pytest.raises(ConfigError, match="config must be a catrt.CATConfig, got dict") as error:
        fast.config = {"alpha": 0.3, "t0": 4}
    assert error.value.field == "config"
    fast.config = catrt.CATConfig(alpha=0.3, t0=4, trace=True)
    assert fast.accelerated.config.trace and "config" not in vars(fast)
    fast.marker = 1
    del fast.marker
    assert not hasattr(fast.pipe, "marker")


def test_fractional_timesteps_are_refused_by_a_build_of_whole_ones(onnx_builds: dict[str, Path]) -> None:
    """The PixArt build's graphs take int64 timesteps (its DPM-Solver's); an Euler scheduler swapped in gives fractional
    ones, which the engine cast to int64 and ran silently truncated. DDIM's whole timesteps still run."""
    import diffusers

    fast = catrt.load(onnx_builds["tiny-pixart"])
    fast.set_progress_bar_config(disable=True)
    own = fast.scheduler.config
    fast.scheduler = diffusers.EulerDiscreteScheduler.from_config(own)
    with pytest.raises(ConfigError, match="input 'timestep' is float32 but the engine was built for int64 .* the cast would "
                       "drop its fractions") as error:
        fast(["a cat", "a dog"], output_type="latent")
    assert error.value.field == "timestep"
    fast.scheduler = diffusers.DDIMScheduler.from_config(own)
    assert fast(["a cat", "a dog"], output_type="latent").images.isfinite().all()
    # Whole float32 timesteps (Euler's trailing spacing) cast exactly: they run (the dtype alone refused them).
    fast.scheduler = diffusers.EulerDiscreteScheduler.from_config(own, timestep_spacing="trailing")
    assert fast(["a cat", "a dog"], output_type="latent").images.isfinite().all()


def test_an_eager_bundle_runs_fractional_timesteps_as_the_accelerated_pipeline(tmp_path: Path) -> None:
    """The timestep-dtype refusal is the graph backends' (README): an eager bundle runs the adapter, which takes an
    Euler scheduler's fractional timesteps on a PixArt build of DPM-Solver's whole ones, and draws what the
    accelerated pipeline draws with that scheduler."""
    import diffusers

    fast = catrt.load(_build(_config("tiny-pixart", backend="eager"), tmp_path))
    fast.set_progress_bar_config(disable=True)
    fast.scheduler = diffusers.EulerDiscreteScheduler.from_config(fast.scheduler.config)
    got = fast(**call_kwargs(fast.accelerated.pipe)).images
    expected = catrt.accelerate(fast.accelerated.pipe, fast.config)(**call_kwargs(fast.accelerated.pipe)).images
    assert fast.scheduler.timesteps.frac().abs().max() > 0  # the call ran fractional timesteps
    assert _relative_error(got, expected) < GENERATION_TOLERANCE


@pytest.mark.parametrize("value", [0.5, float("nan"), float("inf")])
def test_a_float_for_an_integer_graph_input_is_cast_only_where_whole(value: float) -> None:
    """GraphSpec.prepare casts whole floats to an integer input exactly; a fraction, NaN or infinity is refused naming
    the input (the cast would drop or garble it)."""
    spec = GraphSpec(inputs=(TensorSpec("timestep", (2,), "int64"),), outputs=())
    prepared = spec.prepare({"timestep": torch.tensor([999.0, 916.0])})["timestep"]
    assert prepared.dtype == torch.int64 and prepared.tolist() == [999, 916]
    assert spec.prepare({"timestep": torch.tensor([999, 916], dtype=torch.int32)})["timestep"].tolist() == [999, 916]
    with pytest.raises(ConfigError, match="input 'timestep' is float32 but the engine was built for int64") as error:
        spec.prepare({"timestep": torch.tensor([999.0, value])})
    assert error.value.field == "timestep"


def test_alpha_one_build_matches_the_unpruned_pipeline(tmp_path: Path, tiny_pipelines: dict[str, Any]) -> None:
    fast = catrt.load(_build(_config("tiny-sd3.5", alphas=(1.0,)), tmp_path))
    fast.set_progress_bar_config(disable=True)
    pipe = tiny_pipelines["tiny-sd3.5"]
    expected = pipe(**call_kwargs(pipe)).images
    assert _relative_error(fast(**call_kwargs(pipe)).images, expected) < GENERATION_TOLERANCE


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd3.5", "tiny-pixart"])  # the three: joint, dual-attention, PixArt blocks
def test_compile_build_matches_eager_runtime(name: str, tmp_path: Path, tiny_pipelines: dict[str, Any]) -> None:
    folder = _build(_config(name, backend="compile"), tmp_path)
    assert sorted(read_manifest(folder).files) == []  # compile runs the pipeline's own weights
    fast = catrt.load(folder)
    fast.set_progress_bar_config(disable=True)
    assert fast.engine.describe()["backend"] == "compile"
    pipe = tiny_pipelines[name]
    expected = catrt.accelerate(pipe, _config(name).cat_config())(**call_kwargs(pipe)).images
    assert _relative_error(fast(**call_kwargs(pipe)).images, expected) < GENERATION_TOLERANCE


@pytest.mark.skipif(TRT_SKIP is not None, reason=f"TensorRT test needs a GPU and tensorrt: {TRT_SKIP}")
def test_tensorrt_build_matches_eager_runtime(tmp_path: Path) -> None:
    folder = _build(_config("tiny-sd3", backend="tensorrt"), tmp_path)
    assert {"full.plan", "pruned.plan"} <= set(read_manifest(folder).files)
    fast = catrt.load(folder)
    pipe = fast.pipe
    expected = catrt.accelerate(pipe, _config("tiny-sd3").cat_config())(**call_kwargs(pipe)).images
    assert _relative_error(fast(**call_kwargs(pipe)).images, expected) < 1e-2


def _matmul_gather_bundle(folder: Path) -> tuple[Any, Any]:
    """Two graphs y = gather(x @ w, idx, axis=1) naming one float weight w differently, with an int64 index constant,
    moved into weights.bin by the export's SharedWeights; returns (w, idx)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from catrt.export.weights import SharedWeights

    weight = np.arange(16 * 64, dtype=np.float32).reshape(16, 64) / 1000
    index = (np.arange(128, dtype=np.int64) * 7) % 64  # 1024 bytes: external, as the export stores it
    models = {}
    with SharedWeights(folder) as weights:
        for graph, name in (("full", "w"), ("pruned-k8", "w_in_pruned")):
            nodes = [helper.make_node("MatMul", ["x", name], ["h"]), helper.make_node("Gather", ["h", "idx"], ["y"], axis=1)]
            body = helper.make_graph(
                nodes, graph, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 128])],
                [numpy_helper.from_array(weight, name), numpy_helper.from_array(index, "idx")],
            )
            models[graph] = helper.make_model(body, opset_imports=[helper.make_opsetid("", 18)])
            weights.move_out(graph, models[graph])
        weights.save(models)
    return weight, index


def _host_copy(array: Any) -> tuple[torch.Tensor, Any]:
    """shared_weights.to_device's stand-in: a torch-owned copy and its DLPack capsule, in host memory."""
    tensor = torch.tensor(array)
    return tensor, tensor.__dlpack__()


class _Options:
    """SessionOptions as our glue uses them, the values added kept by name."""

    def __init__(self) -> None:
        import onnxruntime

        self.options = onnxruntime.SessionOptions()
        self.added: dict[str, Any] = {}

    def add_initializer(self, name: str, value: Any) -> None:
        self.options.add_initializer(name, value)  # ONNX Runtime's own check of the value
        self.added[name] = value


def test_cuda_provider_gets_each_floating_point_weight_as_one_torch_owned_value_and_integers_on_the_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA weights were made by OrtValue.ortvalue_from_numpy(array, "cuda", i): ONNX Runtime allocates and owns
    that value, and add_initializer refuses any value it owns ("Buffer containing the initializer must be owned by the
    user"), so no CUDA session could load. Our glue only, with ONNX Runtime's real add_initializer and sessions: this
    CPU build cannot place memory on a GPU, so a stand-in for the one copy to the GPU (shared_weights.to_device)
    returns a CPU tensor, of twice the weights, to show the sessions compute with the tensor handed to them."""
    import numpy as np
    import onnxruntime

    from catrt.engines import shared_weights

    weight, index = _matmul_gather_bundle(tmp_path)
    copies: list[tuple[tuple[int, ...], torch.device]] = []

    def to_device(array: Any, device: torch.device) -> tuple[torch.Tensor, Any]:
        copies.append((array.shape, device))
        return _host_copy(array * 2)

    monkeypatch.setattr(shared_weights, "to_device", to_device)
    shared = shared_weights.SharedInitializers(tmp_path, torch.device("cuda", 1))
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    added = {}
    for graph in ("full", "pruned-k8"):
        options = _Options()
        shared.add_to(options, tmp_path / f"{graph}.onnx")
        added[graph] = options.added
        session = onnxruntime.InferenceSession(str(tmp_path / f"{graph}.onnx"), options.options, providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"x": x})[0], (x @ (2 * weight))[:, index], rtol=1e-6)
    assert copies == [((16, 64), torch.device("cuda", 1))]  # one copy of the weight, on the engine's GPU
    assert added["pruned-k8"]["w_in_pruned"] is added["full"]["w"]  # one value, handed to both sessions
    assert added["full"]["idx"].device_name() == "cpu"  # integer constants stay on the host


def test_cuda_provider_without_from_dlpack_leaves_the_weights_to_each_session_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An ONNX Runtime older than 1.21 has no OrtValue.from_dlpack in its inference build: the float weights are not
    shared (each session reads weights.bin), named in a warning, instead of failing the load. Our glue only."""
    import numpy as np
    import onnxruntime
    from onnxruntime.capi import _pybind_state

    from catrt.engines import shared_weights

    weight, index = _matmul_gather_bundle(tmp_path)
    monkeypatch.delattr(_pybind_state.OrtValue, "from_dlpack")
    monkeypatch.setattr(shared_weights, "to_device", lambda array, device: pytest.fail("no GPU copy to share"))
    with caplog.at_level(logging.WARNING, logger="catrt.engines.shared_weights"):
        shared = shared_weights.SharedInitializers(tmp_path, torch.device("cuda", 0))
    assert "has no OrtValue.from_dlpack (1.21 and later have it)" in caplog.text
    options = _Options()
    shared.add_to(options, tmp_path / "full.onnx")
    assert set(options.added) == {"idx"}
    session = onnxruntime.InferenceSession(str(tmp_path / "full.onnx"), options.options, providers=["CPUExecutionProvider"])
    x = np.ones((2, 16), dtype=np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], (x @ weight)[:, index], rtol=1e-6)


def _cuda_stand_ins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, current_device: int, started_cuda: bool = True
) -> tuple[list[Any], GraphSpec]:
    """A one-graph bundle in `tmp_path` and stand-ins for a CUDA machine: torch's current GPU, the copy to it, and
    InferenceSession, which records the providers each session is asked for (the list returned) and opens a real CPU
    session that reports the CUDA provider started (`started_cuda`) or, as ONNX Runtime's fallback, the CPU one alone."""
    import onnxruntime

    from catrt.engines import shared_weights

    _matmul_gather_bundle(tmp_path)
    (tmp_path / "pruned-k8.onnx").unlink()
    asked: list[Any] = []
    session_class = onnxruntime.InferenceSession

    def session(path: str, options: Any, providers: list[Any]) -> Any:
        asked.append(providers)
        opened = session_class(path, options, providers=["CPUExecutionProvider"])
        if started_cuda:
            monkeypatch.setattr(opened, "get_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
        return opened

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current_device)
    monkeypatch.setattr(shared_weights, "to_device", lambda array, device: _host_copy(array))
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    return asked, GraphSpec((TensorSpec("x", (2, 16), "float32"),), (TensorSpec("y", (2, 128), "float32"),))


@pytest.mark.parametrize("tf32", [False, True])
def test_cuda_provider_runs_on_the_engines_gpu_with_torchs_tf32_setting(
        tf32: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA provider was given no options: it ran on GPU 0 whatever GPU torch's tensors and the shared weights were
    on (torch.device("cuda") is torch's current GPU), and with TF32 on (its default), where torch's fp32 matmuls, and
    the eager model an fp32 build is verified against, have it off. Our glue only: stand-ins for torch's current GPU,
    the copy to it, and InferenceSession (which records its providers and opens a CPU session)."""
    from catrt.engines.onnxruntime import OnnxRuntimeEngine

    asked, spec = _cuda_stand_ins(tmp_path, monkeypatch, current_device=1)
    engine = OnnxRuntimeEngine(tmp_path, {"full": spec}, torch.device("cuda"))
    before, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, tf32  # a flag monkeypatch cannot restore
    try:
        engine.load()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert engine.device == torch.device("cuda", 1)
    assert asked == [[("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "1" if tf32 else "0"}), "CPUExecutionProvider"]]


@pytest.mark.parametrize(("owner", "value", "tf32"), [
    (torch.backends.cuda.matmul, "tf32", True), (torch.backends, "tf32", True), (torch.backends.cuda.matmul, "ieee", False),
], ids=["matmul-tf32", "global-tf32", "matmul-ieee"])
def test_cuda_provider_follows_tf32_set_with_torchs_new_precision_settings(
        owner: Any, value: str, tf32: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.9's `fp32_precision` settings are how its docs now turn TF32 on; after them, reading the legacy
    `allow_tf32` (as `cuda_options` did) raises a RuntimeError ("mix of the legacy and new APIs"), so such a user's
    CUDA bundle failed to load with a traceback. Our glue only, with the stand-ins of the test above."""
    from catrt.engines.onnxruntime import OnnxRuntimeEngine

    if not hasattr(owner, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision settings (before 2.9)")
    asked, spec = _cuda_stand_ins(tmp_path, monkeypatch, current_device=0)
    owner.fp32_precision = value  # a setting monkeypatch cannot restore; "none" gives the legacy flags back
    try:
        OnnxRuntimeEngine(tmp_path, {"full": spec}, torch.device("cuda")).load()
    finally:
        owner.fp32_precision = "none"
    assert [providers[0] for providers in asked] == [("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "1" if tf32 else "0"})]


def test_cuda_provider_that_onnx_runtime_cannot_start_is_refused_at_load_naming_the_cause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where onnxruntime-gpu cannot start its CUDA provider (cuDNN missing, say) it logs why and opens the session on the
    CPU provider alone; the GPU tensors bound to it then failed at the first run with no word of the cause. Our glue
    only: stand-ins for torch's current GPU, the copy to it, and InferenceSession (a real CPU session, as ONNX
    Runtime's fallback opens)."""
    from catrt.engines.onnxruntime import OnnxRuntimeEngine

    _, spec = _cuda_stand_ins(tmp_path, monkeypatch, current_device=0, started_cuda=False)
    with pytest.raises(EngineMismatchError, match=r"could not start its CUDA provider for the 'full' graph \(its log above "
                       r"says why: .*\) and would run it on CPUExecutionProvider; install the CUDA and cuDNN") as caught:
        OnnxRuntimeEngine(tmp_path, {"full": spec}, torch.device("cuda")).load()
    assert caught.value.field == "backend"


def test_cuda_provider_runs_after_torchs_stream_and_keeps_onnx_runtimes_end_of_run_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime's CUDA provider runs on streams of its own that wait for nothing of torch's: torch's stream must be
    finished before the run (its writes of the inputs, its reads of the buffers the run overwrites), and the run must
    keep ONNX Runtime's default end-of-run sync (no run options), since torch reads the outputs and frees the inputs right
    after. Our glue only: stand-ins for torch's current stream and the session (CPU tensors bound as the engine's)."""
    import numpy as np

    from catrt.engines.onnxruntime import OnnxRuntimeEngine

    calls: list[Any] = []

    class Binding:
        def bind_input(self, *args: Any) -> None:
            calls.append(("bind_input", *args[:5]))

        def bind_output(self, *args: Any) -> None:
            calls.append(("bind_output", *args[:5]))

    class Session:
        def io_binding(self) -> Binding:
            return Binding()

        def run_with_iobinding(self, binding: Binding, *run_options: Any) -> None:
            calls.append(("run", *run_options))

    class Stream:
        cuda_stream = 0

        def synchronize(self) -> None:
            calls.append(("synchronize",))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: calls.append(("stream", device)) or Stream())
    spec = GraphSpec((TensorSpec("x", (2, 16), "float32"),), (TensorSpec("y", (2, 128), "float32"),))
    engine = OnnxRuntimeEngine(Path("unused"), {"full": spec}, torch.device("cuda", 1))
    engine.sessions, engine.input_names = {"full": Session()}, {"full": {"x"}}
    x, y = torch.zeros(2, 16), torch.zeros(2, 128)
    assert engine.run("full", {"x": x}, out={"y": y}) == {"y": y}
    assert calls == [
        ("bind_input", "x", "cpu", 0, np.float32, [2, 16]), ("bind_output", "y", "cpu", 0, np.float32, [2, 128]),
        ("stream", torch.device("cuda", 1)), ("synchronize",), ("run",),
    ]


def test_cuda_provider_engine_released_marks_its_outputs_used_on_torchs_streams_and_refuses_to_run_after(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime's runs are done when they return, but torch reads the outputs afterwards on its current stream: an
    output buffer let go at release went back to the pool of the stream it was allocated on, reusable there at once
    whatever another stream still read. Released, each engine-owned output is marked used on every stream torch read
    it on (record_stream), the sessions are let go before the weights they were given, and a run after is refused.
    Our glue only: stand-ins for torch's streams and the session."""
    from catrt.engines.onnxruntime import OnnxRuntimeEngine
    from catrt.errors import EngineRuntimeError

    class Binding:
        def bind_input(self, *args: Any) -> None:
            pass

        bind_output = bind_input

    class Session:
        def io_binding(self) -> Binding:
            return Binding()

        def run_with_iobinding(self, binding: Binding) -> None:
            pass

    class Stream:
        def __init__(self, handle: int) -> None:
            self.cuda_stream = handle

        def synchronize(self) -> None:
            pass

    current = [Stream(0)]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: current[0])
    spec = GraphSpec((TensorSpec("x", (2, 16), "float32"),), (TensorSpec("y", (2, 128), "float32"),))
    engine = OnnxRuntimeEngine(Path("unused"), {"full": spec}, torch.device("cuda", 0))
    engine.sessions, engine.input_names, engine.initializers = {"full": Session()}, {"full": {"x"}}, "the weights"
    engine._buffers["full"] = {"y": torch.zeros(2, 128)}  # its output buffer (on the GPU, made at the first run)
    recorded: list[tuple[torch.Tensor, int]] = []
    engine._record_use = lambda tensor, stream: recorded.append((tensor, stream.cuda_stream))  # type: ignore[method-assign]
    y = engine.run("full", {"x": torch.zeros(2, 16)})["y"]
    assert y is engine._buffers["full"]["y"]
    current[0] = Stream(0x51DE)
    assert engine.run("full", {"x": torch.zeros(2, 16)})["y"] is y
    engine.run("full", {"x": torch.zeros(2, 16)}, out={"y": torch.zeros(2, 128)})  # the caller's tensor: not the engine's
    assert recorded == []
    engine.close()
    assert [(tensor is y, handle) for tensor, handle in recorded] == [(True, 0), (True, 0x51DE)]
    assert engine.sessions == {} and engine.initializers is None and engine._buffers == {}
    with pytest.raises(EngineRuntimeError, match=r"^this onnxruntime engine of unused was closed; load the bundle again") as caught:
        engine.run("full", {"x": torch.zeros(2, 16)})
    assert caught.value.field == "engine"


def test_two_graphs_reading_one_offset_as_other_shapes_each_get_their_own(tmp_path: Path) -> None:
    """The shared values were keyed by offset alone: a graph reading those bytes as another shape or dtype (its own
    placement, which integrity checks graph by graph) was handed the value made for the first graph."""
    import numpy as np

    from catrt.engines.shared_weights import SharedInitializers

    (tmp_path / "weights.bin").write_bytes(np.arange(8, dtype=np.float32).tobytes())
    table = {"full": [{"name": "w", "offset": 0, "length": 32, "dtype": "float", "shape": [2, 4]}],
             "pruned-k8": [{"name": "w", "offset": 0, "length": 32, "dtype": "float", "shape": [4, 2]}],
             "context": [{"name": "i", "offset": 0, "length": 32, "dtype": "int64", "shape": [4]}]}
    (tmp_path / "initializers.json").write_text(json.dumps(table))

    class Options:
        def __init__(self) -> None:
            self.added: dict[str, Any] = {}

        def add_initializer(self, name: str, value: Any) -> None:
            self.added[name] = value

    shared = SharedInitializers(tmp_path)
    placed = {}
    for graph in table:
        options = Options()
        shared.add_to(options, tmp_path / f"{graph}.onnx")
        (value,) = options.added.values()
        placed[graph] = (value.shape(), value.data_type())
    assert placed == {"full": ([2, 4], "tensor(float)"), "pruned-k8": ([4, 2], "tensor(float)"), "context": ([4], "tensor(int64)")}


def test_an_onnx_export_holds_one_graphs_weights_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every exported graph kept its weights inline until the last was exported: (2 + alphas) copies of the
    transformer in memory at once (64 GB for a two-alpha build of a 16 GB transformer). Each graph's weights now go
    into weights.bin as soon as it is exported. Stand-in exports: the exporter is not what is tested."""
    import numpy as np
    from onnx import helper, numpy_helper

    import catrt.export.onnx_export as onnx_export
    from catrt.export.weights import INLINE_BYTES

    exported: list[onnx.ModelProto] = []

    def export(module: Any, inputs: Any, output_names: Any) -> tuple[onnx.ModelProto, str]:
        held = [len(tensor.raw_data) for model in exported for tensor in model.graph.initializer]
        assert max(held, default=0) < INLINE_BYTES, "an earlier graph still holds its weights"
        weight = numpy_helper.from_array(np.full((64, 64), len(exported), dtype=np.float32), "w")
        io = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, 64]) for name in ("x", "y")]
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "step", io[:1], io[1:], [weight])
        exported.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
        return exported[-1], "dynamo"

    monkeypatch.setattr(onnx_export, "export_onnx", export)
    monkeypatch.setattr(onnx_export, "step_module", lambda *args: None)
    graphs = {graph: {"hidden_states": torch.zeros(1, 4)} for graph in ("context", "full", "pruned-k8")}
    assert onnx_export.export_graphs(None, graphs, graphs, tmp_path, progress=False) == dict.fromkeys(graphs, "dynamo")
    assert (tmp_path / "weights.bin").stat().st_size == 3 * 64 * 64 * 4  # three distinct weights, each stored once
    assert sorted(json.loads((tmp_path / "initializers.json").read_text())) == sorted(graphs)


# -- failed builds -----------------------------------------------------------------------------


def test_build_over_tolerance_fails_and_keeps_the_previous_build(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, tiny_pipelines: dict[str, Any]) -> None:
    root = bundle_copy.parent
    (root / "engines").mkdir()
    previous = Path(shutil.move(bundle_copy, root / "engines" / bundle_copy.name))
    before = {path.name: file_digest(path) for path in previous.iterdir()}
    monkeypatch.setitem(build_module.TOLERANCES, "fp32", 0.0)  # every engine now "fails" its accuracy check

    with pytest.raises(BuildError, match=r"differs from the eager adapter .* over the fp32 tolerance 0; the build was not published"):
        _build(_config("tiny-sd3"), root)

    assert {path.name: file_digest(path) for path in previous.iterdir()} == before
    assert [path.name for path in (root / "engines").iterdir()] == [previous.name]  # no temporary folder left
    fast = catrt.load(previous)
    fast.set_progress_bar_config(disable=True)
    assert fast(**call_kwargs(tiny_pipelines["tiny-sd3"])).images.shape == (2, 16, 8, 12)


@pytest.mark.parametrize("failure", ["engine", "disk-full"])
def test_an_engine_step_that_fails_keeps_its_export_to_inspect_and_names_the_engine_folder(
    failure: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine is written from the build's own staged export, published after: an engine step that fails (TensorRT
    could not parse a graph) still publishes the export it read, as when it was published before that step, and a write
    the disk refused into the engine folder is named as that folder's, not the export's."""
    import errno
    import os

    def refused(onnx_dir: Path, engine_dir: Path, *args: Any) -> None:
        assert (onnx_dir / "full.onnx").is_file() and onnx_dir.name.startswith(".")  # the build's own export
        if failure == "engine":
            raise BuildError("TensorRT could not parse the 'full' graph's full.onnx: stand-in", field="full.onnx")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(engine_dir / "full.onnx"))

    def exported(adapter: Any, inputs: Any, outputs: Any, folder: Path, **kwargs: Any) -> dict[str, str]:
        (folder / "full.onnx").write_bytes(b"a stand-in graph")
        return {}

    monkeypatch.setattr(build_module, "export_graphs", exported)
    monkeypatch.setitem(BACKEND_BUILDS, "onnxruntime", type(BACKEND_BUILDS["onnxruntime"])(needs_onnx=True, write_engine=refused))
    config = _config("tiny-sd3", batch=1, height=32, width=48, steps=6, t0=3, max_sequence_length=8)
    name, engines = config.resolved(backend="onnxruntime").build_name(), tmp_path / "engines"
    with pytest.raises(BuildError) as caught:
        _build(config, tmp_path)
    if failure == "engine":
        assert str(caught.value).startswith("TensorRT could not parse the 'full' graph's full.onnx")
    else:
        assert str(caught.value).startswith(f"could not write the files of {engines / name} (No space left on device); "
                                            "nothing was published there")
    assert sorted(path.name for path in (tmp_path / "export").iterdir()) == [name]
    assert (tmp_path / "export" / name / "full.onnx").read_bytes() == b"a stand-in graph"
    assert not engines.exists()  # no bundle, no staging folder, and not the folder the build made


def test_an_engine_giving_nan_fails_its_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN compares false with any tolerance: the build used to publish a bundle whose manifest could not load."""
    eager_run = ENGINES["eager"].run

    def overflowing(self: Any, graph: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        outputs = eager_run(self, graph, *args, **kwargs)
        if graph == "full":
            outputs["tokens"][0, 0, 0] = float("nan")
        return outputs

    monkeypatch.setattr(ENGINES["eager"], "run", overflowing)
    with pytest.raises(BuildError, match=r"the eager engine's full\.tokens differs from the eager adapter by nan \(relative\), over "
                                         r"the fp32 tolerance 0\.001; the build was not published") as caught:
        _build(_config("tiny-sd3", backend="eager"), tmp_path)
    assert caught.value.field == "full.tokens"
    assert list(tmp_path.iterdir()) == []  # no bundle, no export, and not the folders the build made


def test_interrupted_build_keeps_the_previous_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = _build(_config("tiny-sd3", backend="eager"), tmp_path)
    before = (previous / MANIFEST_FILE).read_text()

    def killed(*args: Any) -> None:
        raise KeyboardInterrupt  # as a SIGINT between the engine files and the manifest

    monkeypatch.setattr(build_module, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        _build(_config("tiny-sd3", backend="eager"), tmp_path)

    assert (previous / MANIFEST_FILE).read_text() == before
    assert [path.name for path in previous.parent.iterdir()] == [previous.name]
    assert catrt.load(previous).build == _config("tiny-sd3", backend="eager")


# -- loading checks ----------------------------------------------------------------------------


def test_missing_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / "pruned-k8.onnx").unlink()
    with pytest.raises(CorruptBundleError, match=r"engine file pruned-k8\.onnx is missing") as caught:
        catrt.load(bundle_copy)
    assert caught.value.field == "pruned-k8.onnx"


def test_corrupt_file_is_named(bundle_copy: Path) -> None:
    with open(bundle_copy / "weights.bin", "r+b") as stream:
        stream.seek(100)
        byte = stream.read(1)
        stream.seek(100)
        stream.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptBundleError, match=r"engine file weights\.bin .* does not match its manifest sha256") as caught:
        catrt.load(bundle_copy)
    assert caught.value.field == "weights.bin"


def _flip_in_place(path: Path) -> None:
    """Change one byte of `path` in the middle, writing into the file itself (same inode, same size)."""
    with open(path, "r+b") as stream:
        stream.seek(path.stat().st_size // 2)
        byte = stream.read(1)
        stream.seek(-1, 1)
        stream.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("name", ["weights.bin", "initializers.json", "full.onnx"])
def test_an_onnx_bundle_file_written_after_the_check_is_refused_as_it_is_read(
        bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """catrt.load checked the files, then catrt memory-mapped weights.bin for ONNX Runtime and read initializers.json,
    and ONNX Runtime read the graphs by path: a file written in place between the check and those reads ran unchecked.
    Each is now read by catrt and verified as read against the checked manifest."""
    from catrt.engines.onnxruntime import OnnxRuntimeEngine

    load = OnnxRuntimeEngine.load

    def load_after_a_write(engine: OnnxRuntimeEngine) -> None:
        _flip_in_place(engine.folder / name)
        load(engine)

    monkeypatch.setattr(OnnxRuntimeEngine, "load", load_after_a_write)
    with pytest.raises(CorruptBundleError, match=rf"^engine file {re.escape(name)} in .* changed after the bundle's files "
                       r"were checked: the bytes read do not match its manifest sha256 and size") as caught:
        catrt.load(bundle_copy)
    assert caught.value.field == name


def _replace_with_a_copy(path: Path) -> None:
    """Put a copy of `path`, the same bytes, in its place (another inode, as a rename of a new file does)."""
    copy = path.with_name(path.name + ".copy")
    shutil.copyfile(path, copy)
    copy.replace(path)


@pytest.mark.parametrize("write", [_flip_in_place, _replace_with_a_copy], ids=["written-in-place", "replaced"])
@pytest.mark.parametrize("target", ["weights.bin", "the graph read"])
def test_a_file_written_while_onnx_runtime_reads_it_is_refused_once_the_sessions_are_made(
        bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, write: Callable[[Path], None], target: str) -> None:
    """ONNX Runtime reads each graph by its path, and from weights.bin the weights its graph optimizations fold
    (tiny-sd3: a Reshape of the positional table), as the sessions are made: a write then ran unchecked. Each must be
    the file catrt hashed, unwritten (same inode and change time), once the sessions are made; a copy of the same bytes
    is refused too, as what ONNX Runtime read in between cannot be told."""
    import onnxruntime

    session_class, written = onnxruntime.InferenceSession, []

    def session_after_a_write(model: str, options: Any, providers: Any) -> Any:
        if not written:
            written.append(bundle_copy / "weights.bin" if target == "weights.bin" else Path(model))
            write(written[0])
        return session_class(model, options, providers=providers)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session_after_a_write)
    with pytest.raises(CorruptBundleError, match=r"^engine file \S+ in .* was written or replaced while ONNX Runtime "
                       r"read it \(its inode or change time is not what it was when catrt read and checked it\)") as caught:
        catrt.load(bundle_copy)
    assert caught.value.field == written[0].name


def test_a_loaded_bundle_dropped_closes_its_engine(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle loaded again or a pipeline let go drops its engine: it is closed then (its device work waited for, its
    buffers handed back), once, and nothing keeps it alive."""
    import gc
    import weakref

    from catrt.engines.onnxruntime import OnnxRuntimeEngine

    gc.collect()  # engines earlier tests left in reference cycles are closed before this one is watched
    closed: list[str] = []
    close = OnnxRuntimeEngine.close
    monkeypatch.setattr(OnnxRuntimeEngine, "close", lambda engine: closed.append(str(engine.folder)) or close(engine))
    fast = catrt.load(bundle_copy)
    fast.set_progress_bar_config(disable=True)
    fast(**call_kwargs(fast.accelerated.pipe))
    engine = weakref.ref(fast.engine)
    del fast
    gc.collect()
    assert engine() is None and [folder for folder in closed if folder == str(bundle_copy)] == [str(bundle_copy)]


def test_weights_written_after_an_onnx_bundle_loaded_change_nothing(bundle_copy: Path) -> None:
    """weights.bin was memory-mapped and its pages used by ONNX Runtime as they were at each run: a file written in place
    changed what a loaded engine computed. The sessions now use the bytes read and verified at load."""
    fast = catrt.load(bundle_copy)
    fast.set_progress_bar_config(disable=True)
    pipe = fast.accelerated.pipe
    before = fast(**call_kwargs(pipe)).images
    path = bundle_copy / "weights.bin"
    with open(path, "r+b") as stream:
        stream.write(b"\xff" * path.stat().st_size)  # NaN in every float, as the file's pages
    assert torch.equal(fast(**call_kwargs(pipe)).images, before)


def test_missing_manifest_is_named(bundle_copy: Path) -> None:
    (bundle_copy / MANIFEST_FILE).unlink()
    with pytest.raises(CorruptBundleError, match=r"manifest\.json is missing: .* is not a catrt engine folder"):
        catrt.load(bundle_copy)


@pytest.mark.parametrize(
    ("field", "edit", "message"),
    [
        ("versions.catrt", lambda m: m["versions"].update(catrt="0.0.1"), r"built with catrt 0\.0\.1 but catrt \S+ is installed"),
        ("versions.onnxruntime", lambda m: m["versions"].update(onnxruntime="1.0.0"), r"built with onnxruntime 1\.0\.0 but onnxruntime \S+ is installed"),
        ("device.kind", lambda m: m.update(device={"kind": "cuda", "name": "NVIDIA H100", "compute_capability": "9.0"}), r"built for device kind 'cuda' but this machine has 'cpu'"),
        ("device.kind", lambda m: m.update(device={"kind": "mps"}), r"built for device kind 'mps' but this machine has 'cpu'"),
        ("model.transformer_config", lambda m: m["model"]["transformer_config"].update(num_layers=7), r"another transformer config than the engine was built from"),
        ("model.transformer_class", lambda m: m["model"].update(transformer_class="FluxTransformer2DModel"), r"another transformer class than"),
        # A class no text-length rule knows: only the loaded pipeline tells.
        ("model.pipeline_class", lambda m: m["model"].update(pipeline_class="OtherPipeline"),
         r"model 'tiny-sd3' now has another pipeline class than the engine was built from \(pipeline_class in its manifest\)"),
    ],
)
def test_mismatch_is_named(bundle_copy: Path, field: str, edit: Callable[[dict[str, Any]], None], message: str) -> None:
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(EngineMismatchError, match=message) as caught:
        catrt.load(bundle_copy)
    assert caught.value.field == field


def test_catrt_run_from_a_checkout_records_and_checks_its_own_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from PYTHONPATH (the lent GPU machine's way) catrt has no install metadata: a build recorded no catrt
    version, and an installed catrt of the same version refused the bundle. Its version is the running code's."""
    installed = importlib.metadata.version

    def checkout(package: str) -> str:
        if package == "catrt":
            raise importlib.metadata.PackageNotFoundError(package)
        return installed(package)

    monkeypatch.setattr(importlib.metadata, "version", checkout)
    assert package_versions()["catrt"] == catrt.__version__
    manifest = SimpleNamespace(versions={"catrt": catrt.__version__}, device={})
    assert environment_problems(manifest, None, {}, ()) == []  # what an installed catrt of this version built
    manifest.versions["catrt"] = "0.0.1"
    assert [problem.field for problem in environment_problems(manifest, None, {}, ())] == ["versions.catrt"]


def test_the_package_version_is_catrts_own() -> None:
    """pyproject's version (an install's metadata) is `catrt.__version__`, which builds record and loads check."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"$', pyproject, re.MULTILINE).group(1) == catrt.__version__


@pytest.mark.parametrize(
    ("field", "overrides", "message"),
    [
        ("height", {"height": 128}, r"built for height=64, the call asks for height=128"),
        ("width", {"width": 64}, r"built for width=96, the call asks for width=64"),
        ("num_inference_steps", {"num_inference_steps": 20}, r"built for num_inference_steps=12, the call asks for num_inference_steps=20"),
        ("sigmas", {"sigmas": [1.0 - i / 10 for i in range(10)]}, r"built for 12 steps, the call's sigmas give 10; pass 12 sigmas"),
        ("max_sequence_length", {"max_sequence_length": 32}, r"built for max_sequence_length=16"),
        ("batch", {"prompt": "one prompt"}, r"built for batch=2 images per call, the call asks for 1"),
        ("guidance_scale", {"guidance_scale": 1.0}, r"runs classifier-free guidance .* guidance_scale > 1"),
    ],
)
def test_request_the_build_cannot_serve_is_named(onnx_builds: dict[str, Path], tiny_pipelines: dict[str, Any], field: str, overrides: dict[str, Any], message: str) -> None:
    fast = catrt.load(onnx_builds["tiny-sd3"])
    with pytest.raises(ConfigError, match=message) as caught:
        fast(**call_kwargs(tiny_pipelines["tiny-sd3"], **overrides))
    assert caught.value.field == field


def test_config_with_other_alpha_is_refused(onnx_builds: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"built for alpha in 0\.3, not alpha=0\.5; use one of those") as caught:
        catrt.load(onnx_builds["tiny-sd3"], catrt.CATConfig(alpha=0.5, t0=4))
    assert caught.value.field == "alpha"


def test_engine_refuses_an_input_shape_it_was_not_built_for(onnx_builds: dict[str, Path]) -> None:
    engine = catrt.load(onnx_builds["tiny-sd3"]).engine
    context = {"encoder_hidden_states": torch.zeros(4, 93, 48), "pooled_projections": torch.zeros(4, 64), "positional_table": torch.zeros(1, 24, 32)}
    cache = torch.zeros(engine.graphs["full"].output("kv").shape)
    with pytest.raises(ConfigError, match=r"input 'hidden_states' has shape \(4, 16, 16, 12\) but the engine was built for \(4, 16, 8, 12\)"):
        engine.full_forward(torch.zeros(4, 16, 16, 12), torch.zeros(4), context, cache)
    with pytest.raises(ConfigError, match=r"input 'encoder_hidden_states' has shape \(4, 5, 48\) but the engine was built for \(4, 93, 48\)"):
        engine.prepare_context({"encoder_hidden_states": torch.zeros(4, 5, 48), "pooled_projections": torch.zeros(4, 64)}, (4, 16, 8, 12))


# -- configs and registries --------------------------------------------------------------------


def test_backend_registries_agree_and_auto_picks_onnxruntime_on_a_cpu() -> None:
    assert set(ENGINES) == set(BACKEND_BUILDS) == set(BACKENDS) - {"auto"}
    if not torch.cuda.is_available():
        assert resolve_backend("auto") == "onnxruntime"


def test_star_imports_of_the_engine_and_export_packages_work() -> None:
    import catrt.engines
    import catrt.export

    for package in (catrt.engines, catrt.export):
        missing = [name for name in package.__all__ if not hasattr(package, name)]
        assert missing == [], f"{package.__name__}.__all__ names {missing}, which it does not define"


@pytest.mark.skipif(TRT_SKIP is None, reason="TensorRT is available here")
def test_tensorrt_where_it_cannot_run_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"backend 'tensorrt' cannot run here: ") as caught:
        build_engines(_config("tiny-sd3", backend="tensorrt"), progress=False)
    assert caught.value.field == "backend"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"alphas": (0.0,)}, "alphas"), ({"alphas": ()}, "alphas"), ({"alphas": (0.3, 0.3)}, "alphas"), ({"t0": 12}, "t0"), ({"batch": 0}, "batch"), ({"precision": "int8"}, "precision"), ({"backend": "tvm"}, "backend")],
)
def test_build_config_is_validated(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _config("tiny-sd3", **overrides)
    assert caught.value.field == field


def test_build_config_takes_numpy_numbers_as_catconfig_does() -> None:
    import numpy as np

    config = BuildConfig("tiny-sd3", height=np.int64(64), width=np.int32(96), steps=np.int64(6), t0=np.int64(3),
                         alphas=(np.float32(0.3), 0.5), max_sequence_length=np.int64(16))
    assert config == BuildConfig("tiny-sd3", height=64, width=96, steps=6, t0=3, alphas=(0.3, 0.5), max_sequence_length=16)
    assert type(config.steps) is int and type(config.alphas[0]) is float and config.alphas[0] == 0.3
    with pytest.raises(ConfigError, match="BuildConfig.steps must be an integer from 1 to 1000, got True"):
        BuildConfig("tiny-sd3", steps=np.bool_(True))


def test_build_config_takes_a_single_alpha_as_alpha_or_one_number(tmp_path: Path) -> None:
    """The issue's build is "(model, ..., alpha -> k, ...)" and `catrt build --alpha 0.3`: `BuildConfig(model,
    alpha=0.3)` (a TypeError since BuildConfig took several) and `alphas=0.3`, or 0.3 in alphas' place, are one alpha;
    alpha with alphas, or alpha as a list, is refused naming alpha. The bundle's `k` is that alpha's."""
    one = BuildConfig("tiny-sd3", alpha=0.5, backend="eager", **SIZE)
    assert one == BuildConfig("tiny-sd3", alphas=(0.5,), backend="eager", **SIZE) == BuildConfig(
        "tiny-sd3", alphas=0.5, backend="eager", **SIZE)
    assert (one.alpha, one.alphas) == (0.5, (0.5,)) and "-a0.50-" in one.build_name()
    assert BuildConfig("tiny-sd3", 64, 96, 2, 12, 4, 0.3).alphas == (0.3,)  # alpha's place before alphas took it
    for wrong, message in [({"alpha": 0.3, "alphas": (0.3,)}, re.escape("BuildConfig takes alpha (one alpha) or alphas (several), not both")),
                           ({"alpha": (0.2, 0.3)}, r"BuildConfig.alpha must be one alpha in \(0, 1\] \(alphas=\(...\) takes several\), got \(0.2, 0.3\)"),
                           ({"alpha": 1.5}, r"CATConfig.alpha must be in \(0, 1\], got 1.5")]:
        with pytest.raises(ConfigError, match=message) as caught:
            BuildConfig("tiny-sd3", **wrong)
        assert caught.value.field == "alpha"
    folder = _build(one, tmp_path)
    assert read_manifest(folder).k == math.ceil(0.5 * 24)
    assert catrt.load(folder).alphas == (0.5,)


def test_build_engines_refuses_a_config_that_is_no_build_config_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"build_engines takes a catrt BuildConfig, got dict .*BuildConfig.from_dict") as caught:
        build_engines({"model": "tiny-sd3"}, out_dir=tmp_path / "out", export_dir=tmp_path / "export", progress=False)
    assert caught.value.field == "config" and not (tmp_path / "out").exists()


def test_a_build_of_more_alphas_than_the_runtime_keeps_graphs_of_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The runtime keeps the pruned graphs of MAX_KEPT_ALPHAS alphas per shape, and `catrt serve` refuses a bundle of
    more: the build refuses it first, where it was built (and each plan exported, verified) for nothing."""
    from catrt.checks import MAX_KEPT_ALPHAS

    alphas = [round(0.1 + 0.05 * i, 2) for i in range(MAX_KEPT_ALPHAS + 1)]
    with pytest.raises(ConfigError, match=rf"a build has at most {MAX_KEPT_ALPHAS} alphas, got {MAX_KEPT_ALPHAS + 1} ") as caught:
        build_engines(_config("tiny-sd3", alphas=alphas), out_dir=tmp_path / "out", export_dir=tmp_path / "x", progress=False)
    assert caught.value.field == "alphas" and not (tmp_path / "out").exists()
    build_engines(_config("tiny-sd3", alphas=alphas[:MAX_KEPT_ALPHAS], backend="eager"), out_dir=tmp_path / "out",
                  export_dir=tmp_path / "x", progress=False)  # as many as it keeps: built
    code = main(["build", "--model", "tiny-sd3", "--alpha", *map(str, alphas), "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1 and "at most" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of half precision")
def test_half_precision_on_a_cpu_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"precision fp16 needs a CUDA device") as caught:
        build_engines(_config("tiny-sd3", precision="fp16"), progress=False)
    assert caught.value.field == "precision"


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_build_inspect_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--height", "64", "--width", "64", "--steps", "6", "--t0", "3", "--max-sequence-length", "16"]
    out, export = str(tmp_path / "engines"), str(tmp_path / "export")
    assert main(["build", "--model", "tiny-sd3", "--backend", "onnxruntime", *flags, "--out", out, "--export-dir", export]) == 0
    folder = tmp_path / "engines" / "tiny-sd3-64x64-b1-s6-t3-a0.30-l16-fp32-onnxruntime"
    assert f"built {folder}" in capsys.readouterr().out

    assert main(["inspect", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "N = 16 image tokens" in printed and "alpha 0.3: k = 5, graph pruned-k5" in printed
    assert "files and machine: OK" in printed

    image = tmp_path / "image.png"
    assert main(["generate", "--engines", str(folder), "--prompt", "a red circle", "--seed", "1", "--out", str(image)]) == 0
    assert "wrote" in capsys.readouterr().out and image.stat().st_size > 0

    (folder / "full.onnx").write_bytes(b"not a graph")
    assert main(["inspect", str(folder)]) == 2
    assert "engine file full.onnx" in capsys.readouterr().err


def test_engine_runtime_steps_need_no_host_sync(onnx_builds: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every transformer step of an engine-backed generation, selection included, stays on the device."""
    from catrt.runtime import CATRuntime
    from tests.test_selection import NoHostSync

    step = CATRuntime.__call__
    calls: list[int] = []

    def guarded(self: CATRuntime, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(self.step)
        with NoHostSync():
            return step(self, *args, **kwargs)

    monkeypatch.setattr(CATRuntime, "__call__", guarded)
    fast = catrt.load(onnx_builds["tiny-sd3"])
    fast(["a red circle"] * fast.build.batch, generator=torch.Generator().manual_seed(0))
    assert len(calls) == fast.build.steps


def test_overlapping_errors_only_blocks_put_the_level_back_once_both_end() -> None:
    """Builds in two threads overlap their quiet blocks in any order: the logger's level comes back, never stuck at
    ERROR (the second block saved the first's ERROR as the level to restore)."""
    from catrt.export.quiet import errors_only

    logger = logging.getLogger("catrt-test-quiet")
    logger.setLevel(logging.INFO)
    for last_out in ("first", "second"):
        first, second = errors_only("catrt-test-quiet"), errors_only("catrt-test-quiet")
        first.__enter__()
        second.__enter__()
        assert logger.level == logging.ERROR
        blocks = [second, first] if last_out == "first" else [first, second]
        blocks[0].__exit__(None, None, None)
        assert logger.level == logging.ERROR  # the other block still runs
        blocks[1].__exit__(None, None, None)
        assert logger.level == logging.INFO


@pytest.mark.parametrize("backend", ["onnxruntime", "eager"])
def test_a_quantized_transformer_is_refused_before_the_build_works(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_pipelines: dict[str, Any]
) -> None:
    """A quantized transformer (torchao's Int8Tensor weights, a GGUF checkpoint's uint8 blocks; here the uint8 stand-in
    Linear of tests.test_adapters, torchao and gguf not being test dependencies) failed the build with a traceback after
    the export and verification (its config and weight digest cannot go in the manifest). It is refused as one line
    naming the quantized weight and the fix, before the reference run, with no folder left behind."""
    from tests.test_adapters import _quantize_linears

    tiny = tiny_pipelines["tiny-sd3"]
    transformer = type(tiny.transformer).from_config(tiny.transformer.config).eval()
    transformer.load_state_dict(tiny.transformer.state_dict())
    _quantize_linears(transformer, torch.float32)
    quantized = type(tiny)(**{**tiny.components, "transformer": transformer})
    monkeypatch.setattr(build_module, "load_pipeline", lambda *args, **kwargs: quantized)
    monkeypatch.setattr(build_module, "_reference", lambda *args: pytest.fail("the build ran past the refusal"))
    out, export = tmp_path / "engines", tmp_path / "export"
    with pytest.raises(catrt.UnsupportedModelError, match=r"^the transformer of tiny-sd3 is quantized \(its weight "
                                                          r"'.+\.weight' is a torch\.nn\.parameter\.Parameter of torch\.uint8\)") as refused:
        build_engines(_config("tiny-sd3", backend=backend), out_dir=out, export_dir=export, progress=False)
    assert refused.value.field == "model"
    assert "catrt.accelerate(pipe, config)" in str(refused.value)
    assert not out.exists() and not export.exists()

    assert main(["build", "--model", "tiny-sd3", "--backend", backend, "--out", str(out), "--export-dir", str(export)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("catrt build: error: the transformer of tiny-sd3 is quantized")  # after the bar


def test_a_lazy_module_in_the_transformer_is_refused_naming_it_not_as_quantized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_pipelines: dict[str, Any]
) -> None:
    """A LazyLinear's weight before its first forward (an UninitializedParameter) was refused as "quantized", with the
    fix to build from the unquantized model: it names the lazy module and the fix now, before any work."""
    tiny = tiny_pipelines["tiny-sd3"]
    transformer = type(tiny.transformer).from_config(tiny.transformer.config).eval()
    transformer.proj_out = torch.nn.LazyLinear(transformer.proj_out.out_features)
    lazy = type(tiny)(**{**tiny.components, "transformer": transformer})
    monkeypatch.setattr(build_module, "load_pipeline", lambda *args, **kwargs: lazy)
    monkeypatch.setattr(build_module, "_reference", lambda *args: pytest.fail("the build ran past the refusal"))
    out, export = tmp_path / "engines", tmp_path / "export"
    message = ("the transformer of tiny-sd3 has an uninitialised weight 'proj_out.weight' (of module 'proj_out' "
               "(LazyLinear), a lazy module before its first forward: no shape or values yet), which catrt build cannot "
               "export or record: load its weights, or run the pipeline once so that it initialises, then build")
    with pytest.raises(catrt.UnsupportedModelError) as refused:
        build_engines(_config("tiny-sd3", backend="eager"), out_dir=out, export_dir=export, progress=False)
    assert str(refused.value) == message and refused.value.field == "model" and refused.value.value == "proj_out.weight"
    assert main(["build", "--model", "tiny-sd3", "--backend", "eager", "--out", str(out), "--export-dir", str(export)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"catrt build: error: {message}"
    assert not out.exists() and not export.exists()


def test_a_sharded_dtensor_weight_is_refused_naming_its_module_not_as_quantized(tmp_path: Path) -> None:
    """A transformer sharded with FSDP2's fully_shard or tensor parallelism holds DTensor weights: refused as
    "quantized" (build from the unquantized model: no fix); it names the module and says to build from the whole model."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        transformer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        mesh = init_device_mesh("cpu", (1,))
        transformer[1].weight = torch.nn.Parameter(distribute_tensor(transformer[1].weight.detach(), mesh, [Replicate()]))
        with pytest.raises(catrt.UnsupportedModelError) as refused:
            build_module._refuse_quantized(transformer, "my-model")
    finally:
        dist.destroy_process_group()
    assert str(refused.value) == (
        "the transformer of my-model is sharded across processes (its weight '1.weight', of module '1' (Linear), is a "
        "torch.distributed DTensor: FSDP2's fully_shard or tensor parallelism), which catrt build cannot export or "
        "record: build in one process from the model loaded whole, without fully_shard or parallelize_module")
    assert refused.value.field == "model" and refused.value.value == "1.weight"


def test_a_quantized_patch_embedding_is_refused_as_a_quantized_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      tiny_pipelines: dict[str, Any]) -> None:
    """A transformer quantized down to its patch embedding was refused by the adapter's check first, whose fix (leave
    pos_embed unquantized) only led to the build's refusal of every quantized weight: the build's comes first."""
    from tests.test_adapters import _DequantizedInLinear

    tiny = tiny_pipelines["tiny-sd3"]
    transformer = type(tiny.transformer).from_config(tiny.transformer.config).eval()
    transformer.pos_embed.proj.weight = _DequantizedInLinear(transformer.pos_embed.proj.weight)
    quantized = type(tiny)(**{**tiny.components, "transformer": transformer})
    monkeypatch.setattr(build_module, "load_pipeline", lambda *args, **kwargs: quantized)
    with pytest.raises(catrt.UnsupportedModelError, match=r"^the transformer of tiny-sd3 is quantized \(its weight "
                                                          r"'pos_embed\.proj\.weight' is a .*_DequantizedInLinear") as refused:
        build_engines(_config("tiny-sd3", backend="onnxruntime"), out_dir=tmp_path / "engines", export_dir=tmp_path / "x",
                      progress=False)
    assert refused.value.field == "model"


@pytest.mark.parametrize(("package", "distribution"), [("onnxruntime", "onnxruntime-gpu"), ("tensorrt", "tensorrt-cu12")])
def test_a_backend_installed_under_another_distribution_name_records_its_version(
    monkeypatch: pytest.MonkeyPatch, package: str, distribution: str
) -> None:
    """onnxruntime's GPU build is the `onnxruntime-gpu` distribution and `pip install tensorrt-cu12` installs no
    `tensorrt` one: a build with either recorded no version of its backend, and the check at load was skipped."""
    installed = importlib.metadata.version

    def only(name: str) -> str:
        if name == distribution:
            return "1.2.3"
        if name == package:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(importlib.metadata, "version", only)
    assert package_versions()[package] == "1.2.3"
    manifest = SimpleNamespace(versions={"catrt": catrt.__version__, package: "1.2.2"}, device={})
    assert [problem.field for problem in environment_problems(manifest, package, {}, ())] == [f"versions.{package}"]


def test_an_engine_dropped_closes_once_logging_a_failed_release_and_a_half_made_one_is_left_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    """`__del__` runs where Python drops the engine (any thread, the GC): an error waiting for its device must not
    escape it (Python prints "Exception ignored" to stderr, outside the log), so it is logged naming the engine; an
    engine whose constructor refused it has nothing to release; a closed one is not closed again."""
    from catrt.engines.base import Engine

    class Failing(Engine):
        name = "failing"
        needs_transformer = True
        waits: ClassVar[list[str]] = []

        def load(self) -> None:
            pass

        def run(self, graph: str, inputs: dict[str, torch.Tensor], out: Any = None) -> dict[str, torch.Tensor]:
            return {}

        def _finish_device_work(self) -> None:
            self.waits.append(str(self.folder))
            raise RuntimeError("an illegal memory access was encountered")

    with caplog.at_level(logging.WARNING, logger="catrt.engines.base"):
        with pytest.raises(ConfigError, match="runs the PyTorch transformer"):
            Failing(Path("half"), {}, torch.device("cpu"))
        engine = Failing(Path("dropped"), {}, torch.device("cpu"), adapter=object())
        del engine
        closed = Failing(Path("closed"), {}, torch.device("cpu"), adapter=object())
        with pytest.raises(RuntimeError, match="illegal memory access"):
            closed.close()  # an explicit close raises to its caller
        del closed
    assert Failing.waits == ["dropped", "closed"]
    assert [record.getMessage() for record in caplog.records] == ["releasing the failing engine of dropped failed"]
    assert "illegal memory access" in str(caplog.records[0].exc_info[1])


def test_an_onnx_bundle_loads_where_an_open_files_fstat_names_another_device_than_its_path(
        bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """catrt took a file's identity from its open descriptor (fstat) and compared it with the path's (lstat) once ONNX
    Runtime was done: where the two differ for one unchanged file (overlayfs before Linux 4.19 reports the lower layer's
    device and inode for an open file, its own for the path: a bundle in a container image), every load was refused as
    "written or replaced". Both are now taken by path; a file replaced meanwhile is still refused (the test above)."""
    import catrt.engines.verified_file as verified_file_module

    class LowerLayer:
        """`os`, but an open file's fstat names another device and inode than its path's lstat."""

        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        @staticmethod
        def fstat(descriptor: int) -> os.stat_result:
            info = os.fstat(descriptor)
            extra = {name: getattr(info, name) for name in dir(info) if name.startswith("st_") and name not in (
                "st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime", "st_mtime", "st_ctime")}
            return os.stat_result((info.st_mode, info.st_ino + 1, info.st_dev + 1, *info[3:10]), extra)

    monkeypatch.setattr(verified_file_module, "os", LowerLayer())
    fast = catrt.load(bundle_copy)
    assert fast.engine.sessions and fast.build.backend == "onnxruntime"
