"""Several alphas from one pipeline or bundle: per-call alpha in the runtime, multi-alpha bundles."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import catrt
from catrt.errors import ConfigError
from tests.conftest import call_kwargs


def _state_addresses(buffers: Any) -> dict[Any, tuple[int, ...]]:
    return {
        key: tuple(getattr(state, name).data_ptr() for name in ("kv_cache", "output_cache", "indices", "staleness"))
        for key, state in buffers._states.items()
    }


def test_per_call_alpha_runs_that_k_and_keeps_one_state_per_k(tiny_pipelines: dict[str, Any]) -> None:
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
    assert len(addresses) == 2  # one state per (shape, k)

    for alpha in (0.2, 0.5, 0.2):  # back and forth: nothing new allocated, results unchanged
        again = fast(**call_kwargs(pipe), alpha=alpha).images
        assert torch.equal(again, alone[alpha])
    assert _state_addresses(fast.buffers) == addresses
    default = fast(**call_kwargs(pipe)).images  # no alpha: the config's
    assert {record.indices.shape[1] for record in fast.last_trace if record.kind == "pruned"} == {math.ceil(0.3 * num_tokens)}
    assert len(fast.buffers) == 3 and torch.isfinite(default).all()


def test_a_per_call_alpha_out_of_range_is_a_config_error(tiny_pipelines: dict[str, Any]) -> None:
    fast = catrt.accelerate(tiny_pipelines["tiny-sd3"], catrt.CATConfig(alpha=0.3, t0=4))
    with pytest.raises(ConfigError, match=r"CATConfig.alpha must be in \(0, 1\], got 1.5") as caught:
        fast(**call_kwargs(tiny_pipelines["tiny-sd3"]), alpha=1.5)
    assert caught.value.field == "alpha"
