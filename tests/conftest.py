"""Shared test setup: offline, one thread, the tiny pipelines built once per session, and helpers for the
compiled-step tests (the step functions' recorded inputs, eager parity, inductor's buffers)."""

from __future__ import annotations

import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported: no test may touch the hub

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import catrt
from catrt.models import make_adapter
from catrt.pipeline import pipeline_spec
from catrt.tiny import TINY_PIPELINES, build_tiny_pipeline

TINY_NAMES = sorted(TINY_PIPELINES)


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one thread; two threads stall when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_pipelines() -> dict[str, Any]:
    pipes = {name: build_tiny_pipeline(name) for name in TINY_NAMES}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def after_a_tick(path: Path) -> None:
    """Wait until the coarse clock the file system stamps change times with has moved past `path`'s change time, so a
    change now gives it another: within one tick (1-4 ms) it may keep the one it has, however fast or slow the machine
    (as a file settled before its check has: `file_checks.SETTLED_NS`, which such tests set to 0)."""
    probe = path.with_name(".tick-probe")
    while True:
        probe.write_bytes(b"")
        if probe.stat().st_ctime_ns > path.stat().st_ctime_ns:
            break
    probe.unlink()


def call_kwargs(pipe: Any, **overrides: Any) -> dict[str, Any]:
    """Arguments for a quick seeded tiny generation (small text length, latent output)."""
    kwargs: dict[str, Any] = dict(pipeline_spec(pipe).call_defaults)
    kwargs.update(
        prompt=["a red circle on a blue background", "a green square"],
        num_inference_steps=12,
        height=64,
        width=96,
        guidance_scale=4.0,
        output_type="latent",
        max_sequence_length=16,
    )
    kwargs.update(overrides)
    kwargs["generator"] = torch.Generator().manual_seed(kwargs.pop("seed", 0))
    return kwargs


def record_step_inputs(pipe: Any, t0: int, steps: int = 6) -> dict[str, list[tuple[Any, ...]]]:
    """The arguments the runtime hands the full and pruned step functions, per call, in a short generation (cloned)."""
    adapter = make_adapter(pipe.transformer)
    calls: dict[str, list[tuple[Any, ...]]] = {"full": [], "pruned": []}

    def keep(kind: str, args: tuple[Any, ...]) -> None:
        calls[kind].append(tuple(arg.clone() if isinstance(arg, torch.Tensor) else dict(arg) for arg in args))

    class Recording:
        prepare_context = adapter.prepare_context

        def full_forward(self, *args: Any) -> torch.Tensor:
            keep("full", args)
            return adapter.full_forward(*args)

        def pruned_forward(self, *args: Any) -> torch.Tensor:
            keep("pruned", args)
            return adapter.pruned_forward(*args)

    catrt.accelerate(pipe, catrt.CATConfig(alpha=0.3, t0=t0), functions=Recording())(**call_kwargs(pipe, num_inference_steps=steps))
    return calls


def check_step_matches_eager(forward: Any, step: Any, args: tuple[Any, ...], label: str) -> None:
    """`step` and the eager `forward` from the same cache: the same output and cache, and the cache written."""
    eager_cache, step_cache = args[-1].clone(), args[-1].clone()
    expected = forward(*args[:-1], eager_cache)
    got = step(*args[:-1], step_cache)
    assert torch.allclose(got, expected, atol=1e-6), label
    assert torch.allclose(step_cache, eager_cache, atol=1e-6), label
    assert not torch.equal(step_cache, args[-1]), label  # the step did write the cache


def inductor_buffers(code: list[str]) -> list[str]:
    """The shapes of the buffers inductor's generated program allocates (its `call`), as written there."""
    program = "\n".join(code)
    return re.findall(r"empty_strided_\w+\(\(([^)]*)\)", program[program.index("def call("):])
