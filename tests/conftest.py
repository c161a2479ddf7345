"""Shared test setup: offline, one thread, and the tiny pipelines built once per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported: no test may touch the hub

from collections.abc import Iterator
from typing import Any

import pytest
import torch

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
