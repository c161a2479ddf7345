"""The `compile` backend: `torch.compile` (inductor) of the adapter's step functions, block by block.

Regional (the default): each block kind's function is compiled once and every block of that kind
runs through the same graphs - the block's weights are graph inputs (dynamo inlines nn.Modules), its
K/V slots are one sliced cache input numbered from 0 (`KVStore.window`), and nothing else differs
between blocks of a kind. Compile time is then that of one block per kind and step shape rather than
of the whole transformer; the embeddings and the output head between them stay eager. Whole
(`regional=False`): each step function is one graph.

The compiled functions write the K/V cache in place like the adapter. On CUDA the runtime captures
each whole step (the compiled blocks and the selection around them) as one CUDA graph, so inductor
runs in its default mode rather than its own "reduce-overhead" CUDA graphs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from catrt.engines.eager import EagerEngine
from catrt.models.base import Adapter, BlockFunction, Context, KVStore

logger = logging.getLogger(__name__)

#: A torch.compile backend: its name, or a callable (graph, example inputs) -> callable.
Backend = str | Callable[..., Any]

#: Cache entries a block function may hold. A block function's entries are its kinds (SD3.5-medium's
#: joint function: dual-attention, plain and last blocks) x {full, pruned} x each step shape (batch,
#: size, k) served, so dynamo's default of 8 per code object would stop at SD3.5-medium's second
#: alpha or size; this keeps 10 shapes compiled. Past it a block call raises (fullgraph=True turns
#: dynamo's silent eager fallback into an error).
BLOCK_RECOMPILE_LIMIT = 64


class CompiledBlocks:
    """A forward's `block_call` that runs each block function through its own `torch.compile` (static shapes, no breaks)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._compiled: dict[BlockFunction, BlockFunction] = {}

    def __call__(self, function: BlockFunction, block: nn.Module, store: KVStore, first_slot: int, num_slots: int, *inputs: Any) -> Any:
        compiled = self._compiled.get(function)
        if compiled is None:
            compiled = torch.compile(function, dynamic=False, fullgraph=True, backend=self.backend)
            self._compiled[function] = compiled
        window = store.window(first_slot, num_slots, sliced=True)
        config = torch._dynamo.config
        if config.recompile_limit < BLOCK_RECOMPILE_LIMIT:
            # Raised for the process and never lowered: a save-and-restore around each call would race
            # between server threads (one thread's restore under another's call), and `config.patch`
            # costs ~40x more per block call.
            config.recompile_limit = BLOCK_RECOMPILE_LIMIT
        return compiled(block, window, *inputs)


class CompiledSteps:
    """An adapter's step functions through `torch.compile` (static shapes); the context stays eager."""

    capturable = True
    cuda_graphs = True  # the runtime captures compiled steps on a CUDA device by default

    def __init__(self, adapter: Adapter, backend: Backend = "inductor", regional: bool = True) -> None:
        self.adapter = adapter
        if regional:
            blocks = CompiledBlocks(backend)
            self.full_forward = functools.partial(adapter.full_forward, block_call=blocks)
            self.pruned_forward = functools.partial(adapter.pruned_forward, block_call=blocks)
        else:
            self.full_forward = torch.compile(adapter.full_forward, dynamic=False, backend=backend)
            self.pruned_forward = torch.compile(adapter.pruned_forward, dynamic=False, backend=backend)

    def prepare_context(self, inputs: Context, latent_shape: tuple[int, ...]) -> Context:
        return self.adapter.prepare_context(inputs, latent_shape)


def compile_step_functions(adapter: Adapter, backend: Backend = "inductor", regional: bool = True) -> CompiledSteps:
    """The runtime's step functions for `adapter`, compiled on first use by torch.compile's `backend`.

    `regional`: compile block by block (blocks of one kind share their graphs) rather than each
    whole step function. ("eager" traces with dynamo but generates no code: benchmarks use it for
    quick CPU smoke runs.)
    """
    logger.info(
        "torch.compile (%s, %s) of the step functions of %s",
        backend if isinstance(backend, str) else type(backend).__name__,
        "per block" if regional else "whole forwards",
        type(adapter.transformer).__name__,
    )
    return CompiledSteps(adapter, backend, regional)


class CompileEngine(EagerEngine):
    """The eager engine with both step functions compiled; steps captured as CUDA graphs on a GPU."""

    name = "compile"
    gpu_only_in_auto = True
    cuda_graphs = True

    def load(self) -> None:
        self.functions: Any = compile_step_functions(self.adapter)
