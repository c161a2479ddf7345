"""Per-phase timings of one pipeline call, from forward hooks on the transformer.

One transformer call is one denoising step under CAT Pruning, so timing the calls gives the full
and pruned step times without touching the pipeline; what runs before the first call is text
encoding and latent set-up, what runs after the last is VAE decoding and PNG encoding.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class StepTimer:
    """Wall time of each transformer call; on CUDA the device is synchronised before each reading."""

    def __init__(self, transformer: nn.Module, device: torch.device) -> None:
        self.device = device
        self.durations: list[float] = []
        self.first_start: float | None = None
        self.last_end: float | None = None
        self._started = 0.0
        transformer.register_forward_pre_hook(self._before)
        transformer.register_forward_hook(self._after)

    def reset(self) -> None:
        self.durations = []
        self.first_start = self.last_end = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _before(self, module: nn.Module, args: Any) -> None:
        self._started = self._now()
        if self.first_start is None:
            self.first_start = self._started

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        self.last_end = self._now()
        self.durations.append(self.last_end - self._started)
