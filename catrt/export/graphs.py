"""The two exportable modules: an adapter's full and pruned forwards with flat tensor inputs.

Exporters need positional tensors, so the context dict becomes trailing inputs named after its keys.
Both wrap the same transformer under the same attribute, so both graphs name each weight alike.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from catrt.engines.base import FULL_OUTPUTS, PRUNED_OUTPUTS, GraphSpec, TensorSpec
from catrt.models.base import Adapter

logger = logging.getLogger(__name__)


class _Step(nn.Module):
    """Holds the adapter (and its transformer, so the exporter names the weights alike in both graphs)."""

    def __init__(self, adapter: Adapter, context_names: list[str]) -> None:
        super().__init__()
        self.transformer = adapter.transformer
        self.adapter = adapter
        self.context_names = context_names


class FullStep(_Step):
    """(hidden_states, timestep, *context) -> (tokens, kv)."""

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, *context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter.full_forward(hidden_states, timestep, dict(zip(self.context_names, context)))


class PrunedStep(_Step):
    """(patches, indices, timestep, kv_cache, *context) -> (tokens, kv_rows)."""

    def forward(
        self,
        patches: torch.Tensor,
        indices: torch.Tensor,
        timestep: torch.Tensor,
        kv_cache: torch.Tensor,
        *context: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        context_dict = dict(zip(self.context_names, context))
        return self.adapter.pruned_forward(patches, indices, timestep, context_dict, kv_cache)


GRAPH_MODULES: dict[str, type[nn.Module]] = {"full": FullStep, "pruned": PrunedStep}
GRAPH_OUTPUTS: dict[str, tuple[str, ...]] = {"full": FULL_OUTPUTS, "pruned": PRUNED_OUTPUTS}


def step_module(graph: str, adapter: Adapter, context_names: list[str]) -> nn.Module:
    return GRAPH_MODULES[graph](adapter, context_names).eval()


def graph_spec(graph: str, inputs: dict[str, torch.Tensor], outputs: tuple[torch.Tensor, ...]) -> GraphSpec:
    """The I/O record of a graph from its example inputs and the eager outputs on them."""
    return GraphSpec(
        tuple(TensorSpec.of(name, tensor) for name, tensor in inputs.items()),
        tuple(TensorSpec.of(name, tensor) for name, tensor in zip(GRAPH_OUTPUTS[graph], outputs)),
    )
