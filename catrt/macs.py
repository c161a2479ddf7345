"""MAC counts of the transformer per step, full and pruned, on the meta device (no weights).

A MAC is half a FLOP as torch's FlopCounterMode counts them (matmuls, convolutions, attention).
The unpruned baseline is diffusers' own transformer forward; the pruned schedule pays once per
generation for its context (for PixArt the cross-attention K/V), then its full steps (t0 plus any
refresh steps, counted as catrt runs them on that context, not diffusers' forward, which would count the
context again: an all-full schedule came out above 1) and its pruned steps; reused steps (`reuse_every`) run
no transformer and cost nothing.
`StepMacs.traced` counts a generation from its trace, for schedules only a run knows (`reuse_threshold`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from catrt.config import CATConfig
from catrt.errors import ConfigError, UnsupportedModelError, echo
from catrt.model_cards import MODEL_CARDS, ModelCard
from catrt.models import family_of, make_adapter
from catrt.runtime import StepRecord
from catrt.scheduler import plan
from catrt.tokens import Grid


@dataclass(frozen=True)
class MacReport:
    """Per image MACs of one generation's transformer work.

    The step counts follow the plan (catrt/scheduler.py): `full_steps` + `pruned_steps` +
    `reused_steps` == `steps`; a reused step costs 0 transformer MACs.
    """

    num_tokens: int
    k: int
    full_step: int  # diffusers' unpruned forward
    context_full_step: int  # catrt's full step on the context made once (PixArt does not make its K/V again)
    pruned_step: int
    context: int  # once per generation under catrt
    steps: int
    full_steps: int
    reused_steps: int = 0

    @property
    def pruned_steps(self) -> int:
        return self.steps - self.full_steps - self.reused_steps

    @property
    def schedule_macs(self) -> int:
        """catrt's MACs for the whole generation: context once, then the full and pruned steps."""
        return self.context + self.full_steps * self.context_full_step + self.pruned_steps * self.pruned_step

    @property
    def schedule_ratio(self) -> float:
        """`schedule_macs` over the unpruned pipeline's `steps` full forwards."""
        return self.schedule_macs / (self.steps * self.full_step)


def _cpu_sdpa_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any,
                    out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of the CPU flash-attention kernel, which FlopCounterMode has no formula for (it counted 0)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Real CPU tensors run attention through this op, meta ones through bmm: without it `catrt compare`'s
# trace-based MAC ratio on the CPU left attention out, and disagreed with `catrt macs`.
_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CUSTOM_FLOPS = {_CPU_ATTENTION: _cpu_sdpa_flops} if _CPU_ATTENTION is not None else {}


def count_macs(fn: Any, *args: Any) -> int:
    """MACs of one call, counted by torch's FlopCounterMode (FLOPs / 2)."""
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


def meta_inputs(card: ModelCard, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Batch-1 meta tensors shaped like one denoising step's transformer call (the family's `meta_call`)."""
    family = family_of(card.family)
    if family.meta_call is None:
        raise UnsupportedModelError(
            f"model {card.name}: family {family.name!r} registers no meta_call, which MAC counting needs (a function of the "
            f"transformer config, text tokens and token grid returning one step's meta-device call arguments)",
            field="model", value=card.name,
        )
    kwargs = dict(family.meta_call(card.transformer_config, card.text_tokens, grid))
    return kwargs.pop("hidden_states"), kwargs.pop("timestep"), kwargs


def transformer_macs(
    transformer: torch.nn.Module, card: ModelCard, height: int, width: int, config: CATConfig, steps: int
) -> MacReport:
    """Count a (meta or real) transformer's full, pruned and per-generation MACs at one resolution."""
    config.check_steps(steps)
    multiple = card.vae_scale * card.token_cells
    if height % multiple or width % multiple:
        raise ConfigError(f"height and width must be multiples of {multiple}, got {height}x{width}", field="height")
    latents, timestep, kwargs = meta_inputs(card, Grid(height // multiple, width // multiple))
    counts = step_macs(transformer, latents, timestep, kwargs, config)
    kinds = plan(steps, config.t0, config.refresh_every, config.reuse_every)
    return MacReport(counts.num_tokens, counts.k, counts.full, counts.context_full, counts.pruned, counts.context, steps,
                     kinds.count("full"), kinds.count("reused"))


@dataclass(frozen=True)
class StepMacs:
    """MACs of each kind of transformer work at one shape (the batch of the inputs counted)."""

    num_tokens: int
    k: int
    full: int  # diffusers' unpruned forward
    context_full: int  # catrt's full step on the context made once
    pruned: int
    context: int  # once per generation under catrt
    probe: int  # the first block on all tokens (`reuse_threshold`'s decision)

    def traced(self, trace: list[StepRecord]) -> int:
        """The MACs of one traced generation: its context, full and pruned steps and decision probes.

        A probe is counted where it decided a step (`change` set), except on a computed step whose forward
        runs every token (k = N), which yields the first block's output itself (as in First-Block-Cache);
        at full steps likewise. Reused steps cost nothing else.
        """
        kinds = [record.kind for record in trace]
        probes = sum(r.change is not None and (r.kind == "reused" or self.k < self.num_tokens) for r in trace)
        return self.context + kinds.count("full") * self.context_full + kinds.count("pruned") * self.pruned + probes * self.probe

    def traced_ratio(self, trace: list[StepRecord]) -> float:
        """`traced` over the unpruned pipeline's forwards for the same number of steps."""
        return self.traced(trace) / (len(trace) * self.full)


def step_macs(
    transformer: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any], config: CATConfig
) -> StepMacs:
    """Count each kind of step on one transformer call's inputs (meta tensors or real ones)."""
    adapter = make_adapter(transformer)
    tokens = adapter.tokens_of(latents)  # (B, N, channels): the rows a pruned step gathers, any latent layout
    num_tokens = tokens.shape[1]
    k = config.num_selected(num_tokens)
    with torch.no_grad():
        full = count_macs(lambda: transformer(hidden_states=latents, timestep=timestep, return_dict=False, **kwargs))
        inputs = adapter.context_inputs(kwargs)
        context_macs = count_macs(lambda: adapter.prepare_context(inputs, tuple(latents.shape)))
        context = adapter.prepare_context(inputs, tuple(latents.shape))
        _, kv = adapter.export_full(latents, timestep, context)
        context_full = count_macs(lambda: adapter.full_forward(latents, timestep, context, kv))
        patches = tokens[:, :k]
        indices = torch.arange(k, device=latents.device).expand(latents.shape[0], -1)
        pruned = count_macs(lambda: adapter.pruned_forward(patches, indices, timestep, context, kv))
        probe = count_macs(lambda: adapter.first_block_residual(latents, timestep, context))
    return StepMacs(num_tokens, k, full, context_full, pruned, context_macs, probe)


def model_macs(name: str, height: int, width: int, config: CATConfig, steps: int) -> MacReport:
    """MACs of a published model by name, built on the meta device from its kept config."""
    card = MODEL_CARDS.get(name)
    if card is None:
        raise ConfigError(f"no published config for {echo(name)}; known: {', '.join(sorted(MODEL_CARDS))}", field="model")
    with torch.device("meta"):
        transformer = family_of(card.family).adapter.transformer_class.from_config(card.transformer_config)
    return transformer_macs(transformer.eval(), card, height, width, config, steps)


def format_macs(value: int) -> str:
    """1.234 TMAC style, picking the unit by size."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3f} {unit}MAC"
    return f"{value} MAC"

