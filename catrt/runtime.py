"""One generation's transformer calls under CAT Pruning: schedule, caches and selection.

The runtime is called once per denoising step with the latents the pipeline would give the
transformer. It keeps, on the latents' device and in buffers allocated at the first step:
the K/V cache (S, B, N, D), the output cache y_prev (B, N, p*p*C), the reference y_ref, the
clusters and the staleness statistics. Indices never leave the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Protocol

import torch

from catrt import selection
from catrt.clustering import cluster_adjacency, clustering_features, kmeans, pooled_cluster_scores
from catrt.config import CATConfig
from catrt.errors import ConfigError
from catrt.models.base import Adapter, AttentionRecorder, Context, Grid, patchify, unpatchify
from catrt.scheduler import StepKind, step_kind

logger = logging.getLogger(__name__)


class StepFunctions(Protocol):
    """The two graphs a backend runs; the eager adapter is the reference implementation."""

    def full_forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, context: Context
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def pruned_forward(
        self,
        patches: torch.Tensor,
        indices: torch.Tensor,
        timestep: torch.Tensor,
        context: Context,
        kv_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class StepRecord:
    """What one step did: `indices` (B, k) on pruned steps, else None."""

    step: int
    kind: StepKind
    indices: torch.Tensor | None


class CATRuntime:
    """Replaces the transformer's calls for one generation of `steps` steps."""

    def __init__(
        self,
        adapter: Adapter,
        config: CATConfig,
        steps: int,
        guidance: bool,
        functions: StepFunctions | None = None,
    ) -> None:
        config.check_steps(steps)
        self.adapter = adapter
        self.functions: StepFunctions = functions if functions is not None else adapter
        self.config = config
        self.steps = steps
        self.guidance = guidance
        self.step = 0
        self.trace: list[StepRecord] = []
        if config.rule == "attention" and self.functions is not adapter:
            raise ConfigError(
                "the attention rule needs attention maps, which only the eager backend exposes",
                field="rule",
                value=config.rule,
            )

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, call_kwargs: dict[str, Any]) -> torch.Tensor:
        """One denoising step: (B, C, H, W) latents -> (B, C_out, H, W) prediction."""
        self.step += 1
        if self.step > self.steps:
            raise ConfigError(
                f"the pipeline called the transformer {self.step} times for {self.steps} steps; catrt needs "
                f"exactly one transformer call per step (single-evaluation schedulers such as Euler or DPM-Solver)",
                field="num_inference_steps",
                value=self.steps,
            )
        if self.step == 1:
            self._start(hidden_states, call_kwargs)
        kind = step_kind(self.step, self.config.t0, self.config.refresh_every)
        recorder = AttentionRecorder() if self.config.rule == "attention" else None
        self.adapter.recorder = recorder
        try:
            indices = self._run_full(hidden_states, timestep) if kind == "full" else self._run_pruned(hidden_states, timestep)
        finally:
            self.adapter.recorder = None
        if recorder is not None:
            self.attention_importance = recorder.importance
        if self.config.trace:
            self.trace.append(StepRecord(self.step, kind, indices))
        if self.step == self.config.t0 - 1:
            self.reference = self._cond(self.output_cache).clone()
        if self.config.t0 <= self.step < self.steps:
            self.indices = self._select()
        return unpatchify(self.output_cache, self.grid, self.adapter.patch_size)

    # -- steps -------------------------------------------------------------------------------

    def _start(self, hidden_states: torch.Tensor, call_kwargs: dict[str, Any]) -> None:
        """Allocate every per-generation buffer once, from the first step's shapes."""
        batch_total, _, height, width = hidden_states.shape
        if self.guidance and batch_total % 2:
            raise ConfigError(f"classifier-free guidance needs an even batch, got {batch_total}", field="guidance_scale")
        self.batch = batch_total // 2 if self.guidance else batch_total
        self.grid: Grid = self.adapter.grid(height, width)
        num = self.grid.num_tokens
        self.k = self.config.num_selected(num)
        self.n_clusters = min(self.config.n_clusters, num)
        self.context = self.adapter.prepare_context(call_kwargs, hidden_states.shape)
        p = self.adapter.patch_size
        device, dtype = hidden_states.device, hidden_states.dtype
        self.kv_cache = torch.zeros(
            (self.adapter.num_kv_slots, batch_total, num, self.adapter.hidden_dim), device=device, dtype=dtype
        )
        self.output_cache = torch.zeros((batch_total, num, p * p * self.adapter.out_channels), device=device, dtype=dtype)
        self.staleness = torch.zeros((self.batch, num), device=device, dtype=torch.float32)
        self.last_computed = torch.zeros((self.batch, num), device=device, dtype=torch.long)
        self.generator = torch.Generator(device=device).manual_seed(self.config.seed)

    def _run_full(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> None:
        tokens, kv = self.functions.full_forward(hidden_states, timestep, self.context)
        self.kv_cache.copy_(kv)
        self.output_cache.copy_(tokens)
        self.last_computed.fill_(self.step)
        return None

    def _run_pruned(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        indices = self.indices
        both = torch.cat([indices, indices]) if self.guidance else indices  # cond and uncond share
        patches = patchify(hidden_states, self.adapter.patch_size)
        patches = patches.gather(1, both.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        tokens, rows = self.functions.pruned_forward(patches, both, timestep, self.context, self.kv_cache)
        slots = self.kv_cache.shape[0]
        self.kv_cache.scatter_(2, both.view(1, *both.shape, 1).expand(slots, -1, -1, rows.shape[-1]), rows)
        self.output_cache.scatter_(1, both.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), tokens)
        self.staleness = selection.update_staleness(self.staleness, indices, self.config.ewma_decay)
        self.last_computed.scatter_(1, indices, self.step)
        return indices

    def _cond(self, tokens: torch.Tensor) -> torch.Tensor:
        """The conditional half under guidance (diffusers stacks [uncond, cond]); scoring uses it."""
        return tokens[self.batch :] if self.guidance else tokens

    # -- selection ---------------------------------------------------------------------------

    def _select(self) -> torch.Tensor:
        """Indices (B, k) for the next step, from this step's output cache."""
        output = self._cond(self.output_cache)
        baseline = BASELINE_RULES.get(self.config.rule)
        if baseline is not None:
            return baseline(self, output)
        if self.step == self.config.t0:
            delta, magnitude = selection.relative_magnitude(output, self.reference)
            return self._select_first(output, delta, magnitude)
        return selection.select_cat_step(
            output,
            self.reference,
            self.labels,
            self.staleness,
            self.last_computed,
            k=self.k,
            n_clusters=self.n_clusters,
            magnitude_fraction=self.config.magnitude_fraction,
        )

    def _select_first(self, output: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """Step t0: cluster once (features 0.05 * y_t0 + P), then the pooled first selection."""
        features = clustering_features(output.float(), self.grid)
        self.labels, _ = kmeans(features, self.n_clusters, self.config.kmeans_iters, self.generator)
        adjacency = cluster_adjacency(self.labels, self.grid, self.n_clusters)
        pooled = pooled_cluster_scores(delta, self.labels, adjacency, self.n_clusters)
        return selection.select_first(magnitude, self.labels, pooled, self.k)


# Baselines for bench/: the same k and schedule, another rule. Each maps (runtime, cond outputs) -> (B, k).
BASELINE_RULES: dict[str, Callable[[CATRuntime, torch.Tensor], torch.Tensor]] = {
    "random": lambda rt, out: selection.select_random(rt.batch, rt.grid.num_tokens, rt.k, rt.generator, out.device),
    "round_robin": lambda rt, out: selection.take_first(selection.staleness_ranks(rt.staleness, rt.last_computed), rt.k),
    "sequential": lambda rt, out: selection.select_sequential(
        rt.batch, rt.grid.num_tokens, rt.k, rt.step - rt.config.t0, out.device
    ),
    "magnitude": lambda rt, out: selection.select_top(selection.relative_magnitude(out, rt.reference)[1], rt.k),
    "attention": lambda rt, out: selection.select_top(rt._cond(rt.attention_importance), rt.k),
}
