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

from typing import Any

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.overrides import TorchFunctionMode

from catrt.models import make_adapter
from catrt.models.base import KVStore
from conftest import check_step_matches_eager, inductor_buffers, record_step_inputs

FAMILIES = ["tiny-sd3", "tiny-sd3.5", "tiny-pixart", "tiny-flux"]


@pytest.mark.parametrize("name", FAMILIES)
def test_each_forward_compiles_to_one_graph_equal_to_eager(name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    adapter = make_adapter(pipe.transformer)
    for kind, calls in record_step_inputs(pipe, t0=4).items():
        args = calls[0]
        forward = adapter.full_forward if kind == "full" else adapter.pruned_forward
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(forward)(*args[:-1], args[-1].clone())
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), (kind, explained.break_reasons)
            compiled = torch.compile(forward, fullgraph=True, backend="eager")  # a break raises
            check_step_matches_eager(forward, compiled, args, kind)


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
    buffers = inductor_buffers(code)
    assert f"{batch}, {tokens}, {width}" not in buffers, buffers  # no copy of slot 1 out and back


@pytest.mark.parametrize("name", FAMILIES)
def test_a_full_step_reads_contiguous_tokens(name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    adapter = make_adapter(pipe.transformer)
    args = record_step_inputs(pipe, t0=4)["full"][0]
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
