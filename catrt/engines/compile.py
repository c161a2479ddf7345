"""The `compile` backend: `torch.compile` (inductor) of the adapter's two functions.

On CUDA it uses mode "reduce-overhead" (CUDA graphs): the runtime copies every output into its own
buffers before the next step, so replayed output memory is never read stale.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from catrt.engines.eager import EagerEngine

logger = logging.getLogger(__name__)

_MODES: dict[str, str] = {"cuda": "reduce-overhead", "cpu": "default"}


class CompileEngine(EagerEngine):
    """The eager engine with both step functions compiled for static shapes."""

    name = "compile"
    gpu_only_in_auto = True

    def load(self) -> None:
        mode = _MODES.get(self.device.type, "default")
        logger.info("torch.compile of the step functions, mode %s", mode)
        self.functions = SimpleNamespace(
            full_forward=torch.compile(self.adapter.full_forward, mode=mode, dynamic=False),
            pruned_forward=torch.compile(self.adapter.pruned_forward, mode=mode, dynamic=False),
        )
