"""Several alphas from one pipeline or bundle: per-call alpha in the runtime, multi-alpha bundles."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import catrt
from catrt.build import build_engines
from catrt.build_config import BuildConfig
from catrt.cli import main
from catrt.errors import ConfigError, CorruptBundleError
from catrt.integrity import bundle_files
from catrt.manifest import MANIFEST_FILE, read_manifest
from catrt.serve.routing import load_builds
from catrt.serve.schemas import ImageGenerationRequest
from catrt.serve.validation import RequestRules
from tests.conftest import call_kwargs


def _state_addresses(buffers: Any) -> dict[Any, tuple[int, ...]]:
    return {
        key: (
            *(getattr(state, name).data_ptr() for name in ("kv_cache", "output_cache", "staleness")),
            *((k, indices.data_ptr()) for k, indices in sorted(state.selected.items())),
        )
        for key, state in buffers._states.items()
    }


def test_per_call_alpha_runs_that_k_over_one_state_with_indices_per_k(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, catrt.CATConfig(alpha=0.3, t0=4, trace=True))
    alone = {alpha: catrt.accelerate(pipe, catrt.CATConfig(alpha=alpha, t0=4))(**call_kwargs(pipe)).images for alpha in (0.2, 0.5)}

    first = fast(**call_kwargs(pipe), alpha=0.2).images
    k_small = {record.indices.shape[1] for record in fast.last_trace if record.kind == "pruned"}
    second = fast(**call_kwargs(pipe), alpha=0.5).images
    k_large = {record.indices.shape[1] for record in fast.last_trace if record.kind == "pruned"}
    num_tokens = next(iter(fast.buffers._states.values())).kv_cache.shape[2]  # (slots, rows, N, width)
    assert k_small == {math.ceil(0.2 * num_tokens)} and k_large == {math.ceil(0.5 * num_tokens)}
    assert torch.equal(first, alone[0.2]) and torch.equal(second, alone[0.5])  # the same as a pipeline built for it
    addresses = _state_addresses(fast.buffers)
    (state,) = fast.buffers._states.values()  # one K/V cache for every alpha: only the indices are per k
    assert sorted(state.selected) == sorted(math.ceil(alpha * num_tokens) for alpha in (0.2, 0.5))

    for alpha in (0.2, 0.5, 0.2):  # back and forth: nothing new allocated, results unchanged
        again = fast(**call_kwargs(pipe), alpha=alpha).images
        assert torch.equal(again, alone[alpha])
    assert _state_addresses(fast.buffers) == addresses
    default = fast(**call_kwargs(pipe)).images  # no alpha: the config's
    assert {record.indices.shape[1] for record in fast.last_trace if record.kind == "pruned"} == {math.ceil(0.3 * num_tokens)}
    assert len(fast.buffers) == 1 and len(state.selected) == 3 and torch.isfinite(default).all()


def test_a_per_call_alpha_out_of_range_is_a_config_error(tiny_pipelines: dict[str, Any]) -> None:
    fast = catrt.accelerate(tiny_pipelines["tiny-sd3"], catrt.CATConfig(alpha=0.3, t0=4))
    with pytest.raises(ConfigError, match=r"CATConfig.alpha must be in \(0, 1\], got 1.5") as caught:
        fast(**call_kwargs(tiny_pipelines["tiny-sd3"]), alpha=1.5)
    assert caught.value.field == "alpha"


def test_a_per_call_alpha_of_true_is_refused_even_after_an_alpha_of_one(tiny_pipelines: dict[str, Any]) -> None:
    # True == 1 and hashes alike: the per-alpha config cache must not hand alpha=True the alpha 1 config
    pipe = tiny_pipelines["tiny-pixart"]
    fast = catrt.accelerate(pipe, catrt.CATConfig(alpha=0.3, t0=2))
    fast(**call_kwargs(pipe, num_inference_steps=3), alpha=1)
    with pytest.raises(ConfigError, match=r"CATConfig.alpha must be in \(0, 1\], got True") as caught:
        fast(**call_kwargs(pipe, num_inference_steps=3), alpha=True)
    assert caught.value.field == "alpha"


# -- multi-alpha bundles -----------------------------------------------------------------------

ALPHAS = (0.3, 0.5, 0.2)  # N = 24 tokens at 96x64: k = 8, 12, 5
SIZE = {"height": 64, "width": 96, "steps": 6, "t0": 3, "max_sequence_length": 16}


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("alphas")
    return {
        backend: build_engines(
            BuildConfig("tiny-sd3", backend=backend, alphas=ALPHAS, **SIZE),
            out_dir=root / "engines", export_dir=root / "export", progress=False,
        )
        for backend in ("onnxruntime", "eager")
    }


@pytest.fixture()
def bundle(multi: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(multi["onnxruntime"], tmp_path / multi["onnxruntime"].name))


def _kwargs(pipe: Any) -> dict[str, Any]:
    return call_kwargs(pipe, prompt=["a red circle"], num_inference_steps=SIZE["steps"])


def test_one_bundle_holds_a_pruned_graph_per_alpha_over_one_copy_of_the_weights(multi: dict[str, Path]) -> None:
    folder = multi["onnxruntime"]
    assert folder.name == "tiny-sd3-96x64-b1-s6-t3-a0.30_0.50_0.20-l16-fp32-onnxruntime"
    manifest = read_manifest(folder)
    assert [(entry["alpha"], entry["k"], entry["graph"]) for entry in manifest.alphas] == [
        (0.3, 8, "pruned-k8"), (0.5, 12, "pruned-k12"), (0.2, 5, "pruned-k5")
    ]
    for entry in manifest.alphas:  # each alpha's error is its own graph's worst
        errors = [e for name, e in manifest.verification["max_relative_error"].items() if name.startswith(entry["graph"] + ".")]
        assert entry["max_relative_error"] == max(errors) < 1e-3
    assert sorted(manifest.files) == sorted(bundle_files("onnxruntime", ["context", "full", "pruned-k8", "pruned-k12", "pruned-k5"]))
    table = json.loads((folder / "initializers.json").read_text())
    size = {graph: sum(record["length"] for record in records) for graph, records in table.items()}
    full = {record["offset"] for record in table["full"]}
    for graph in ("pruned-k8", "pruned-k12", "pruned-k5"):  # each pruned graph reads the full graph's stored weights
        shared = sum(record["length"] for record in table[graph] if record["offset"] in full)
        assert shared > 0.95 * size[graph]
    stored = (folder / "weights.bin").stat().st_size  # once, not once per graph
    assert stored <= size["full"] + size["context"] < sum(size.values()) - 2 * size["pruned-k8"]


@pytest.mark.parametrize("backend", ["onnxruntime", "eager"])
def test_load_runs_each_built_alpha_per_call_as_a_pipeline_for_it(backend: str, multi: dict[str, Path], tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.load(multi[backend], catrt.CATConfig(alpha=0.3, t0=3, trace=True))
    fast.set_progress_bar_config(disable=True)
    assert fast.alphas == ALPHAS
    for alpha in (0.5, None, 0.2, 0.5):
        expected = catrt.accelerate(pipe, catrt.CATConfig(alpha=alpha or 0.3, t0=3))(**_kwargs(pipe)).images
        got = fast(**_kwargs(pipe), alpha=alpha).images
        assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4
        k = math.ceil((alpha or ALPHAS[0]) * 24)
        assert {record.indices.shape[1] for record in fast.last_trace if record.kind == "pruned"} == {k}
    (state,) = fast.accelerated.buffers._states.values()  # one state; indices per k, reused when an alpha comes back
    assert sorted(state.selected) == [5, 8, 12]
    with pytest.raises(ConfigError, match=r"built for alpha in 0\.3, 0\.5, 0\.2, not alpha=0\.4; use one of those") as caught:
        fast(**_kwargs(pipe), alpha=0.4)
    assert caught.value.field == "alpha"
    # numpy's float32 0.2 (0.2000000029...) names the built 0.2: the same images, the same k
    assert torch.equal(fast(**_kwargs(pipe), alpha=np.float32(0.2)).images, fast(**_kwargs(pipe), alpha=0.2).images)
    for wrong in (True, "0.2", float("nan")):
        with pytest.raises(ConfigError, match=r"built for alpha in 0\.3, 0\.5, 0\.2, not alpha="):
            fast(**_kwargs(pipe), alpha=wrong)


def test_load_takes_a_config_of_any_built_alpha_as_the_default(multi: dict[str, Path], tiny_pipelines: dict[str, Any]) -> None:
    fast = catrt.load(multi["onnxruntime"], catrt.CATConfig(alpha=0.5, t0=3, trace=True))
    fast.set_progress_bar_config(disable=True)
    fast(**_kwargs(tiny_pipelines["tiny-sd3"]))
    assert {record.indices.shape[1] for record in fast.last_trace if record.kind == "pruned"} == {12}
    with pytest.raises(ConfigError, match=r"built for alpha in 0\.3, 0\.5, 0\.2, not alpha=0\.4") as caught:
        catrt.load(multi["onnxruntime"], catrt.CATConfig(alpha=0.4, t0=3))
    assert caught.value.field == "alpha"


def test_two_alphas_of_one_k_are_refused_before_export(tmp_path: Path) -> None:
    config = BuildConfig("tiny-sd3", backend="onnxruntime", alphas=(0.3, 0.32), **SIZE)
    with pytest.raises(ConfigError, match=r"alphas 0\.3 and 0\.32 both select k = 8 of the 24 image tokens at 96x64") as caught:
        build_engines(config, out_dir=tmp_path / "engines", export_dir=tmp_path / "export", progress=False)
    assert caught.value.field == "alphas" and not (tmp_path / "engines" / config.build_name()).exists()


def _edit(folder: Path, edit: Any) -> None:
    data = json.loads((folder / MANIFEST_FILE).read_text())
    edit(data)
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "field", "message"),
    [
        (lambda m: m["alphas"].pop(1), "alphas", r"alphas lists 0\.3, 0\.2 but build\.alphas is 0\.3, 0\.5, 0\.2"),
        (lambda m: m["build"].update(alphas=[0.3, 0.2, 0.5]), "alphas", r"alphas lists 0\.3, 0\.5, 0\.2 but build\.alphas is 0\.3, 0\.2, 0\.5"),
        (lambda m: m["alphas"][2].update(graph="pruned-k8"), "alphas[2].graph", r"alphas\[2\]\.graph is 'pruned-k8', not the bundle's pruned graph of k = 5"),
        (lambda m: m["alphas"][1].update(max_relative_error=0.0), "alphas[1].max_relative_error", r"not its graph's verification error"),
        (lambda m: m["alphas"][0].pop("k"), "alphas[0]", r"field 'alphas\[0\]' must be an object with alpha, k, graph, max_relative_error"),
        (lambda m: m["graphs"].update({"pruned-x": m["graphs"]["full"]}), "graphs.pruned-x", r"has an unknown graph 'graphs\.pruned-x'"),
    ],
    ids=["alpha-dropped", "alphas-reordered", "graph-swapped", "error-edited", "entry-malformed", "unknown-graph"],
)
def test_an_edited_alpha_table_is_refused_naming_the_field(bundle: Path, edit: Any, field: str, message: str) -> None:
    _edit(bundle, edit)
    with pytest.raises(CorruptBundleError, match=message) as caught:
        catrt.load(bundle)
    assert caught.value.field == field


def test_a_missing_pruned_graph_is_refused_naming_its_file(bundle: Path) -> None:
    (bundle / "pruned-k12.onnx").unlink()
    with pytest.raises(CorruptBundleError, match=r"engine file pruned-k12\.onnx is missing") as caught:
        catrt.load(bundle)
    assert caught.value.field == "pruned-k12.onnx"
    _edit(bundle, lambda m: m["files"].pop("pruned-k12.onnx"))
    with pytest.raises(CorruptBundleError, match=r"engine file pruned-k12\.onnx is not listed") as caught:
        catrt.load(bundle)


def test_cli_builds_inspects_and_generates_at_a_built_alpha(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    flags = ["--height", "64", "--width", "96", "--steps", "6", "--t0", "3", "--max-sequence-length", "16", "--backend", "eager"]
    assert main(["build", "--model", "tiny-sd3", "--alpha", "0.5", "0.2", *flags, "--out", str(tmp_path / "engines")]) == 0
    folder = tmp_path / "engines" / "tiny-sd3-96x64-b1-s6-t3-a0.50_0.20-l16-fp32-eager"
    assert main(["inspect", str(folder)]) == 0
    printed = capfd.readouterr().out
    assert "alpha 0.5: k = 12, graph pruned-k12, verified to relative error" in printed and "(default)" in printed
    assert "alpha 0.2: k = 5, graph pruned-k5" in printed
    image = tmp_path / "image.png"
    generate = ["generate", "--engines", str(folder), "--prompt", "a red circle", "--out", str(image)]
    assert main([*generate, "--alpha", "0.2"]) == 0
    assert "alpha=0.2 t0=3" in capfd.readouterr().out and image.is_file()
    assert main([*generate, "--alpha", "0.3"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "built for alpha in 0.5, 0.2, not alpha=0.3" in err and "Traceback" not in err


def test_a_served_bundle_serves_and_checks_each_built_alpha(multi: dict[str, Path]) -> None:
    (served,) = load_builds([str(multi["eager"])])
    assert served.spec.alphas == ALPHAS and served.spec.alpha == 0.3
    rules = RequestRules(served, max_prompt_chars=100)
    rows, options = rules.admit(ImageGenerationRequest(prompt="a red circle", alpha=0.5, seed=3))
    assert options.alpha == 0.5 and rules.admit(ImageGenerationRequest(prompt="a red circle"))[1].alpha is None
    with pytest.raises(ConfigError, match=r"alpha=0\.4 is not served: this server serves alpha 0\.3, 0\.5, 0\.2") as caught:
        rules.admit(ImageGenerationRequest(prompt="a red circle", alpha=0.4))
    assert caught.value.field == "alpha"
    assert rules.properties()["alpha"]["anyOf"][0] == {"type": "number", "enum": [0.3, 0.5, 0.2]}
    assert len(served.generate(rows, options, alpha=0.5).images) == 1
    (state,) = served.runner.accelerated.buffers._states.values()
    assert list(state.selected) == [12]  # ran at k = 12 only


def test_an_alpha_that_is_not_a_number_is_quoted_never_shown_as_a_built_one() -> None:
    """The string "0.3" was refused as `not alpha=0.3`, which reads as the built 0.3; a long value was echoed whole."""
    build = BuildConfig(model="tiny-sd3", height=64, width=64, alphas=(0.3, 0.2))
    with pytest.raises(ConfigError, match=r"not alpha='0\.3'; use one of those") as caught:
        build.built_alpha("0.3")
    assert caught.value.field == "alpha"
    with pytest.raises(ConfigError) as long_value:
        build.built_alpha("9" * 10_000)
    assert len(str(long_value.value)) < 400
    with pytest.raises(ConfigError, match=r"not alpha=0\.25; use one of those"):
        build.built_alpha(0.25)


def test_alphas_equal_at_float32_precision_are_refused_before_building() -> None:
    """0.3 and 0.30000000000000004 were both built (and then refused late as "0.3 and 0.3 both select k"), though
    a call's alpha names the first of them only."""
    with pytest.raises(ConfigError, match=r"lists 0\.3 and 0\.30000000000000004, one alpha at float32 precision") as caught:
        BuildConfig(model="tiny-sd3", alphas=(0.5, 0.3, 0.30000000000000004))
    assert caught.value.field == "alphas"
    BuildConfig(model="tiny-sd3", alphas=(0.3, 0.301))


def test_a_server_refuses_eager_alphas_equal_at_float32_precision() -> None:
    """`catrt serve --model M --alpha 0.3 0.30000000000000004` served two "alphas" of one k and one image."""
    from catrt.serve.config import ServeConfig

    with pytest.raises(ConfigError, match=r"--alpha lists 0\.3 and 0\.30000000000000004, one alpha at float32") as caught:
        ServeConfig(model="reference", cat=catrt.CATConfig(alpha=0.5), alphas=(0.5, 0.3, 0.30000000000000004))
    assert caught.value.field == "alpha"
    assert ServeConfig(model="reference", cat=catrt.CATConfig(alpha=0.3), alphas=(0.3, 0.301)).served_alphas == (0.3, 0.301)
