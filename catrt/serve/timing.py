"""Per-phase timings of one pipeline call, from forward hooks on the transformer.

One transformer call is one denoising step under CAT Pruning, so timing the calls gives the full
and pruned step times without touching the pipeline; what runs before the first call is text
encoding and latent set-up, what runs after the last is VAE decoding and PNG encoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Abandoned(Exception):
    """Raised before a denoising step when nobody waits for the call's images any more."""


class StepTimer:
    """Wall time of each transformer call; on CUDA the device is synchronised before each reading.

    Its pre-call hook also asks `should_stop` (set per call by `reset`) before every step, which is
    how a call whose requests were all answered already (timed out, client gone) is abandoned. It
    records only between `reset` and `finish`: builds served together share one transformer, and
    each build's timer must see its own calls only.
    """

    def __init__(self, transformer: nn.Module, device: torch.device) -> None:
        self.device = device
        self.durations: list[float] = []
        self.first_start: float | None = None
        self.last_end: float | None = None
        self._started = 0.0
        self._should_stop: Callable[[], bool] | None = None
        self._active = False
        transformer.register_forward_pre_hook(self._before)
        transformer.register_forward_hook(self._after)

    def reset(self, should_stop: Callable[[], bool] | None = None) -> None:
        self.durations = []
        self.first_start = self.last_end = None
        self._should_stop = should_stop
        self._active = True

    def finish(self) -> None:
        """Stop recording until the next `reset`."""
        self._active = False
        self._should_stop = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _before(self, module: nn.Module, args: Any) -> None:
        if not self._active:
            return
        if self._should_stop is not None and self._should_stop():
            raise Abandoned(f"abandoned before step {len(self.durations) + 1}")
        self._started = self._now()
        if self.first_start is None:
            self.first_start = self._started

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._active:
            return
        self.last_end = self._now()
        self.durations.append(self.last_end - self._started)
