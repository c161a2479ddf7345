"""One generation's transformer calls under CAT Pruning: schedule, caches and selection.

The runtime is called once per denoising step with the latents the pipeline would give the
transformer. Everything a step reads or writes lives in a `StepState` allocated once per shape and
kept in `RuntimeBuffers` across generations (catrt/step_state.py): the step's inputs (latents,
timestep, context), the K/V cache (S, B, N, D), the output cache (B, N, p*p*C), the prediction it
returns, the float32 reference and staleness statistics, the clusters and the next step's indices.
Indices never leave the device. The state does not depend on alpha: only the indices (one buffer per
k) and the captured graphs differ between alphas, so serving several alphas costs one K/V cache, not
one per alpha. `RuntimeBuffers` keeps the states of the few shapes used last (a library user who
tries many sizes or batch sizes does not accumulate a K/V cache per shape).

Each step is a *program* over those buffers: a full step (the forward writes every K/V row) and a
pruned step (gather the selected patches, the forward writes their K/V rows in place, scatter the
outputs, update staleness, select the next step's tokens). With `cuda_graphs` each program runs once
eagerly (warm-up: compilation, cuBLAS plans), is then captured as one CUDA graph (`CapturedStep`,
catrt/cuda_graphs.py) and replayed for every later step of every generation of the same shape.
KMeans at step t0 runs outside any graph. The full step reads no pruning setting, so one full graph
serves every alpha; a pruned graph is per k (and config). All graphs of a state share one memory
pool: each program writes its results into the state's buffers, made outside any capture, so a graph
leaves nothing behind in the pool that another could overwrite, and one stream never replays two at once.

A reused step (`CATConfig.reuse_every`, see catrt/scheduler.py) copies its inputs into the state like
any step but runs no program: no forward, no selection, no cache write. It returns the prediction
buffer as the last computed step left it. Staleness and `last_computed` count computed steps only,
so a reused step changes neither, and the next pruned step computes the indices selected after the
last computed step.

`CATConfig.reuse_threshold` (a First-Block-Cache-style baseline for bench/) turns a would-be pruned
step into a reused one when the first block's residual on all tokens moved less than the threshold
since the last computed step. The decision reads a number on the host every step, so it runs with
the eager adapter only, never in an engine or a captured graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from catrt import selection
from catrt.clustering import cluster_adjacency, clustering_features, kmeans, pooled_cluster_scores
from catrt.config import CATConfig
from catrt.contract import StepFunctions
from catrt.cuda_graphs import CapturedStep
from catrt.errors import ConfigError
from catrt.models.attention import AttentionRecorder
from catrt.models.base import Adapter, Context
from catrt.tokens import Grid
from catrt.scheduler import StepKind, step_kind
from catrt.step_state import MAX_KEPT_ALPHAS, RuntimeBuffers, StepState

#: The runtime's own names, with the step contract, the step state and the CUDA-graph step that moved to modules
#: of their own (`catrt.contract`, `catrt.step_state`, `catrt.cuda_graphs`) and stay importable from here.
__all__ = [
    "BASELINE_RULES", "CAPTURABLE_RULES", "CATRuntime", "CapturedStep", "MAX_KEPT_ALPHAS", "RuntimeBuffers",
    "StepFunctions", "StepRecord", "StepState",
]

logger = logging.getLogger(__name__)

#: Rules whose selection is pure tensor maths over the state buffers, so a pruned step can be captured.
CAPTURABLE_RULES: frozenset[str] = frozenset({"cat", "round_robin", "magnitude"})


@dataclass
class StepRecord:
    """What one step did: `kind` full, pruned or reused; `indices` (B, k) on pruned steps, else None;
    `change` the first block's relative change where `reuse_threshold` decided the step, else None."""

    step: int
    kind: StepKind
    indices: torch.Tensor | None
    change: float | None = None


def refuse_eager_only_rules(config: CATConfig) -> None:
    """Refuse, for step functions other than the eager adapter (an engine, the compiled steps), the settings only the
    adapter's own forwards compute: `accelerate` calls it before compiling, the runtime at each generation."""
    if config.rule == "attention":
        raise ConfigError(
            "the attention rule needs attention maps, which only the eager backend exposes",
            field="rule",
            value=config.rule,
        )
    if config.reuse_threshold:
        raise ConfigError(
            "reuse_threshold decides each step on the host from the first block's output, which only the eager "
            "backend computes; engines run a static schedule: use reuse_every",
            field="reuse_threshold",
            value=config.reuse_threshold,
        )


class CATRuntime:
    """Replaces the transformer's calls for one generation of `steps` steps.

    Args:
        adapter: the model family's adapter (shapes, context inputs; the eager step functions).
        config: the pruning settings.
        steps: transformer calls this generation makes.
        guidance: whether the batch stacks [uncond, cond] rows: the pipeline spec's `doubles_batch`
            (classifier-free guidance; never for a distilled guidance embedding such as FLUX-dev's).
        functions: the step functions to run (an engine); the adapter by default.
        buffers: persistent state to reuse across generations; a private one by default.
        cuda_graphs: capture each step program as a CUDA graph; None = what `functions` prefers
            (its `cuda_graphs` attribute) on a CUDA device, off elsewhere.
        grid: the token grid, for adapters whose latents do not carry it (packed latents: the
            pipeline spec's `token_grid` of the call); ignored where the latents' shape gives it.
        edited_between_steps: whether anything may write the transformer's inputs in place between steps (a
            pipeline's step-end callback, a hook on the transformer). An inference tensor (`torch.inference_mode`)
            keeps no write count, so its context is then made again every step; False compares it by identity only,
            as nothing else can reach it (PixArt's cross-attention K/V of every block are not remade each step).
    """

    def __init__(
        self,
        adapter: Adapter,
        config: CATConfig,
        steps: int,
        guidance: bool,
        functions: StepFunctions | None = None,
        buffers: RuntimeBuffers | None = None,
        cuda_graphs: bool | None = None,
        grid: Grid | None = None,
        edited_between_steps: bool = True,
    ) -> None:
        config.check_steps(steps)
        self.edited_between_steps = edited_between_steps
        self.given_grid = grid
        self.adapter = adapter
        self.functions: StepFunctions = functions if functions is not None else adapter
        self.config = config
        self.steps = steps
        self.guidance = guidance
        self.buffers = buffers if buffers is not None else RuntimeBuffers()
        self.cuda_graphs = cuda_graphs
        self.step = 0
        self.trace: list[StepRecord] = []
        if self.functions is not adapter:
            refuse_eager_only_rules(config)
        self._first_block: torch.Tensor | None = None  # the residual at the last computed step (reuse_threshold)

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, call_kwargs: dict[str, Any]) -> torch.Tensor:
        """One denoising step: latents -> the prediction of the same layout (`Adapter.prediction_of`).

        The prediction is a buffer the next step overwrites: use it before calling again.
        """
        self.step += 1
        if self.step > self.steps:
            raise ConfigError(
                f"the pipeline called the transformer {self.step} times for {self.steps} steps; catrt needs "
                f"exactly one transformer call per step (single-evaluation schedulers such as Euler or DPM-Solver)",
                field="num_inference_steps",
                value=self.steps,
            )
        if self.step == 1:
            self._start(hidden_states, timestep, call_kwargs)
        else:
            self._follow(hidden_states, timestep, call_kwargs)
        state = self.state
        state.latents.copy_(hidden_states)
        state.timestep.copy_(timestep)
        state.step_index.fill_(self.step)
        kind = step_kind(self.step, self.config.t0, self.config.refresh_every, self.config.reuse_every)
        change = None
        if self.config.reuse_threshold and kind != "reused" and self.step >= self.config.t0:
            kind, change = self._first_block_decision(kind)
        used = self.indices.clone() if self.config.trace and kind == "pruned" else None
        if kind != "reused":  # a reused step returns the last prediction as it is
            self.adapter.recorder = AttentionRecorder() if self.config.rule == "attention" else None
            try:
                self._run(kind)
                if kind == "full":
                    self._after_full_step()
            finally:
                self.adapter.recorder = None
        if self.config.trace:
            self.trace.append(StepRecord(self.step, kind, used, change))
        return state.prediction

    # -- set-up ------------------------------------------------------------------------------

    def _start(self, hidden_states: torch.Tensor, timestep: torch.Tensor, call_kwargs: dict[str, Any]) -> None:
        """Find (or allocate) this shape's state and copy the generation's context into it."""
        batch_total = hidden_states.shape[0]
        if self.guidance and batch_total % 2:
            raise ConfigError(f"classifier-free guidance needs an even batch, got {batch_total}", field="guidance_scale")
        self.batch = batch_total // 2 if self.guidance else batch_total
        self.grid: Grid = self._grid(hidden_states)
        self.k = self.config.num_selected(self.grid.num_tokens)
        self.n_clusters = min(self.config.n_clusters, self.grid.num_tokens)
        self.capture = self._wants_capture(hidden_states.device)
        inputs = self.adapter.context_inputs(call_kwargs)
        key = (
            tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device, tuple(timestep.shape), timestep.dtype,
            tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in sorted(inputs.items())), self.guidance,
            # the transformer, and its cache layout: pipelines of other transformers may share one RuntimeBuffers, and
            # their calls run at once (each transformer's are one at a time): one state each, never one for both
            id(self.adapter.transformer), (self.adapter.num_kv_slots, self.adapter.hidden_dim, self.adapter.token_out_channels),
        )
        context = self.functions.prepare_context(inputs, tuple(hidden_states.shape))
        self.state = self.buffers.state(key, lambda: self._allocate(hidden_states, timestep, context))
        if self.capture:
            self.state.follow_weights(_addresses(self.adapter.transformer))
        self.indices = self.state.indices_for(self.k)
        self._set_context(context)
        self._inputs_seen = self._as_seen(call_kwargs)
        self.state.staleness.zero_()
        self.state.last_computed.zero_()
        self.generator = torch.Generator(device=hidden_states.device).manual_seed(self.config.seed)

    def _follow(self, hidden_states: torch.Tensor, timestep: torch.Tensor, call_kwargs: dict[str, Any]) -> None:
        """A later step: the shapes of step 1, and the context re-made where its inputs are other objects or written.

        A `callback_on_step_end` may swap the prompt embeddings mid-generation (the transformer then reads
        the new ones), or edit them in place (the same tensor, new values: its in-place write count moved), or
        drop the unconditional rows (a dynamic-guidance callback): the first two are taken up, the last cannot
        run on this generation's caches and is refused, where a copy would broadcast.
        """
        state = self.state
        if hidden_states.shape != state.latents.shape or timestep.shape != state.timestep.shape:
            raise ConfigError(
                f"the transformer's input changed shape at step {self.step}, from {tuple(state.latents.shape)} to "
                f"{tuple(hidden_states.shape)} (a callback_on_step_end that turns guidance off or changes the batch?); "
                f"catrt's caches are made for one batch and size per generation: keep them for every step",
                field="callback_on_step_end", value=tuple(hidden_states.shape),
            )
        seen = self._as_seen(call_kwargs)
        if seen == self._inputs_seen:
            return
        self._inputs_seen = seen
        inputs = self.adapter.context_inputs(call_kwargs)
        self._set_context(self.functions.prepare_context(inputs, tuple(hidden_states.shape)))

    def _as_seen(self, call_kwargs: dict[str, Any]) -> dict[str, _Seen]:
        return {name: _Seen(value, by_identity=not self.edited_between_steps) for name, value in call_kwargs.items()}

    def _set_context(self, context: Context) -> None:
        """Copy a prepared context into the state, whose tensors were made for the generation's first one."""
        state = self.state
        for name in sorted(set(context) | set(state.context)):
            if name not in context or name not in state.context or context[name].shape != state.context[name].shape:
                raise ConfigError(
                    f"the transformer's context input {name!r} is missing or has another shape than at step 1 (a "
                    f"callback_on_step_end that changes the prompt embeddings' shapes?); catrt's caches are made for "
                    f"one context shape per generation: keep those shapes for every step",
                    field=name,
                )
            state.context[name].copy_(context[name])

    def _grid(self, hidden_states: torch.Tensor) -> Grid:
        """The latents' own grid, else the one given (packed latents), checked against the token count."""
        grid = self.adapter.latent_grid(hidden_states)
        if grid is not None:
            return grid
        if self.given_grid is None:
            raise ConfigError(
                f"{type(self.adapter).__name__} latents do not carry their token grid: pass CATRuntime(grid=...) (a pipeline's "
                f"PipelineSpec.token_grid gives it to accelerate)", field="grid"
            )
        num_tokens = self.adapter.tokens_of(hidden_states).shape[1]
        if self.given_grid.num_tokens != num_tokens:
            raise ConfigError(
                f"the latents have {num_tokens} tokens, the grid {self.given_grid.height}x{self.given_grid.width} has "
                f"{self.given_grid.num_tokens}; pass the call's height and width",
                field="height", value=(self.given_grid.height, self.given_grid.width),
            )
        return self.given_grid

    def _wants_capture(self, device: torch.device) -> bool:
        wanted = self.cuda_graphs if self.cuda_graphs is not None else getattr(self.functions, "cuda_graphs", False)
        if not wanted:
            return False
        if self.cuda_graphs and self.config.reuse_threshold:
            raise ConfigError(
                "reuse_threshold decides each step on the host; CUDA graphs take static schedules only (use reuse_every)",
                field="cuda_graphs",
            )
        if self.cuda_graphs and device.type != "cuda":
            raise ConfigError(f"cuda_graphs needs a CUDA device, the latents are on {device}", field="cuda_graphs")
        if self.cuda_graphs and not getattr(self.functions, "capturable", True):
            raise ConfigError(f"{type(self.functions).__name__} steps cannot be captured as CUDA graphs", field="cuda_graphs")
        if self.cuda_graphs and self.config.rule not in CAPTURABLE_RULES:
            raise ConfigError(
                f"rule {self.config.rule!r} needs the host between steps; CUDA graphs take {sorted(CAPTURABLE_RULES)}",
                field="cuda_graphs",
            )
        return device.type == "cuda" and self.config.rule in CAPTURABLE_RULES and not self.config.reuse_threshold

    def _allocate(self, hidden_states: torch.Tensor, timestep: torch.Tensor, context: Context) -> StepState:
        adapter, device, dtype = self.adapter, hidden_states.device, hidden_states.dtype
        batch_total, num = hidden_states.shape[0], self.grid.num_tokens
        channels = adapter.token_out_channels
        logger.info("allocating step buffers for latents %s %s", tuple(hidden_states.shape), dtype)

        def per_prompt(dtype: torch.dtype, *shape: int) -> torch.Tensor:
            return torch.zeros((self.batch, *shape), device=device, dtype=dtype)

        return StepState(
            latents=torch.empty_like(hidden_states),
            timestep=torch.empty_like(timestep),
            context={name: torch.empty_like(tensor) for name, tensor in context.items()},
            kv_cache=torch.zeros((adapter.num_kv_slots, batch_total, num, adapter.hidden_dim), device=device, dtype=dtype),
            output_cache=torch.zeros((batch_total, num, channels), device=device, dtype=dtype),
            prediction=torch.zeros(adapter.prediction_shape(tuple(hidden_states.shape)), device=device, dtype=dtype),
            reference=per_prompt(torch.float32, num, channels),
            staleness=per_prompt(torch.float32, num),
            last_computed=per_prompt(torch.long, num),
            labels=per_prompt(torch.long, num),
            step_index=torch.zeros((), device=device, dtype=torch.long),
        )

    # -- steps -------------------------------------------------------------------------------

    def _first_block_decision(self, kind: StepKind) -> tuple[StepKind, float | None]:
        """First-Block-Cache style: a would-be pruned step is reused when the first block's residual (all
        tokens, all rows) moved less than the threshold since the last computed step.

        A full step (t0, refreshes) only records its residual as the new reference; an implementation
        would take it from the full forward. Returns the step's kind and, where it decided, the change.
        """
        state = self.state
        residual = self.adapter.first_block_residual(state.latents, state.timestep, state.context).float()
        last = self._first_block
        if kind == "full" or last is None:
            self._first_block = residual
            return kind, None
        change = float((residual - last).abs().mean() / last.abs().mean().clamp_min(1e-12))
        if change < self.config.reuse_threshold:
            return "reused", change
        self._first_block = residual
        return kind, change

    def _run(self, kind: StepKind) -> None:
        """Run (or replay) the full or pruned step program; reused steps never get here."""
        program = self._full_program if kind == "full" else self._pruned_program
        if not self.capture:
            program()
            return
        key = ("full", self.functions) if kind == "full" else ("pruned", self.k, self.functions, self.config)
        self.state.graph(key, program)()

    def _full_program(self) -> None:
        state = self.state
        tokens = self.functions.full_forward(state.latents, state.timestep, state.context, state.kv_cache)
        state.output_cache.copy_(tokens)
        state.last_computed.copy_(state.step_index.expand_as(state.last_computed))
        state.prediction.copy_(self.adapter.prediction_of(state.output_cache, self.grid))

    def _pruned_program(self) -> None:
        """The whole pruned step, selection of the next step's tokens included (one CUDA graph)."""
        state = self.state
        indices = self.indices
        both = torch.cat([indices, indices]) if self.guidance else indices  # cond and uncond share
        patches = self.adapter.tokens_of(state.latents)
        patches = patches.gather(1, both.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        tokens = self.functions.pruned_forward(patches, both, state.timestep, state.context, state.kv_cache)
        state.output_cache.scatter_(1, both.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), tokens)
        state.staleness.copy_(selection.update_staleness(state.staleness, indices, self.config.ewma_decay))
        state.last_computed.scatter_(1, indices, state.step_index.expand_as(indices))
        state.prediction.copy_(self.adapter.prediction_of(state.output_cache, self.grid))
        indices.copy_(self._select())

    def _after_full_step(self) -> None:
        """Outside any graph: keep the reference at t0 - 1, cluster at t0, select after a refresh step."""
        t0 = self.config.t0
        if self.step == t0 - 1:
            self.state.reference.copy_(self._cond(self.state.output_cache))
        if self.step == t0:
            self.indices.copy_(self._select_first())
        elif t0 < self.step < self.steps:
            self.indices.copy_(self._select())

    def _cond(self, tokens: torch.Tensor) -> torch.Tensor:
        """The conditional half under guidance (diffusers stacks [uncond, cond]) in float32: scoring uses it."""
        return (tokens[self.batch :] if self.guidance else tokens).float()

    # -- selection ---------------------------------------------------------------------------

    def _select(self) -> torch.Tensor:
        """Indices (B, k) for the next step, from this step's output cache (scored in float32)."""
        output = self._cond(self.state.output_cache)
        baseline = BASELINE_RULES.get(self.config.rule)
        if baseline is not None:
            return baseline(self, output)
        state = self.state
        return selection.select_cat_step(
            output,
            state.reference,
            state.labels,
            state.staleness,
            state.last_computed,
            k=self.k,
            n_clusters=self.n_clusters,
            magnitude_fraction=self.config.magnitude_fraction,
        )

    def _select_first(self) -> torch.Tensor:
        """Step t0: cluster once (features 0.05 * y_t0 + P), then the pooled first selection."""
        if self.config.rule in BASELINE_RULES:
            return self._select()
        output = self._cond(self.state.output_cache)
        delta, magnitude = selection.relative_magnitude(output, self.state.reference)
        labels, _ = kmeans(clustering_features(output, self.grid), self.n_clusters, self.config.kmeans_iters, self.generator)
        self.state.labels.copy_(labels)
        adjacency = cluster_adjacency(labels, self.grid, self.n_clusters)
        pooled = pooled_cluster_scores(delta, labels, adjacency, self.n_clusters)
        return selection.select_first(magnitude, labels, pooled, self.k)


class _Seen:
    """One transformer argument as a step saw it: the object itself, and for a tensor its in-place write count.

    Equal to a later step's only where the context made from it still holds: the same object (a callback's new
    prompt embeddings are another one) not written in place since (a callback's `prompt_embeds.mul_(0.5)` moves
    the count). An inference tensor (made under `torch.inference_mode`) keeps no count: never equal where something
    may write it between steps (`by_identity` False), so its context is made again each step rather than kept from
    values it may no longer hold; else the same object is equal.
    """

    __slots__ = ("value", "version")

    def __init__(self, value: Any, by_identity: bool = False) -> None:
        self.value = value
        self.version: int | None = None
        if isinstance(value, torch.Tensor):
            self.version = (_NO_COUNT if by_identity else None) if value.is_inference() else value._version

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Seen) or self.value is not other.value:
            return False
        return not isinstance(self.value, torch.Tensor) or (self.version is not None and self.version == other.version)

    __hash__ = None  # type: ignore[assignment]


_NO_COUNT = -1  # the version of an inference tensor nothing writes between steps: the object alone is compared


def _addresses(module: torch.nn.Module) -> tuple[int, ...]:
    """Where each of the module's weights and buffers lies (what a captured graph reads): a tensor without storage of
    its own (a quantized weight's wrapper subclass) by its object."""
    addresses = []
    for tensor in (*module.parameters(), *module.buffers()):
        try:
            addresses.append(tensor.data_ptr())
        except RuntimeError:
            addresses.append(id(tensor))
    return tuple(addresses)


# Baselines for bench/: the same k and schedule, another rule. Each maps (runtime, cond outputs) -> (B, k).
BASELINE_RULES: dict[str, Callable[[CATRuntime, torch.Tensor], torch.Tensor]] = {
    "random": lambda rt, out: selection.select_random(rt.batch, rt.grid.num_tokens, rt.k, rt.generator, out.device),
    "round_robin": lambda rt, out: selection.take_first(
        selection.staleness_ranks(rt.state.staleness, rt.state.last_computed), rt.k
    ),
    "sequential": lambda rt, out: selection.select_sequential(
        rt.batch, rt.grid.num_tokens, rt.k, rt.step - rt.config.t0, out.device
    ),
    "magnitude": lambda rt, out: selection.select_top(selection.relative_magnitude(out, rt.state.reference)[1], rt.k),
    "attention": lambda rt, out: selection.select_top(rt._cond(rt.adapter.recorder.importance), rt.k),
}
