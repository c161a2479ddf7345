"""The step-graph contract (catrt/contract.py): the export, the eager backend and the runtime agree on it.

The ONNX Runtime builds are held to it in tests/test_engines.py (`test_built_graphs_have_the_declared_io`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import catrt
from catrt.build_config import BuildConfig
from catrt.contract import FULL, PRUNED, StepIO, pruned_graph, step_shapes
from catrt.engines.eager import EagerEngine
from catrt.export import capture_step_sample, graph_spec, reference_io, step_module
from catrt.models import make_adapter
from tests.conftest import call_kwargs

LAYOUTS = ["tiny-sd3.5", "tiny-pixart", "tiny-flux"]  # conv patches + table, cross-attention context, packed + rotary


def _declared(adapter: Any, latents: torch.Tensor, k: int, timestep: torch.Tensor) -> dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    return step_shapes(adapter, tuple(latents.shape), k, latents.dtype, timestep.dtype)


def _io(step: StepIO, tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(tensors[name].shape), tensors[name].dtype) for name in names}


@pytest.fixture(scope="module", params=LAYOUTS)
def reference(request: pytest.FixtureRequest, tiny_pipelines: dict[str, Any]) -> tuple[Any, Any, dict, dict, int]:
    pipe = tiny_pipelines[request.param]
    adapter = make_adapter(pipe.transformer)
    build = BuildConfig(request.param, height=64, width=96, batch=2, steps=12, t0=4, max_sequence_length=16, backend="eager")
    sample = capture_step_sample(pipe, adapter, build)
    k = build.num_selected(adapter.tokens_of(sample.hidden_states).shape[1])
    inputs, outputs = reference_io(sample, adapter, (k,))
    return adapter, sample, inputs, outputs, k


def test_the_export_reference_has_the_declared_io(reference: tuple) -> None:
    adapter, sample, inputs, outputs, k = reference
    declared = _declared(adapter, sample.hidden_states, k, sample.timestep)
    for step, graph in ((FULL, "full"), (PRUNED, pruned_graph(k))):
        assert tuple(inputs[graph])[: len(step.inputs)] == step.inputs  # positional inputs first, in order
        assert tuple(outputs[graph]) == step.outputs
        got = {**_io(step, inputs[graph], step.inputs), **_io(step, outputs[graph], step.outputs)}
        assert got == declared[step.graph]
        context = {name for name in inputs[graph] if name not in step.inputs}
        assert context == set(inputs["context"]) | set(outputs["context"])  # the whole context, after them


@torch.no_grad()
def test_the_exported_modules_and_the_eager_backend_return_the_declared_io(reference: tuple, tmp_path: Path) -> None:
    adapter, sample, inputs, outputs, k = reference
    declared = _declared(adapter, sample.hidden_states, k, sample.timestep)
    specs = {graph: graph_spec(inputs[graph], outputs[graph]) for graph in inputs}
    engine = EagerEngine(tmp_path, specs, torch.device("cpu"), adapter)
    engine.load()
    latent_shape = tuple(sample.hidden_states.shape)
    for step, graph in ((FULL, "full"), (PRUNED, pruned_graph(k))):
        module = step_module(graph, adapter, inputs[graph], outputs[graph], latent_shape)
        exported = step.named_outputs(module(*inputs[graph].values()))
        ran = engine.run(graph, specs[graph].prepare(inputs[graph]))
        for got in (exported, ran):
            assert _io(step, got, step.outputs) == {name: declared[step.graph][name] for name in step.outputs}
            assert all(torch.allclose(got[name], outputs[graph][name], atol=1e-5) for name in step.outputs)


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_runtime_calls_its_step_functions_with_the_declared_io(name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    adapter = make_adapter(pipe.transformer)
    seen: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}

    class Recording:
        """The adapter's own step functions, recording what the runtime hands them and what they return."""

        prepare_context = adapter.prepare_context

        def full_forward(self, *positional: torch.Tensor) -> torch.Tensor:
            tokens = adapter.full_forward(*positional)
            tensors = {**dict(zip(FULL.inputs, positional[:2])), "tokens": tokens, "kv": positional[3]}
            seen["full"] = _io(FULL, tensors, FULL.inputs + FULL.outputs)
            return tokens

        def pruned_forward(self, patches: torch.Tensor, indices: torch.Tensor, timestep: torch.Tensor, context: dict, kv_cache: torch.Tensor) -> torch.Tensor:
            tokens = adapter.pruned_forward(patches, indices, timestep, context, kv_cache)
            tensors = PRUNED.bind((patches, indices, timestep, kv_cache), {"tokens": tokens})
            seen["pruned"] = _io(PRUNED, tensors, (*PRUNED.inputs, "tokens"))  # in place: the K/V rows go into kv_cache
            return tokens

    fast = catrt.accelerate(pipe, catrt.CATConfig(alpha=0.3, t0=4), functions=Recording())
    fast(**call_kwargs(pipe, num_inference_steps=6))
    state = next(iter(fast.buffers._states.values()))
    k = fast.config.num_selected(adapter.tokens_of(state.latents).shape[1])
    declared = _declared(adapter, state.latents, k, state.timestep)
    del declared["pruned"]["kv_rows"]
    assert seen == declared
