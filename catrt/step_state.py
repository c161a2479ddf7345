"""The device buffers a generation's steps read and write, allocated once per shape and kept across generations.

A `StepState` holds everything a step program touches: the step's inputs (latents, timestep, context),
the K/V cache (S, B, N, D), the output cache (B, N, p*p*C), the prediction the runtime returns, the
float32 reference and staleness statistics, the clusters and the next step's indices. The state does
not depend on alpha: only the indices (one buffer per k) and the captured graphs differ between
alphas, so serving several alphas costs one K/V cache, not one per alpha. `RuntimeBuffers` keeps the
states of the few shapes used last (a library user who tries many sizes or batch sizes does not
accumulate a K/V cache per shape). catrt/runtime.py runs the steps over them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from catrt.checks import MAX_KEPT_ALPHAS
from catrt.contract import Context
from catrt.cuda_graphs import CapturedStep
from catrt.errors import ConfigError, echo

logger = logging.getLogger(__name__)


@dataclass
class StepState:
    """Every tensor the step programs read or write; allocated once per shape, reused by every generation."""

    latents: torch.Tensor  # the step's input: (B, C, H, W), or (B, N, C) packed
    timestep: torch.Tensor  # (B,)
    context: Context  # the prepared context, copied in once per generation
    kv_cache: torch.Tensor  # (S, B, N, D)
    output_cache: torch.Tensor  # (B, N, C_token_out)
    prediction: torch.Tensor  # the adapter's prediction_of(output_cache), what the runtime returns
    reference: torch.Tensor  # (B', N, C_token_out) float32, cond rows at step t0 - 1
    staleness: torch.Tensor  # (B', N) float32 EWMA of selection
    last_computed: torch.Tensor  # (B', N) int64 step each token was last computed
    labels: torch.Tensor  # (B', N) int64 clusters made at t0
    step_index: torch.Tensor  # () int64, the current step, read by the programs
    selected: OrderedDict[int, torch.Tensor] = field(default_factory=OrderedDict)  # k -> (B', k) int64, the next pruned step's tokens
    graphs: OrderedDict[tuple[Any, ...], CapturedStep] = field(default_factory=OrderedDict)
    pool: Any = None  # the CUDA graph memory pool every capture of this state shares (made at the first)
    weights: tuple[int, ...] | None = None  # where the transformer's weights lay when `graphs` were captured

    def follow_weights(self, weights: tuple[int, ...]) -> None:
        """Drop the captured graphs if the transformer's weights lie elsewhere than when they were captured: a graph
        replays the addresses it read, so weights loaded anew (`load_state_dict(assign=True)`, a LoRA loaded or
        unloaded, `pipe.to("cpu")` then back) were replayed from memory freed since: the old weights, or garbage."""
        if weights != self.weights and self.graphs:
            logger.info("the transformer's weights moved since its steps were captured: capturing them again")
            self.graphs.clear()
        self.weights = weights

    def indices_for(self, k: int) -> torch.Tensor:
        """The buffer of the next pruned step's k tokens per prompt, made at the first generation with this k.

        At most `MAX_KEPT_ALPHAS` buffers are kept: a process that calls with ever new alphas drops the
        k used longest ago, with the captured graphs that read its buffer's address.
        """
        if k in self.selected:
            self.selected.move_to_end(k)
            return self.selected[k]
        while len(self.selected) >= MAX_KEPT_ALPHAS:
            dropped, _ = self.selected.popitem(last=False)
            for key in [key for key in self.graphs if key[:2] == ("pruned", dropped)]:
                del self.graphs[key]
            logger.info("dropping the indices and graphs of k = %d (the least recently used of %d)", dropped, MAX_KEPT_ALPHAS)
        with torch.inference_mode(False):  # as the state's own tensors (see RuntimeBuffers.state)
            rows, device = self.staleness.shape[0], self.staleness.device
            self.selected[k] = torch.arange(k, device=device).expand(rows, -1).contiguous()
        return self.selected[k]

    def graph(self, key: tuple[Any, ...], program: Callable[[], None]) -> CapturedStep:
        """The captured step of `key`, made (to be warmed up and captured) at its first use.

        Keys are ("full", functions) - the full step reads no pruning setting, so every alpha replays
        one graph - and ("pruned", k, functions, config). At most `MAX_KEPT_ALPHAS` pruned graphs are
        kept; the one replayed longest ago is dropped.
        """
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return self.graphs[key]
        pruned = [name for name in self.graphs if name[0] == "pruned"]
        if key[0] == "pruned" and len(pruned) >= MAX_KEPT_ALPHAS:
            del self.graphs[pruned[0]]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        self.graphs[key] = CapturedStep(program, self.latents.device, self.pool)
        return self.graphs[key]


class RuntimeBuffers:
    """Step states by shape, kept across generations (one per pipeline or engine; pipelines given one share it).

    A generation reuses the state of an earlier one with the same shapes and transformer (another transformer's
    calls may run at the same time, on another thread: never on the same state), so steady-state steps
    allocate nothing and captured CUDA graphs stay valid. At most `max_shapes` states are kept: the one
    used longest ago is dropped (with its captured graphs) when another shape comes, so a process that
    runs many sizes or batch sizes holds the caches of the last few only (SD3.5-large's K/V cache at
    1024x1024 with guidance is about 3 GiB in bf16).
    """

    def __init__(self, max_shapes: int = 4) -> None:
        if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
            raise ConfigError(f"max_shapes must be an integer >= 1, got {echo(max_shapes)}", field="max_shapes", value=max_shapes)
        self.max_shapes = max_shapes
        self._states: OrderedDict[tuple[Any, ...], StepState] = OrderedDict()

    def state(self, key: tuple[Any, ...], allocate: Callable[[], StepState]) -> StepState:
        if key in self._states:
            self._states.move_to_end(key)
            return self._states[key]
        while len(self._states) >= self.max_shapes:
            dropped, old = self._states.popitem(last=False)
            # Each captured program is a bound method of a runtime that holds this state: a reference cycle
            # that would keep the caches (GiBs on a GPU) and the graphs' memory pools alive until Python's
            # cyclic collector happens to run. Dropping the graphs breaks it, so they are freed now.
            old.graphs.clear()
            logger.info("dropping the step buffers of latents %s (the least recently used of %d shapes)", dropped[0], self.max_shapes)
        # Normal tensors even when this call runs under torch.inference_mode: a later call outside it
        # could not update inference tensors in place.
        with torch.inference_mode(False):
            self._states[key] = allocate()
        return self._states[key]

    def __len__(self) -> int:
        return len(self._states)
