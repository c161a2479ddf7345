"""What the first GPU run found, held on the CPU: one graph per compiled forward, K/V rows written in
place, a contiguous residual stream.

The run (bench/results/speed-nvidia-h200.md) found the compiled SD3 forwards split into a graph per
block (a dtype check dynamo cannot trace), inductor copying each whole K/V slot out and back around a
pruned step's row writes, and PixArt's full step slower than diffusers'. These hold every family to
one graph per forward equal to the eager one (outputs and cache), the compiled row write to touching
only the k rows (inductor's generated code allocates no slot-sized buffer), and every norm and linear
of a full step to reading tokens with adjacent channels (the patch embedding's (B, D, N) layout once
kept the whole PixArt residual stream channel-major).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.overrides import TorchFunctionMode

import catrt
from catrt.models import make_adapter
from catrt.models.base import KVStore
from conftest import call_kwargs

FAMILIES = ["tiny-sd3", "tiny-sd3.5", "tiny-pixart", "tiny-flux"]


def _step_inputs(pipe: Any) -> dict[str, tuple[Any, ...]]:
    """The arguments the runtime hands the full and pruned step functions in a short generation (cloned)."""
    adapter = make_adapter(pipe.transformer)
    calls: dict[str, tuple[Any, ...]] = {}

    def keep(args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(arg.clone() if isinstance(arg, torch.Tensor) else dict(arg) for arg in args)

    class Recording:
        prepare_context = adapter.prepare_context

        def full_forward(self, *args: Any) -> torch.Tensor:
            calls.setdefault("full", keep(args))
            return adapter.full_forward(*args)

        def pruned_forward(self, *args: Any) -> torch.Tensor:
            calls.setdefault("pruned", keep(args))
            return adapter.pruned_forward(*args)

    catrt.accelerate(pipe, catrt.CATConfig(alpha=0.3, t0=4), functions=Recording())(**call_kwargs(pipe, num_inference_steps=6))
    return calls


@pytest.mark.parametrize("name", FAMILIES)
def test_each_forward_compiles_to_one_graph_equal_to_eager(name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    adapter = make_adapter(pipe.transformer)
    for kind, args in _step_inputs(pipe).items():
        forward = adapter.full_forward if kind == "full" else adapter.pruned_forward
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(forward)(*args[:-1], args[-1].clone())
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), (kind, explained.break_reasons)
            eager_cache, compiled_cache = args[-1].clone(), args[-1].clone()
            expected = forward(*args[:-1], eager_cache)
            got = torch.compile(forward, fullgraph=True, backend="eager")(*args[:-1], compiled_cache)  # a break raises
        assert torch.allclose(got, expected, atol=1e-6), kind
        assert torch.allclose(compiled_cache, eager_cache, atol=1e-6), kind
        assert not torch.equal(compiled_cache, args[-1]), kind  # the forward did write the cache


def test_compiled_row_writes_touch_only_the_selected_rows() -> None:
    slots, batch, tokens, width, k = 4, 2, 64, 32, 12
    cache = torch.randn(slots, batch, tokens, width)
    indices = torch.stack([torch.randperm(tokens)[:k] for _ in range(batch)])
    fresh = torch.randn(batch, k, width)

    def write(cache: torch.Tensor, indices: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        return KVStore(cache, indices, in_place=True).exchange(1, fresh).sum(-1)

    expected_cache = cache.clone()
    expected = write(expected_cache, indices, fresh)
    torch._dynamo.reset()
    with torch.no_grad():
        got, code = run_and_get_code(torch.compile(write, fullgraph=True, dynamic=False), cache, indices, fresh)
    assert torch.allclose(got, expected, atol=1e-5) and torch.equal(cache, expected_cache)
    program = "\n".join(code)
    program = program[program.index("def call("):]
    buffers = re.findall(r"empty_strided_\w+\(\(([^)]*)\)", program)
    assert f"{batch}, {tokens}, {width}" not in buffers, buffers  # no copy of slot 1 out and back


@pytest.mark.parametrize("name", FAMILIES)
def test_a_full_step_reads_contiguous_tokens(name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    adapter = make_adapter(pipe.transformer)
    args = _step_inputs(pipe)["full"]
    tokens = adapter.tokens_of(args[0]).shape[1]
    strided: list[str] = []

    class Layouts(TorchFunctionMode):
        """Records norms and linears handed (B, N, D) tokens whose channels are not adjacent (channel-major)."""

        def __torch_function__(self, func: Any, types: Any, call: tuple = (), kwargs: dict | None = None) -> Any:
            name = getattr(func, "__name__", "")
            if name in ("layer_norm", "linear", "group_norm", "rms_norm") and call:
                x = call[0]
                if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] == tokens and x.stride(-1) != 1:
                    strided.append(f"{name}{tuple(x.shape)} strides {x.stride()}")
            return func(*call, **(kwargs or {}))

    with torch.no_grad(), Layouts():
        adapter.full_forward(*args[:-1], args[-1].clone())
    assert strided == []
