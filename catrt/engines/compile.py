"""The `compile` backend: `torch.compile` (inductor) of the adapter's two step functions.

The compiled functions write the K/V cache in place like the adapter. On CUDA the runtime captures
each whole step (the compiled forward and the selection around it) as one CUDA graph, so inductor
runs in its default mode rather than its own "reduce-overhead" CUDA graphs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from catrt.engines.eager import EagerEngine
from catrt.models.base import Adapter, Context

logger = logging.getLogger(__name__)


class CompiledSteps:
    """An adapter's step functions through `torch.compile` (static shapes); the context stays eager."""

    capturable = True
    cuda_graphs = True  # the runtime captures compiled steps on a CUDA device by default

    def __init__(self, adapter: Adapter, backend: str = "inductor") -> None:
        self.adapter = adapter
        self.full_forward = torch.compile(adapter.full_forward, dynamic=False, backend=backend)
        self.pruned_forward = torch.compile(adapter.pruned_forward, dynamic=False, backend=backend)

    def prepare_context(self, inputs: Context, latent_shape: tuple[int, ...]) -> Context:
        return self.adapter.prepare_context(inputs, latent_shape)


def compile_step_functions(adapter: Adapter, backend: str = "inductor") -> CompiledSteps:
    """The runtime's step functions for `adapter`, compiled on first use by torch.compile's `backend`.

    ("eager" traces with dynamo but generates no code: benchmarks use it for quick CPU smoke runs.)
    """
    logger.info("torch.compile (%s) of the step functions of %s", backend, type(adapter.transformer).__name__)
    return CompiledSteps(adapter, backend)


class CompileEngine(EagerEngine):
    """The eager engine with both step functions compiled; steps captured as CUDA graphs on a GPU."""

    name = "compile"
    gpu_only_in_auto = True
    cuda_graphs = True

    def load(self) -> None:
        self.functions: Any = compile_step_functions(self.adapter)
