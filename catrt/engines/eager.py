"""The `eager` backend: the adapter itself, the reference every other backend is checked against."""

from __future__ import annotations

from typing import Any

import torch

from catrt.contract import FULL, PRUNED
from catrt.engines.base import Engine
from catrt.models.base import Context


class EagerEngine(Engine):
    """Runs the adapter's in-place step functions in PyTorch; bundles hold only the manifest."""

    name = "eager"
    package = "torch"
    needs_transformer = True
    capturable = True

    def load(self) -> None:
        self.functions: Any = self.adapter

    # The runtime's step functions: the adapter's own, after checking the build's shapes.

    def prepare_context(self, inputs: Context, latent_shape: tuple[int, ...]) -> Context:
        self.graphs["context"].check(inputs)
        with torch.no_grad():
            return self.functions.prepare_context(inputs, latent_shape)

    def full_forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, context: Context, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        self.graphs["full"].check(FULL.bind((hidden_states, timestep), context))
        with torch.no_grad():
            return self.functions.full_forward(hidden_states, timestep, context, kv_cache)

    def pruned_forward(
        self,
        patches: torch.Tensor,
        indices: torch.Tensor,
        timestep: torch.Tensor,
        context: Context,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        self.graphs[self.pruned_graph_for(indices)].check(PRUNED.bind((patches, indices, timestep, kv_cache), context))
        with torch.no_grad():
            return self.functions.pruned_forward(patches, indices, timestep, context, kv_cache)

    def run(
        self, graph: str, inputs: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """A graph's outputs from the in-place step functions (what the build verifies)."""
        with torch.no_grad():
            if graph == "context":
                latent_shape = self.graphs["full"].inputs[0].shape
                context = self.functions.prepare_context(inputs, latent_shape)
                outputs = {name: context[name] for name in (spec.name for spec in self.graphs["context"].outputs)}
            elif graph == "full":
                (hidden_states, timestep), context = FULL.split(inputs)
                kv = torch.empty(self.graphs["full"].output("kv").shape, dtype=hidden_states.dtype, device=self.device)
                tokens = self.functions.full_forward(hidden_states, timestep, context, kv)
                outputs = FULL.named_outputs((tokens, kv))
            else:
                (patches, indices, timestep, cache), context = PRUNED.split(inputs)
                cache = cache.clone()
                tokens = self.functions.pruned_forward(patches, indices, timestep, context, cache)
                index = indices.view(1, *indices.shape, 1).expand(cache.shape[0], -1, -1, cache.shape[-1])
                outputs = PRUNED.named_outputs((tokens, cache.gather(2, index)))
        for name, tensor in (out or {}).items():
            tensor.copy_(outputs[name])
        return outputs
