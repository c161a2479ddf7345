"""The adapter contract: what every model family gives the runtime.

An adapter wraps a diffusers transformer and uses its modules' weights directly (no copies). The
step-invariant inputs of a generation go through two stages:

- `context_inputs(call_kwargs)`: the tensors of the pipeline's transformer call that stay fixed for
  a generation (text embeddings, masks), checked and taken by name; no weights are used, so this also
  runs on a weightless stand-in transformer (an engine bundle's pipeline).
- `prepare_context(inputs, latent_shape)`: what those inputs and the resolution give through the
  transformer's weights once per generation (the positional table, PixArt's cross-attention K/V). A
  bundle exports it as its "context" graph.

How latents become tokens is the adapter's to declare (the runtime, the export and MAC counting ask it):
`tokens_of` / `prediction_of` / `prediction_shape` map the pipeline's latents to (B, N, C) token rows
and the output tokens back, `latent_grid` gives the token grid where the latents carry it, `embed`
and `embed_patches` embed all or the selected tokens. The defaults here are the conv-patch layout
(SD3, PixArt: 4-D latents, a conv patch embedding and a learned positional table in the context);
FLUX overrides them for packed (B, N, 64) latents, a linear embedding and rotary positions.

Then two static-shape step functions, each in two forms:

- in place (`full_forward`, `pruned_forward`): the runtime's K/V cache (S, B, N, D) is written as the
  blocks run - all rows on a full step, the k selected rows on a pruned step - and attention reads it
  directly, so no cache is ever copied;
- functional (`export_full`, `export_pruned`): the same maths returning the fresh K/V rows as an
  output, for exporters (ONNX graphs cannot write their inputs).

`KVStore` is how a forward reads and writes those K/V slots. The maths the families' blocks share lives beside
this contract: attention and the Q/K/V projections in `catrt.models.attention`, adaLN modulation in
`catrt.models.modulation` (both importable from here too).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from catrt.contract import Context
from catrt.errors import ConfigError, UnsupportedModelError
from catrt.models.attention import (
    AttentionRecorder,
    attention,
    attention_kwargs_change_nothing,
    heads,
    joint_attention,
    merge_heads,
    project_qkv,
    refuse_call_attention_kwargs,
    unfuse_hint,
)
from catrt.models.modulation import gated_add_, modulate_
from catrt.tokens import Grid, patchify, unpatchify

#: The adapter contract, with the shared block maths of `attention` and `modulation` (one import for a family module).
__all__ = [
    "Adapter", "AttentionRecorder", "BlockCall", "BlockFunction", "Context", "KVStore", "PackedTokensAdapter",
    "attention", "attention_kwargs_change_nothing", "call_block", "check_runs_as_loaded", "eager_cpu", "gated_add_",
    "heads", "joint_attention", "merge_heads", "modulate_", "plain_linear", "project_qkv", "refuse_call_attention_kwargs",
    "refuse_without_blocks", "unfuse_hint",
]


#: One block of a family: `function(block, store, *inputs)`, the store numbering the block's K/V slots from 0.
BlockFunction = Callable[..., Any]
#: How a forward runs its blocks: `block_call(function, block, store, first_slot, num_slots, *inputs)`.
BlockCall = Callable[..., Any]


def eager_cpu(tensor: torch.Tensor) -> bool:
    """Whether an eager forward on `tensor` takes the CPU-only fast paths (whole-row K/V writes, SD3's `Scratch`).

    On CUDA (and compiled) the same steps scatter their K/V rows and allocate their temporaries; the
    tests patch this one predicate to run those GPU paths, captured or not, on the CPU.
    """
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()



def refuse_without_blocks(transformer: nn.Module, num_blocks: int, config_keys: tuple[str, ...]) -> None:
    """Refuse a transformer with no blocks (its `config_keys` all 0), naming them: there is no attention whose tokens to
    prune or K/V to cache, and the forwards' stacked K/V and cross-attention tensors failed on an empty list in torch."""
    if num_blocks:
        return
    zero = " and ".join(f"{key} 0" for key in config_keys)
    raise UnsupportedModelError(
        f"{type(transformer).__name__} with {zero} has no transformer blocks: catrt prunes the image tokens its blocks "
        f"run and caches their K/V, so there is nothing to prune; run the pipeline without catrt",
        field=config_keys[0], value=0,
    )


def refuse_other_text_width(transformer: nn.Module, key: str, model: str, reader: str) -> None:
    """Refuse a text-width config `key` other than the transformer's width num_attention_heads * attention_head_dim:
    diffusers builds the transformer (its text projection makes that width), but `reader` - the blocks' text path - takes
    the transformer's width, so its forward failed deep in the first block. None (no such projection) is left to the
    family's own checks."""
    config = transformer.config
    value, width = config[key], config.num_attention_heads * config.attention_head_dim
    if value is None or value == width:
        return
    raise ConfigError(
        f"{model} config {key} {value} is not the transformer's width num_attention_heads * attention_head_dim = "
        f"{config.num_attention_heads} * {config.attention_head_dim} = {width}: {reader} at that width, so its forward "
        f"fails; set {key} to {width} in the transformer's config.json (or heads and head size whose product is {value})",
        field=key, value=value,
    )


def call_block(function: BlockFunction, block: nn.Module, store: KVStore, first_slot: int, num_slots: int, *inputs: Any) -> Any:
    """Run one block as it is (eager and exported forwards)."""
    return function(block, store.window(first_slot, num_slots), *inputs)


class KVStore:
    """How one forward reads and writes the per-block K/V slots.

    In place (`in_place=True`): a full step copies each fresh K/V into its cache slot; a pruned step
    scatters the k fresh rows into the slot and attention reads the slot, so the cache is never copied.
    Functional: the fresh rows are collected and returned stacked; a pruned step's attention reads an
    out-of-place copy of the slot with the rows replaced (what an exported graph must do).
    """

    def __init__(
        self,
        kv_cache: torch.Tensor | None,
        indices: torch.Tensor | None,
        in_place: bool,
        block_call: BlockCall | None = None,
    ) -> None:
        if in_place and kv_cache is None:
            raise ValueError("an in-place forward needs the K/V cache")
        self.kv_cache = kv_cache
        self.indices = indices
        self.in_place = in_place
        self.block_call = block_call or call_block
        self.first_slot = 0  # slot `s` of this store is slot `first_slot + s` of `kv_cache`
        self.rows: list[torch.Tensor] = []
        self._index: torch.Tensor | None = None

    def run_block(self, function: BlockFunction, block: nn.Module, first_slot: int, num_slots: int, *inputs: Any) -> Any:
        """`function(block, store, *inputs)` for one block whose K/V are slots `first_slot` .. `first_slot + num_slots - 1`.

        The block sees them as its slots 0 .. num_slots - 1, so blocks of one kind run the same code
        with the same constants: the compile backend compiles `function` once per block kind and
        runs every such block through that graph (see `KVStore.window`, `catrt.engines.compile`).
        """
        return self.block_call(function, block, self, first_slot, num_slots, *inputs)

    def window(self, first_slot: int, num_slots: int, sliced: bool = False) -> KVStore:
        """This store over `num_slots` slots from `first_slot`, numbered from 0 (fresh rows still collected here).

        Unsliced, it indexes the same cache at an offset (eager and exported forwards: the same
        indexing ops as without windows). Sliced, its cache is the view of just those slots: the
        one cache input of a compiled block, which writes its rows in place into that input.
        """
        cache = self.kv_cache
        if sliced and cache is not None:
            cache = cache[first_slot : first_slot + num_slots]
        window = KVStore(cache, self.indices, self.in_place)
        window.first_slot = 0 if sliced else self.first_slot + first_slot
        window.rows = self.rows
        return window

    def linear(self, slot: int, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`exchange(slot, layer(x))`, with the projection of a full in-place step made in its cache slot.

        For a plain `nn.Linear` on a contiguous input, an eager full step writes the matmul straight
        into `kv_cache[slot]` (the same addmm `F.linear` runs, so the same values) instead of making
        the fresh K or V and copying it there. Compiled, exported and pruned forwards go through
        `exchange` (inductor plans its own buffers; a pruned step scatters its k rows).
        """
        if self.in_place and self.indices is None and _writes_into(layer, x, self.kv_cache[self.first_slot + slot]):
            out = self.kv_cache[self.first_slot + slot]
            torch.addmm(layer.bias, x.view(-1, x.shape[-1]), layer.weight.t(), out=out.view(-1, out.shape[-1]))
            return out
        return self.exchange(slot, layer(x))

    def exchange(self, slot: int, fresh: torch.Tensor) -> torch.Tensor:
        """Fresh (B, n, D) K or V of `slot` -> the (B, N, D) tensor attention reads."""
        slot += self.first_slot
        if not self.in_place:
            self.rows.append(fresh)
        if self.indices is None:
            if self.in_place:
                self.kv_cache[slot].copy_(fresh)
            return fresh
        if self.in_place and eager_cpu(fresh):
            # The same rows written as whole-row copies: several times faster than scatter_ on a CPU.
            rows = torch.arange(fresh.shape[0], device=fresh.device).unsqueeze(1)
            return self.kv_cache[slot].index_put_((rows, self.indices), fresh)
        if self.in_place and torch.compiler.is_compiling():
            # Indexing the cache itself, not a slot view of it: inductor then writes the k rows in place,
            # where a scatter_ into `kv_cache[slot]` makes it copy the whole slot out and back.
            rows = torch.arange(fresh.shape[0], device=fresh.device).unsqueeze(1)
            at_slot = torch.full((1, 1), slot, dtype=torch.long, device=fresh.device)
            self.kv_cache.index_put_((at_slot, rows, self.indices), fresh)
            return self.kv_cache[slot]
        if self._index is None:
            self._index = self.indices.unsqueeze(-1).expand(-1, -1, fresh.shape[-1])
        if self.in_place:
            return self.kv_cache[slot].scatter_(1, self._index, fresh)
        return self.kv_cache[slot].scatter(1, self._index, fresh)

    def stacked_rows(self) -> torch.Tensor:
        """(S, B, n, D): the fresh rows of every slot (functional forwards only)."""
        return torch.stack(self.rows)


class Adapter(ABC):
    """One model family's full and pruned forwards over a diffusers transformer."""

    #: The diffusers transformer class this adapter serves.
    transformer_class: type[nn.Module]

    def __init__(self, transformer: nn.Module) -> None:
        if not isinstance(transformer, self.transformer_class):
            raise UnsupportedModelError(
                f"{type(self).__name__} needs a {self.transformer_class.__name__}, got {type(transformer).__name__}"
            )
        self.check_layout(transformer)
        check_runs_as_loaded(self, transformer)  # and again at each accelerated call (pipeline._follow_transformer)
        self.transformer = transformer
        self.patch_size: int = self._transformer_fact("config.patch_size")
        self.out_channels: int = self._transformer_fact("out_channels")
        self.in_channels: int = self._transformer_fact("config.in_channels")
        self.recorder: AttentionRecorder | None = None  # set by the runtime for the `attention` rule

    def _transformer_fact(self, path: str) -> Any:
        """`transformer.<path>`, which the base's token layout reads (diffusers transformers have it); a transformer
        of a new family without it is refused naming the attribute, where it was an AttributeError."""
        value: Any = self.transformer
        for part in path.split("."):
            if not hasattr(value, part):
                raise UnsupportedModelError(
                    f"{type(self).__name__}: the Adapter base reads transformer.{path}, which "
                    f"{type(self.transformer).__name__} does not have; give the transformer that attribute (a diffusers "
                    f"ModelMixin's config has it)",
                    field=path,
                )
            value = getattr(value, part)
        return value

    @abstractmethod
    def check_layout(self, transformer: nn.Module) -> None:
        """Raise UnsupportedModelError naming the feature this adapter cannot prune, or ConfigError naming the config key
        of a transformer diffusers builds but whose forward (or its pipeline's step) fails or runs wrong."""

    @property
    @abstractmethod
    def num_kv_slots(self) -> int:
        """How many (B, N, D) K or V tensors one step caches."""

    @property
    def hidden_dim(self) -> int:
        return self.transformer.inner_dim

    # -- the token layout (conv patches of 4-D latents by default) -------------------------------

    @property
    def cells_per_token(self) -> int:
        """Latent cells a side per image token: the patch size here."""
        return self.patch_size

    @property
    def max_grid_side(self) -> int | None:
        """The most tokens a side the transformer's positional code covers; None where any size runs.

        The default reads `config.pos_embed_max_size` as diffusers' `PatchEmbed` does (SD3: the side of the
        table it crops); a family whose table is laid out otherwise (AuraFlow's holds that many positions in
        all) or that interpolates or rotates its positions (PixArt, FLUX: no such key) says so here. Sizes
        are refused against it before a call, where the transformer would fail indexing its table.
        """
        side = getattr(self.transformer.config, "pos_embed_max_size", None)
        return None if side is None else int(side)

    @property
    def token_channels(self) -> int:
        """Channels of one input token: a flattened C x p x p latent patch."""
        return self.in_channels * self.patch_size**2

    @property
    def token_out_channels(self) -> int:
        """Channels of one output token: p x p x C_out."""
        return self.patch_size**2 * self.out_channels

    def latent_grid(self, latents: torch.Tensor) -> Grid | None:
        """The token grid the latents' shape gives, or None where it does not (packed latents)."""
        return self.grid(latents.shape[-2], latents.shape[-1])

    def tokens_of(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents -> (B, N, C*p*p) token rows (what the pruned step gathers)."""
        return patchify(latents, self.patch_size)

    def prediction_of(self, tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
        """(B, N, p*p*C_out) output tokens -> the prediction the pipeline expects, (B, C_out, H, W)."""
        return unpatchify(tokens, grid, self.patch_size)

    def prediction_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (latent_shape[0], self.out_channels, *latent_shape[2:])

    def embed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """All latents -> (B, N, D) tokens, as the transformer's own embedding, made contiguous.

        The conv patch embedding returns (B, D, N)-strided tokens. Blocks that add their residual
        as `x + update` keep the first operand's layout, so without this copy the whole residual
        stream of a full step stays channel-major and every norm and linear reading it copies it
        again (diffusers' blocks add `update + x` and go contiguous after the first block).
        """
        return self.transformer.pos_embed(hidden_states).contiguous()

    def grid(self, latent_height: int, latent_width: int) -> Grid:
        """The token grid of a latent size; raises when the patch size does not divide it or when it is wider than
        `max_grid_side` (a Python caller's size is checked nowhere before: the transformer failed in its positional
        embedding, with diffusers' ValueError for SD3's table and an IndexError in torch for AuraFlow's)."""
        p = self.patch_size
        if latent_height % p or latent_width % p:
            raise ConfigError(
                f"latent size {latent_height}x{latent_width} is not divisible by the patch size {p}; "
                f"choose an image size whose latent is a multiple of {p}",
                field="height" if latent_height % p else "width",
                value=(latent_height, latent_width),
            )
        grid, side = Grid(latent_height // p, latent_width // p), self.max_grid_side
        if side is not None and max(grid.height, grid.width) > side:
            raise ConfigError(
                f"latent size {latent_height}x{latent_width} is {grid.height}x{grid.width} tokens, but this "
                f"{type(self.transformer).__name__}'s positions cover at most {side} tokens a side (pos_embed_max_size); "
                f"choose an image size whose latent is at most {side * p} a side",
                field="height" if grid.height > side else "width",
                value=(latent_height, latent_width),
            )
        return grid

    @abstractmethod
    def context_inputs(self, call_kwargs: dict[str, Any]) -> Context:
        """The step-invariant tensors of the pipeline's transformer call, by name (no weights used)."""

    def prepare_context(self, inputs: Context, latent_shape: tuple[int, ...]) -> Context:
        """`inputs` plus what the weights make of them once per generation (the positional table here)."""
        return {**inputs, "positional_table": self.positional_table(latent_shape)}

    def full_forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        context: Context,
        kv_cache: torch.Tensor,
        block_call: BlockCall = call_block,
    ) -> torch.Tensor:
        """Latents -> output tokens (B, N, C_token_out); writes every K/V slot of `kv_cache`.

        `block_call` runs each block (the compile backend's runs compiled blocks).
        """
        tokens = self.embed(hidden_states)
        return self.run_blocks(tokens, timestep, context, KVStore(kv_cache, None, in_place=True, block_call=block_call))

    def pruned_forward(
        self,
        patches: torch.Tensor,
        indices: torch.Tensor,
        timestep: torch.Tensor,
        context: Context,
        kv_cache: torch.Tensor,
        block_call: BlockCall = call_block,
    ) -> torch.Tensor:
        """Selected patches (B, k, C*p*p) at `indices` (B, k) -> outputs (B, k, p*p*C_out).

        The k fresh K/V rows are written into `kv_cache` in place as each block runs.
        """
        tokens = self.embed_patches(patches, indices, context)
        return self.run_blocks(tokens, timestep, context, KVStore(kv_cache, indices, in_place=True, block_call=block_call))

    def export_full(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, context: Context
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Functional full step: output tokens (B, N, p*p*C_out) and the K/V (S, B, N, D)."""
        store = KVStore(None, None, in_place=False)
        tokens = self.run_blocks(self.embed(hidden_states), timestep, context, store)
        return tokens, store.stacked_rows()

    def export_pruned(
        self,
        patches: torch.Tensor,
        indices: torch.Tensor,
        timestep: torch.Tensor,
        context: Context,
        kv_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Functional pruned step: outputs (B, k, p*p*C_out) and fresh K/V rows (S, B, k, D); `kv_cache` is read only."""
        store = KVStore(kv_cache, indices, in_place=False)
        tokens = self.run_blocks(self.embed_patches(patches, indices, context), timestep, context, store)
        return tokens, store.stacked_rows()

    @abstractmethod
    def run_blocks(self, tokens: torch.Tensor, timestep: torch.Tensor, context: Context, store: KVStore) -> torch.Tensor:
        """Embedded image tokens (B, N or k, D) through every block and the output head.

        Each block runs through `store.run_block` (one function per block kind, slots numbered
        from 0 per block, no Python value that differs between blocks of a kind); each attention
        over image tokens hands its fresh K and V to `store.exchange(slot, ...)` and attends over
        what it returns (all N rows either way).
        """

    @abstractmethod
    def first_block(self, tokens: torch.Tensor, timestep: torch.Tensor, context: Context) -> torch.Tensor:
        """Embedded image tokens (B, N, D) through the first block only; no K/V cache is read or written."""

    def first_block_residual(self, hidden_states: torch.Tensor, timestep: torch.Tensor, context: Context) -> torch.Tensor:
        """(B, N, D): what the first block adds to the embedded latents; the signal of the
        First-Block-Cache-style `reuse_threshold` baseline (catrt/runtime.py)."""
        tokens = self.embed(hidden_states)
        return self.first_block(tokens.clone(), timestep, context) - tokens

    # -- shared pieces -------------------------------------------------------------------------

    def positional_table(self, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """(1, N, D) float32: the positional embedding of this resolution, exactly as the patch embedding adds it.

        The transformer's own patch embedding of a float32 zero latent, its projection replaced by one of float32
        zeros (`_ZeroProjection`), is exactly that (whether the family keeps its positions in the model's
        dtype, as SD3 does, or makes them in float32, as PixArt does at a size other than its own). So the
        pruned forward can embed any subset of patches as diffusers sums them - `(patches @ W.T + bias) +
        position`, rounded to the model's dtype once at the end - without knowing how a family builds its
        positional code: bit for bit diffusers' tokens in bf16 too. (A table of bias + position in the
        model's dtype rounded that sum twice: 1 bf16 step off diffusers from the first pruned step.)
        """
        embedding = copy.copy(self.transformer.pos_embed)  # its positions and settings, shared; its projection below
        vars(embedding)["_modules"] = {**embedding._modules, "proj": _ZeroProjection(embedding.proj)}
        zeros = torch.zeros((1, *latent_shape[1:]), device=self.device, dtype=torch.float32)
        return type(embedding).forward(embedding, zeros)  # not its call: the copy shares the original's hooks and compiled call

    def embed_patches(self, patches: torch.Tensor, indices: torch.Tensor, context: Context) -> torch.Tensor:
        """(B, k, C*p*p) patches -> (B, k, D) tokens, the same as the conv patch embedding."""
        proj = self.transformer.pos_embed.proj
        proj = getattr(proj, "base_layer", proj)  # a disabled (PEFT) LoRA there runs its base layer alone
        tokens = F.linear(patches, proj.weight.flatten(1), proj.bias)  # weight (D, C, p, p) or (D, C*p*p)
        table = context["positional_table"][0]  # (N, D) float32
        return (tokens + table[indices]).to(tokens.dtype)

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_out.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer computes in: its output layer's, or the compute dtype diffusers'
        `enable_layerwise_casting` casts that layer's stored (float8) weight to in its forward.

        A quantized output layer whose stored weight is no float (diffusers' GGUFLinear: uint8 blocks dequantized in
        its forward) computes in the dtype of the transformer's first float parameter outside its
        `_keep_in_fp32_modules` (diffusers' `ModelMixin.dtype` rule), or else in its `compute_dtype`: its uint8 made
        every call's float latents refused as the wrong dtype. The layer's `compute_dtype` comes second because it can
        be the layer's internal matmul dtype alone: bitsandbytes' Linear4bit casts its input to it (float32 by
        default) and its output back, so a bf16 transformer's calls were refused as bf16 for a float32 transformer."""
        proj_out = self.transformer.proj_out
        registry = getattr(proj_out, "_diffusers_hook", None)
        casting = registry.get_hook("layerwise_casting") if registry is not None else None
        if casting is not None:
            return casting.compute_dtype
        weight = proj_out.weight
        if weight.is_floating_point():
            return weight.dtype
        first = _first_float_dtype(self.transformer)
        if first is not None:
            return first
        compute = getattr(proj_out, "compute_dtype", None)
        return compute if isinstance(compute, torch.dtype) else weight.dtype


def _first_float_dtype(transformer: nn.Module) -> torch.dtype | None:
    """The dtype of `transformer`'s first float parameter outside its `_keep_in_fp32_modules` (diffusers'
    `get_parameter_dtype`: mixed-precision norms kept in float32 are not the dtype the transformer runs)."""
    kept = getattr(transformer, "_keep_in_fp32_modules", None) or ()
    for name, parameter in transformer.named_parameters():
        if parameter.is_floating_point() and not any(module in name for module in kept):
            return parameter.dtype
    return None


class PackedTokensAdapter(Adapter):
    """The token layout of packed latents (B, N, C): the latents are the token rows (FLUX's layout).

    A family whose pipeline packs its latents subclasses this instead of `Adapter`; its pipeline's
    `PipelineSpec.token_grid` gives the grid, which the latents' shape does not carry.
    """

    @property
    def token_channels(self) -> int:
        return self.in_channels

    @property
    def token_out_channels(self) -> int:
        return self.out_channels

    def latent_grid(self, latents: torch.Tensor) -> Grid | None:
        """None: packed latents do not carry their grid (the pipeline's image size does)."""
        return None

    def tokens_of(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def prediction_of(self, tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
        return tokens

    def prediction_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*latent_shape[:-1], self.out_channels)



#: diffusers hooks that leave what catrt computes as it is (the casting runs in the hooked layers' own forwards).
_HARMLESS_DIFFUSERS_HOOKS = frozenset({"layerwise_casting", "peft_autocast_disable"})


def check_runs_as_loaded(adapter: Adapter, transformer: nn.Module) -> None:
    """Refuse what catrt's step functions would silently run otherwise than the transformer's own forward: diffusers
    hooks on it (`_refuse_diffusers_hooks`) and, for the default `embed_patches`, an unfused LoRA on the patch
    projection (`_check_patch_projection`).

    The base calls it at construction for every family, and the accelerated pipeline at each call after the family's
    `check_layout` (a LoRA or hook added after `accelerate`)."""
    _refuse_compiled_in_place(transformer)
    _refuse_diffusers_hooks(transformer)
    if type(adapter).embed_patches is Adapter.embed_patches:
        _check_patch_projection(adapter, transformer)


def _refuse_compiled_in_place(transformer: nn.Module) -> None:
    """A transformer compiled in place (`pipe.transformer.compile()`, nn.Module.compile) runs every call through its
    compiled call, which then traced the forward catrt puts in place for a generation - catrt's whole runtime: with the
    tiny SD3, 24 graphs and a recompile per alpha (8 and 18 s), then warm calls 8x slower than eager. Compiling its blocks
    in place (`compile_repeated_blocks`) changes nothing catrt runs, and is left as it is."""
    if getattr(transformer, "_compiled_call_impl", None) is not None:
        raise UnsupportedModelError(
            f"the transformer ({type(transformer).__name__}) is compiled in place (transformer.compile()), so torch.compile "
            f"would trace catrt's runtime in each call: accelerate it uncompiled (load it again, or set "
            f"pipe.transformer._compiled_call_impl = None) and pass backend=\"compile\" to compile catrt's step functions",
            field="transformer",
        )


def _refuse_diffusers_hooks(transformer: nn.Module) -> None:
    """A diffusers hook (its HookRegistry: `enable_cache`'s First-Block / Faster / Mag caches, `enable_group_offload`,
    layer skipping) acts on the transformer's or its blocks' forwards, which catrt's steps never call: a cache's skipped
    work was silently done in full (alpha 1 no longer the plain pipeline) and offloaded weights are never loaded."""
    for name, module in transformer.named_modules():
        registry = vars(module).get("_diffusers_hook")  # set as a plain attribute: 3x faster than getattr's miss
        hooks = sorted(set(getattr(registry, "hooks", None) or ()) - _HARMLESS_DIFFUSERS_HOOKS)
        if hooks:
            where = f"module {name!r} of the transformer" if name else "the transformer"
            raise UnsupportedModelError(
                f"{where} has diffusers hooks {hooks} (enable_cache, enable_group_offload or layer skipping), which act "
                f"on forwards catrt's step functions do not call: remove them before catrt.accelerate "
                f"(pipe.transformer.disable_cache() for a cache; load the transformer without group offloading and move "
                f"the pipeline with pipe.to(device)); catrt's reuse_every / reuse_threshold reuse steps instead",
                field="transformer", value=hooks,
            )


class _ZeroProjection(nn.Module):
    """A patch projection's own conv (or linear) run with zero weight and bias, in its place when the positional table is
    made. Zeroing the projection's parameters instead ran its parametrization on them: a weight- or spectral-norm
    weight of zero parameters is 0 / 0, which made the table and every pruned token NaN."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        if isinstance(proj, torch._dynamo.eval_frame.OptimizedModule):
            proj = proj._orig_mod
        layer = getattr(proj, "base_layer", proj)  # a disabled (PEFT) LoRA runs its base layer alone
        self.conv = layer if isinstance(layer, nn.Conv2d) else None
        self.weight_shape = tuple(layer.weight.shape)  # (D, C, p, p) or (D, C*p*p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.zeros(self.weight_shape, device=x.device, dtype=x.dtype)
        bias = torch.zeros(self.weight_shape[:1], device=x.device, dtype=x.dtype)
        return F.linear(x, weight, bias) if self.conv is None else self.conv._conv_forward(x, weight, bias)


def _check_patch_projection(adapter: Adapter, transformer: nn.Module) -> None:
    """Refuse a patch projection the default `embed_patches` would read wrongly: it multiplies the selected patches by
    `pos_embed.proj.weight`, which an unfused LoRA layer wrapping the projection (PEFT's) leaves out, so a pruned step
    silently lost the LoRA's share of the embedding while full steps had it. A merged LoRA is in that weight, and a
    disabled one (`pipe.disable_lora()`: PEFT's `disable_adapters`) is in neither: the layer runs its base alone."""
    proj = getattr(getattr(transformer, "pos_embed", None), "proj", None)
    if proj is not None and not _plain_tensor(getattr(proj, "weight", None)):
        weight = proj.weight
        raise UnsupportedModelError(
            f"{type(adapter).__name__}: the patch embedding transformer.pos_embed.proj has a quantized weight (a "
            f"{type(weight).__module__}.{type(weight).__name__}): catrt embeds a pruned step's selected patches by "
            f"multiplying with that weight directly, which would read its stored data; leave the patch embedding "
            f"unquantized (quantize the Linear layers only, or add 'pos_embed' to the quantization's modules_to_not_convert)",
            field="pos_embed.proj",
        )
    if proj is None or _plain_projection(proj) or getattr(proj, "merged", False):
        return
    if getattr(proj, "disable_adapters", None) is True:
        return
    raise UnsupportedModelError(
        f"{type(adapter).__name__}: the patch embedding transformer.pos_embed.proj is a {type(proj).__module__}."
        f"{type(proj).__name__}, not a plain nn.Conv2d or nn.Linear (an unfused LoRA layer wraps it, or a hook changes "
        f"its forward): catrt embeds a pruned step's selected patches with its weight, which leaves the LoRA out; fuse "
        f"the LoRA first (pipe.fuse_lora(lora_scale=...)), then accelerate",
        field="pos_embed.proj",
    )


def _plain_projection(proj: nn.Module) -> bool:
    """Whether `proj(x)` is the conv / linear of its `weight`: an nn.Conv2d or nn.Linear, or a subclass keeping their
    forward (torch.nn.utils.parametrize's, whose `weight` is the parametrized one), also under torch.compile (whose
    `weight` is the module's). A forward accelerate's hooks wrap passes here: the pipeline refuses those by name at each
    call, with their own fix (move the pipeline with pipe.to), where this refusal's fuse_lora fix would mislead."""
    proj = getattr(proj, "_orig_mod", proj) if isinstance(proj, torch._dynamo.eval_frame.OptimizedModule) else proj
    base = next((kind for kind in (nn.Conv2d, nn.Linear) if isinstance(proj, kind)), None)
    if base is None or type(proj).forward is not base.forward:
        return False
    if base is nn.Conv2d and type(proj)._conv_forward is not nn.Conv2d._conv_forward:
        return False
    return _runs_own_forward(proj) or getattr(proj, "_hf_hook", None) is not None


def plain_linear(layer: nn.Module) -> bool:
    """Whether calling `layer` is just `F.linear` with its `weight` and `bias`, so a fast path may use them directly.

    Not for a layer whose forward was replaced on the instance (diffusers' hooks - `enable_layerwise_casting` keeps
    the weight in float8 and casts it in its forward; accelerate's) or that has torch forward hooks, nor for a weight
    or bias that is a tensor subclass (torchao's quantized weights, diffusers' GGUFParameter): `F.linear` dispatches
    those to the subclass's own kernels, where the fast paths' `weight.t()`, `addmm(out=)` and `baddbmm` failed on
    torchao's Int8Tensor (or would read a raw quantized buffer).
    """
    return type(layer) is nn.Linear and _runs_own_forward(layer) and _plain_tensor(layer.weight) and _plain_tensor(layer.bias)


def _plain_tensor(tensor: torch.Tensor | None) -> bool:
    """Whether `tensor` is None or a plain tensor or parameter, no subclass overriding torch's operators."""
    return tensor is None or type(tensor) in (torch.Tensor, nn.Parameter)


def _runs_own_forward(module: nn.Module) -> bool:
    """Whether calling `module` runs its class's forward alone: no torch forward hooks, and no forward set on the
    instance other than that forward bound to it (accelerate's `remove_hook_from_module`, which diffusers'
    `remove_all_hooks` calls after CPU offloading, leaves the module's own forward there as an instance attribute)."""
    forward = vars(module).get("forward")
    own = forward is None or (
        getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward
    )
    return own and not module._forward_pre_hooks and not module._forward_hooks


def _writes_into(layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `layer(x)` can be computed straight into `out` by one addmm (eager only)."""
    return (
        plain_linear(layer)
        and layer.bias is not None
        and not torch.compiler.is_compiling()
        and not torch.is_grad_enabled()  # out= has no autograd
        and x.is_contiguous()
        and out.is_contiguous()
        and x.dtype == out.dtype == layer.weight.dtype == layer.bias.dtype
        and x.device == out.device
        and out.shape == (*x.shape[:-1], layer.out_features)
    )
