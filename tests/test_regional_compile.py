"""The compile backend's regional mode: every block kind compiled once, its graphs shared by all its blocks.

Held here: the compiled forwards equal the adapter's (outputs and the K/V cache written in place),
each block kind compiles to one graph per step kind with no break, later steps recompile nothing
(dynamo falls back to eager silently once a code object passes its recompile limit), a further
step shape stays compiled past dynamo's default limit, and a block's row writes into its sliced
cache input touch only the k rows.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from catrt.engines.compile import CompiledBlocks, compile_step_functions
from catrt.models import make_adapter
from catrt.models.base import KVStore
from conftest import check_step_matches_eager, inductor_buffers, record_step_inputs

#: Tiny layouts with repeated blocks, and their block kinds: SD3's plain joint blocks and its last
#: (context_pre_only) block; SD3.5 adds dual-attention blocks; FLUX has double- and single-stream ones.
LAYOUTS: dict[str, tuple[dict[str, Any], int]] = {
    "tiny-sd3": ({"num_layers": 4}, 2),
    "tiny-sd3.5": ({"num_layers": 4, "dual_attention_layers": (0, 1)}, 3),
    "tiny-pixart": ({"num_layers": 3}, 1),
    "tiny-flux": ({"num_layers": 2, "num_single_layers": 3}, 2),
}


def _deeper(pipe: Any, layout: dict[str, Any]) -> Any:
    """A copy of `pipe` whose transformer has the layout's blocks (seeded random weights)."""
    torch.manual_seed(0)
    transformer = type(pipe.transformer).from_config({**pipe.transformer.config, **layout})
    return type(pipe)(**{**pipe.components, "transformer": transformer})


class Counting:
    """A dynamo backend that runs each graph as traced (no code generation) and counts the graphs made."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs += 1
        return graph.forward


def _check_step(adapter: Any, compiled: Any, kind: str, args: tuple[Any, ...]) -> None:
    """One step compiled and eager from the same cache: the same output and the same cache, and the cache written."""
    if kind == "full":
        check_step_matches_eager(adapter.full_forward, compiled.full_forward, args, kind)
    else:
        check_step_matches_eager(adapter.pruned_forward, compiled.pruned_forward, args, kind)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_block_kind_compiles_once_and_later_steps_recompile_nothing(name: str, tiny_pipelines: dict[str, Any]) -> None:
    layout, kinds = LAYOUTS[name]
    pipe = _deeper(tiny_pipelines[name], layout)
    calls = record_step_inputs(pipe, t0=3)
    adapter = make_adapter(pipe.transformer)
    backend = Counting()
    torch._dynamo.reset()
    compiled = compile_step_functions(adapter, backend=backend)
    with torch.no_grad():
        for kind in ("full", "pruned"):
            _check_step(adapter, compiled, kind, calls[kind][0])
        assert backend.graphs == 2 * kinds  # one graph per block kind and step kind, shared by its blocks
        with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile raises instead of running
            for step in (1, 2):
                for kind in ("full", "pruned"):
                    _check_step(adapter, compiled, kind, calls[kind][step])
    assert backend.graphs == 2 * kinds


def test_whole_forwards_stay_one_graph_each(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    calls = record_step_inputs(pipe, t0=3)
    adapter = make_adapter(pipe.transformer)
    backend = Counting()
    torch._dynamo.reset()
    compiled = compile_step_functions(adapter, backend=backend, regional=False)
    with torch.no_grad():
        for kind in ("full", "pruned"):
            _check_step(adapter, compiled, kind, calls[kind][0])
    assert backend.graphs == 2


def test_a_further_step_shape_stays_compiled_past_dynamos_default_limit(tiny_pipelines: dict[str, Any]) -> None:
    """SD3.5's joint block function holds 3 kinds x {full, pruned} entries; a second k takes it to 9, past dynamo's 8."""
    layout, kinds = LAYOUTS["tiny-sd3.5"]
    pipe = _deeper(tiny_pipelines["tiny-sd3.5"], layout)
    calls = record_step_inputs(pipe, t0=3)
    adapter = make_adapter(pipe.transformer)
    backend = Counting()
    torch._dynamo.reset()
    compiled = compile_step_functions(adapter, backend=backend)
    patches, indices, *rest = calls["pruned"][0]
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default (bench/gpu.py raises it)
        _check_step(adapter, compiled, "full", calls["full"][0])
        for k in (indices.shape[1], indices.shape[1] - 1):
            _check_step(adapter, compiled, "pruned", (patches[:, :k], indices[:, :k], *rest))
    assert backend.graphs == 3 * kinds  # the last variants were compiled, not run eagerly


def test_a_compiled_block_writes_only_the_selected_rows_of_its_slots() -> None:
    slots, batch, tokens, width, k = 6, 2, 64, 32, 12
    cache = torch.randn(slots, batch, tokens, width)
    indices = torch.stack([torch.randperm(tokens)[:k] for _ in range(batch)])
    fresh = torch.randn(batch, k, width)
    layer = torch.nn.Linear(width, width)

    def block(layer: torch.nn.Module, store: KVStore, x: torch.Tensor) -> torch.Tensor:
        return store.exchange(1, layer(x)).sum(-1)

    original, expected_cache = cache.clone(), cache.clone()
    expected = KVStore(expected_cache, indices, in_place=True).run_block(block, layer, 2, 2, fresh)
    torch._dynamo.reset()
    store = KVStore(cache, indices, in_place=True, block_call=CompiledBlocks("inductor"))
    with torch.no_grad():
        got, code = run_and_get_code(store.run_block, block, layer, 2, 2, fresh)
    assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(cache, expected_cache, atol=1e-6)
    others = [0, 1, 2, 4, 5]  # the block's slot 1 is the cache's slot 3
    assert not torch.equal(cache[3], original[3]) and torch.equal(cache[others], original[others])
    buffers = inductor_buffers(code)
    assert f"{batch}, {tokens}, {width}" not in buffers, buffers  # slot 3 is not copied out and back
