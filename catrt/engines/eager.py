"""The `eager` backend: the adapter itself, the reference every other backend is checked against."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from catrt.engines.base import Engine, split_inputs
from catrt.models.base import Context

logger = logging.getLogger(__name__)

StepCall = Callable[[object, list[torch.Tensor], Context], tuple[torch.Tensor, torch.Tensor]]

# How each graph's positional inputs map onto the adapter's (or a compiled copy's) signature.
_CALLS: dict[str, StepCall] = {
    "full": lambda functions, args, context: functions.full_forward(*args, context),
    "pruned": lambda functions, args, context: functions.pruned_forward(*args[:3], context, args[3]),
}


class EagerEngine(Engine):
    """Runs the adapter's functions in PyTorch; bundles hold only the manifest."""

    name = "eager"
    package = "torch"

    def load(self) -> None:
        self.functions: object = self.adapter

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args, context = split_inputs(graph, inputs)
        with torch.no_grad():
            outputs = _CALLS[graph](self.functions, args, context)
        return dict(zip((spec.name for spec in self.graphs[graph].outputs), outputs))
