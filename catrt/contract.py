"""The step graphs' inputs and outputs (names, shapes, dtypes), declared once.

A generation runs three kinds of static-shape graph: "context" (once: the adapter's `context_inputs` ->
what `prepare_context` adds), "full" and "pruned" (every step; a bundle holds one pruned graph per
built alpha, named by its k: `pruned_graph(k)`). The full and pruned graphs take
their positional inputs below, then every context tensor by name, and return their outputs below.
The runtime's step functions, every engine backend, the export and the build's reference I/O all
read these declarations; `step_shapes` gives the shapes and dtypes an adapter's graphs have for one
latent shape and k, which `tests/test_contract.py` holds every backend and the runtime to.
`StepFunctions` is the same contract as Python calls: what the runtime runs each step, which the eager
adapter and every engine implement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from catrt.models.base import Adapter

Context = dict[str, torch.Tensor]

#: A bundle has one "context", one "full" and one pruned graph per k, named by `pruned_graph`.
_PRUNED_NAME = re.compile(r"pruned-k([1-9][0-9]*)")


def pruned_graph(k: int) -> str:
    """The name of the pruned graph that computes k tokens per step (its files: `<name>.onnx`, `<name>.plan`)."""
    return f"pruned-k{k}"


def pruned_k(name: str) -> int | None:
    """k of a pruned graph's name, or None when `name` is not one."""
    match = _PRUNED_NAME.fullmatch(name) if isinstance(name, str) else None
    return int(match.group(1)) if match else None


def graph_kind(name: str) -> str | None:
    """"context", "full" or "pruned" for a graph name a bundle may hold; None for any other name."""
    if name in ("context", "full"):
        return name
    return "pruned" if pruned_k(name) is not None else None


@dataclass(frozen=True)
class StepIO:
    """One step graph: its positional inputs (before the context tensors) and its outputs, in order."""

    graph: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def bind(self, positional: tuple[torch.Tensor, ...], context: Context) -> dict[str, torch.Tensor]:
        """All inputs by name, in graph order: the positional ones, then the context."""
        if len(positional) != len(self.inputs):
            raise TypeError(f"the {self.graph} graph takes {len(self.inputs)} positional inputs, got {len(positional)}")
        return {**dict(zip(self.inputs, positional)), **context}

    def split(self, tensors: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], Context]:
        """The positional inputs in order, and the context (every other tensor)."""
        return tuple(tensors[name] for name in self.inputs), {n: t for n, t in tensors.items() if n not in self.inputs}

    def named_outputs(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        return dict(zip(self.outputs, outputs, strict=True))


FULL = StepIO("full", ("hidden_states", "timestep"), ("tokens", "kv"))
PRUNED = StepIO("pruned", ("patches", "indices", "timestep", "kv_cache"), ("tokens", "kv_rows"))


class StepFunctions(Protocol):
    """What runs the transformer: the eager adapter is the reference; engines implement the same.

    `full_forward` writes every K/V slot of `kv_cache`; `pruned_forward` writes the k selected rows
    (both in place) and both return the output tokens. Their arguments are the positional inputs of
    the full and pruned graphs in `catrt/contract.py` (then the context), with the shapes it declares.
    """

    def prepare_context(self, inputs: Context, latent_shape: tuple[int, ...]) -> Context: ...

    def full_forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, context: Context, kv_cache: torch.Tensor
    ) -> torch.Tensor: ...

    def pruned_forward(
        self,
        patches: torch.Tensor,
        indices: torch.Tensor,
        timestep: torch.Tensor,
        context: Context,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor: ...


Shape = tuple[int, ...]


def step_shapes(
    adapter: Adapter, latent_shape: Shape, k: int, dtype: torch.dtype, timestep_dtype: torch.dtype = torch.float32
) -> dict[str, dict[str, tuple[Shape, torch.dtype]]]:
    """(shape, dtype) of every positional input and output of the full and pruned graphs.

    rows = latent_shape[0] (2 x batch under classifier-free guidance), N tokens of the adapter's
    layout, S = its K/V slots, D its width; the timestep has the dtype the pipeline gives (PixArt: int64).
    """
    rows = latent_shape[0]
    num_tokens = adapter.tokens_of(torch.empty(latent_shape, device="meta")).shape[1]
    slots, width = adapter.num_kv_slots, adapter.hidden_dim
    out_channels, channels = adapter.token_out_channels, adapter.token_channels
    return {
        "full": {
            "hidden_states": (tuple(latent_shape), dtype),
            "timestep": ((rows,), timestep_dtype),
            "tokens": ((rows, num_tokens, out_channels), dtype),
            "kv": ((slots, rows, num_tokens, width), dtype),
        },
        "pruned": {
            "patches": ((rows, k, channels), dtype),
            "indices": ((rows, k), torch.int64),
            "timestep": ((rows,), timestep_dtype),
            "kv_cache": ((slots, rows, num_tokens, width), dtype),
            "tokens": ((rows, k, out_channels), dtype),
            "kv_rows": ((slots, rows, k, width), dtype),
        },
    }

