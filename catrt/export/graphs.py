"""The exportable modules: an adapter's context, full and pruned functions with flat tensor inputs.

Exporters need positional tensors, so dict arguments become inputs named after their keys, in the
order of the graph's example inputs. All of them (context, full, each alpha's pruned graph) wrap the
same transformer under the same attribute, so the graphs name each weight alike.
"""

from __future__ import annotations


import torch
from torch import nn

from catrt.contract import FULL, PRUNED
from catrt.engines.base import GraphSpec, TensorSpec
from catrt.models.base import Adapter


class _Step(nn.Module):
    """Holds the adapter (and its transformer, so the exporter names the weights alike in every graph)."""

    def __init__(self, adapter: Adapter, input_names: list[str], output_names: list[str]) -> None:
        super().__init__()
        self.transformer = adapter.transformer
        self.adapter = adapter
        self.input_names = input_names
        self.output_names = output_names

    def named(self, tensors: tuple[torch.Tensor, ...], skip: int) -> dict[str, torch.Tensor]:
        return dict(zip(self.input_names[skip:], tensors))


class ContextStep(_Step):
    """(*context inputs) -> the tensors `prepare_context` adds, at the build's latent shape."""

    def __init__(self, adapter: Adapter, input_names: list[str], output_names: list[str], latent_shape: tuple[int, ...]) -> None:
        super().__init__(adapter, input_names, output_names)
        self.latent_shape = latent_shape

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        context = self.adapter.prepare_context(self.named(inputs, 0), self.latent_shape)
        return tuple(context[name] for name in self.output_names)


class FullStep(_Step):
    """(hidden_states, timestep, *context) -> (tokens, kv)."""

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, *context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter.export_full(hidden_states, timestep, self.named(context, len(FULL.inputs)))


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
        return self.adapter.export_pruned(patches, indices, timestep, self.named(context, len(PRUNED.inputs)), kv_cache)


def step_module(
    graph: str, adapter: Adapter, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], latent_shape: tuple[int, ...]
) -> nn.Module:
    """The module whose export is `graph`, taking `inputs` in order and returning `outputs` in order."""
    names, output_names = list(inputs), list(outputs)
    if graph == "context":
        return ContextStep(adapter, names, output_names, latent_shape).eval()
    module = FullStep if graph == "full" else PrunedStep
    return module(adapter, names, output_names).eval()


def graph_spec(inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> GraphSpec:
    """The I/O record of a graph from its example inputs and the eager outputs on them."""
    return GraphSpec(
        tuple(TensorSpec.of(name, tensor) for name, tensor in inputs.items()),
        tuple(TensorSpec.of(name, tensor) for name, tensor in outputs.items()),
    )
