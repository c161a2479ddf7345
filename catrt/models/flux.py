"""Adapter for diffusers' `FluxTransformer2DModel`: FLUX.1 dev (distilled guidance embedding) and schnell.

FLUX differs from the SD3 layout in three ways the adapter contract declares:

- packed latents: the pipeline hands the transformer (B, N, 64) tokens (2x2 latent patches packed by
  the pipeline) and a linear `x_embedder` embeds them, so a token is a row of the latents and the
  prediction is (B, N, 64) too;
- rotary positions instead of a learned table: `prepare_context` turns the pipeline's `txt_ids` and
  `img_ids` into one cos / sin table (T + N, head_dim), and a pruned step gathers the rows of its
  selected tokens (the text rows always);
- guidance is an input, not a batch doubling: FLUX-dev embeds the guidance scale (one value per
  row, `guidance_embeds=True`), schnell has none; the batch is never [uncond, cond].

Blocks: the double-stream blocks are SD3's joint blocks (image K/V cached, the text stream in full);
the single-stream blocks run text and image tokens through one attention and MLP, and cache the
image rows of their K and V (one slot pair each) while the text rows are recomputed every step.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import torch
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn

from catrt.call_arguments import check_image_side
from catrt.errors import ConfigError, UnsupportedModelError
from catrt.models.attention import (
    AttentionRecorder, attention, attention_kwargs_change_nothing, joint_attention, refuse_call_attention_kwargs,
)
from catrt.models.base import Context, KVStore, PackedTokensAdapter, refuse_without_blocks
from catrt.models.registry import Family, register_family
from catrt.pipeline_spec import LatentChannels, PipelineSpec
from catrt.tokens import Grid

#: Columns of FluxPipeline's position ids (txt_ids, img_ids): one rotary axis each.
_POSITION_AXES = 3
# Transformer call arguments the adapter does not prune through; each is refused by name when given.
_UNSUPPORTED_CALL_ARGS = ("controlnet_block_samples", "controlnet_single_block_samples")


class FluxAdapter(PackedTokensAdapter):
    """Double-stream (joint) blocks then single-stream blocks over packed latent tokens with rotary positions.

    K/V slots: image K and V of each double block's joint attention, then image K and V of each
    single block's attention.
    """

    transformer_class = FluxTransformer2DModel

    def check_layout(self, transformer: nn.Module) -> None:
        if transformer.config.patch_size != 1:
            raise UnsupportedModelError(
                f"FLUX transformer with patch_size {transformer.config.patch_size} is not supported (the pipeline packs 2x2 patches; catrt takes patch_size 1)"
            )
        _check_rotary_axes(transformer.config)
        if transformer.config.in_channels % 4:
            raise ConfigError(
                f"FluxTransformer2DModel config in_channels {transformer.config.in_channels} is not a multiple of 4: the "
                f"pipeline packs 2x2 latent cells of in_channels // 4 channels into tokens of "
                f"{transformer.config.in_channels // 4 * 4}, which the transformer's x_embedder fails on; set in_channels "
                f"to 4 times the VAE's latent_channels (64 for FLUX.1) in the transformer's config.json",
                field="in_channels", value=transformer.config.in_channels,
            )
        if getattr(transformer, "encoder_hid_proj", None) is not None:
            raise UnsupportedModelError("FLUX transformer with an IP-adapter (encoder_hid_proj) is not supported by catrt")
        blocks = [("double", transformer.transformer_blocks), ("single", transformer.single_transformer_blocks)]
        refuse_without_blocks(transformer, sum(len(modules) for _, modules in blocks), ("num_layers", "num_single_layers"))
        for kind, modules in blocks:
            for index, block in enumerate(modules):
                attn = block.attn
                if type(attn.processor) is not FluxAttnProcessor:
                    raise UnsupportedModelError(
                        f"FLUX {kind} block {index} uses attention processor {type(attn.processor).__name__}; catrt "
                        f"prunes only the default FluxAttnProcessor (no IP-adapter or custom processors)"
                    )
                if getattr(attn, "fused_projections", False):
                    raise UnsupportedModelError(
                        f"FLUX {kind} block {index} has fused QKV projections; unfuse them (unfuse_qkv_projections) for catrt"
                    )

    # -- the token layout: packed latents, linear embedding, rotary positions ---------------------

    @property
    def num_kv_slots(self) -> int:
        return 2 * (len(self.transformer.transformer_blocks) + len(self.transformer.single_transformer_blocks))

    @property
    def cells_per_token(self) -> int:
        """The pipeline packs 2x2 latent cells into one token."""
        return 2

    def embed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.transformer.x_embedder(hidden_states)

    def embed_patches(self, patches: torch.Tensor, indices: torch.Tensor, context: Context) -> torch.Tensor:
        """The linear embedding of the selected tokens; their positions enter as rotary rows in `run_blocks`."""
        return self.transformer.x_embedder(patches)

    def context_inputs(self, call_kwargs: dict[str, Any]) -> Context:
        for name in _UNSUPPORTED_CALL_ARGS:
            if call_kwargs.get(name) is not None:
                raise UnsupportedModelError(f"FLUX transformer argument {name!r} is not supported by catrt (no ControlNet)")
        attention_kwargs = call_kwargs.get("joint_attention_kwargs") or {}
        if not attention_kwargs_change_nothing(attention_kwargs):
            raise UnsupportedModelError(
                f"FLUX joint_attention_kwargs {sorted(attention_kwargs)} are not supported by catrt (no IP-adapter or LoRA scale)"
            )
        inputs: Context = {
            "encoder_hidden_states": call_kwargs["encoder_hidden_states"],
            "pooled_projections": call_kwargs["pooled_projections"],
            "txt_ids": _ids(call_kwargs["txt_ids"]),
            "img_ids": _ids(call_kwargs["img_ids"]),
        }
        guidance = call_kwargs.get("guidance")
        if self.transformer.config.guidance_embeds:
            if guidance is None:
                raise ConfigError("this FLUX transformer embeds guidance (FLUX-dev): the call needs guidance", field="guidance")
            inputs["guidance"] = guidance
        elif guidance is not None:
            raise ConfigError("this FLUX transformer has no guidance embedding (FLUX-schnell): pass guidance=None", field="guidance")
        return inputs

    def prepare_context(self, inputs: Context, latent_shape: tuple[int, ...]) -> Context:
        """Adds the rotary table (T + N, head_dim) of the text and image positions, as cos and sin."""
        cos, sin = self.transformer.pos_embed(torch.cat((inputs["txt_ids"], inputs["img_ids"]), dim=0))
        return {**inputs, "rotary_cos": cos, "rotary_sin": sin}

    # -- the blocks ------------------------------------------------------------------------------

    def run_blocks(self, tokens: torch.Tensor, timestep: torch.Tensor, context: Context, store: KVStore) -> torch.Tensor:
        """Diffusers' FLUX forward on the given image tokens (all N, or the k of `store.indices`)."""
        model = self.transformer
        temb, text = self._conditioning(tokens.dtype, timestep, context)
        text_rope, image_rope = _rotary_rows(context, text.shape[1], store.indices)
        slot = 0
        for block in model.transformer_blocks:
            text, tokens = store.run_block(self._double_block, block, slot, 2, tokens, text, temb, text_rope, image_rope)
            slot += 2
        num_text = text.shape[1]
        joined, rope = torch.cat([text, tokens], dim=1), _joined_rotary(text_rope, image_rope)
        for block in model.single_transformer_blocks:
            joined = store.run_block(self._single_block, block, slot, 2, joined, temb, rope, num_text)
            slot += 2
        return model.proj_out(model.norm_out(joined[:, num_text:], temb))

    def first_block(self, tokens: torch.Tensor, timestep: torch.Tensor, context: Context) -> torch.Tensor:
        """The first double-stream block (the first single-stream one where there is none) on all image tokens."""
        temb, text = self._conditioning(tokens.dtype, timestep, context)
        text_rope, image_rope = _rotary_rows(context, text.shape[1], None)
        store = KVStore(None, None, in_place=False)  # fresh K/V kept aside, the cache untouched
        blocks = self.transformer.transformer_blocks
        if len(blocks):
            return self._double_block(blocks[0], store, tokens, text, temb, text_rope, image_rope)[1]
        joined, rope = torch.cat([text, tokens], dim=1), _joined_rotary(text_rope, image_rope)
        first = self.transformer.single_transformer_blocks[0]
        return self._single_block(first, store, joined, temb, rope, text.shape[1])[:, text.shape[1] :]

    def _conditioning(self, dtype: torch.dtype, timestep: torch.Tensor, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """The time (and distilled guidance) embedding and the embedded text, as diffusers' forward makes them."""
        model = self.transformer
        timestep = timestep.to(dtype) * 1000
        if "guidance" in context:
            temb = model.time_text_embed(timestep, context["guidance"].to(dtype) * 1000, context["pooled_projections"])
        else:
            temb = model.time_text_embed(timestep, context["pooled_projections"])
        return temb, model.context_embedder(context["encoder_hidden_states"])

    def _double_block(
        self,
        block: nn.Module,
        store: KVStore,
        x: torch.Tensor,
        text: torch.Tensor,
        temb: torch.Tensor,
        text_rope: tuple[torch.Tensor, torch.Tensor],
        image_rope: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One FluxTransformerBlock: joint attention of the text and the given image tokens, then both MLPs; image K/V in slots 0-1."""
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
        ntext, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(text, emb=temb)
        attn = block.attn
        query, key, value = _qkv(attn, nx, image_rope)
        key, value = store.exchange(0, key), store.exchange(1, value)
        t_query, t_key, t_value = _qkv(attn, ntext, text_rope, added=True)
        _record(self.recorder, [query, t_query], key, t_key, attn.heads)
        num_text = t_query.shape[1]
        joint = joint_attention([t_query, query], [t_key, key], [t_value, value], attn.heads).to(query.dtype)
        # Contiguous rows, as diffusers hands them to the output projections: `F.linear` then runs one addmm with the
        # bias inside (it copies non-contiguous rows anyway, then adds the bias apart, rounding twice in bf16).
        image_out = attn.to_out[1](attn.to_out[0](joint[:, num_text:].contiguous()))
        text_out = attn.to_add_out(joint[:, :num_text].contiguous())

        x = x + gate_msa.unsqueeze(1) * image_out
        nx = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp.unsqueeze(1) * block.ff(nx)

        text = text + c_gate_msa.unsqueeze(1) * text_out
        ntext = block.norm2_context(text) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        text = text + c_gate_mlp.unsqueeze(1) * block.ff_context(ntext)
        if text.dtype == torch.float16:
            text = text.clip(-65504, 65504)
        return text, x

    def _single_block(
        self,
        block: nn.Module,
        store: KVStore,
        joined: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        num_text: int,
    ) -> torch.Tensor:
        """One FluxSingleTransformerBlock on [text, image tokens] (`rope`: their rotary rows); the image rows of K and V
        go through the store as slots 0-1.

        The two streams stay one tensor from block to block (diffusers concatenates and splits them in
        every block; the values are the same), so every single block but the first is handed what its
        predecessor returned and the text and image inputs never alias one another. A full step attends
        over that tensor's own K and V (the store hands the image rows back as they are): no copy.
        """
        normed, gate = block.norm(joined, emb=temb)
        mlp = block.act_mlp(block.proj_mlp(normed))
        attn = block.attn
        query, key, value = _qkv(attn, normed, rope)
        image_key = store.exchange(0, key[:, num_text:])
        image_value = store.exchange(1, value[:, num_text:])
        _record(self.recorder, [query], image_key, key[:, :num_text], attn.heads)
        if store.indices is not None:  # a pruned step attends over all N cached image rows
            key = torch.cat([key[:, :num_text], image_key], dim=1)
            value = torch.cat([value[:, :num_text], image_value], dim=1)
        out = attention(query, key, value, attn.heads)
        joined = joined + gate.unsqueeze(1) * block.proj_out(torch.cat([out.to(query.dtype), mlp], dim=2))
        if joined.dtype == torch.float16:
            joined = joined.clip(-65504, 65504)
        return joined


def _record(
    recorder: AttentionRecorder | None,
    queries: list[torch.Tensor],
    image_key: torch.Tensor,
    text_key: torch.Tensor,
    num_heads: int,
) -> None:
    """Hand the `attention` rule's recorder the attention the image keys receive from the `queries` (it reads the
    image keys as the first keys; only then are queries and keys concatenated for it).

    The attention itself runs over [text, image] keys, diffusers' order: SDPA's blocked softmax sums the keys in
    their order, so another order rounds otherwise in bf16 once there are more keys than one block (512 on the CPU).
    """
    if recorder is not None:
        recorder.record(torch.cat(queries, dim=1), torch.cat([image_key, text_key], dim=1), num_heads, image_key.shape[1])


def _check_rotary_axes(config: Any) -> None:
    """Refuse `axes_dims_rope` the rotary embedding cannot apply, naming it: FluxPipeline's position ids have 3 columns,
    each rotated over its axis' (even) number of channels, and the three together make one attention head. diffusers
    builds any, but its forward failed on the first attention (an assertion for an odd axis, a size mismatch for
    another sum, an IndexError for fewer than 3 axes)."""
    axes, head_dim = tuple(config.axes_dims_rope), config.attention_head_dim
    used = axes[:_POSITION_AXES]
    if len(used) < _POSITION_AXES or any(dim % 2 for dim in used) or sum(used) != head_dim:
        raise ConfigError(
            f"FluxTransformer2DModel config axes_dims_rope {list(axes)} does not split attention_head_dim {head_dim} into "
            f"{_POSITION_AXES} even parts (the rotary channels of the pipeline's {_POSITION_AXES} position axes, which "
            f"must sum to the head size), so its forward fails; give {_POSITION_AXES} even numbers summing to {head_dim} "
            f"in the transformer's config.json (FLUX.1: [16, 56, 56] for 128)",
            field="axes_dims_rope", value=list(axes),
        )


def _ids(ids: torch.Tensor) -> torch.Tensor:
    """(L, 3) position ids; the deprecated batched (B, L, 3) form is read as diffusers reads it (row 0)."""
    return ids[0] if ids.ndim == 3 else ids


def _rotary_rows(
    context: Context, num_text: int, indices: torch.Tensor | None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The text rows (T, d) and the image rows of the tokens run: all (N, d), or the selected (B, k, d)."""
    cos, sin = context["rotary_cos"], context["rotary_sin"]
    text = (cos[:num_text], sin[:num_text])
    image = (cos[num_text:], sin[num_text:])
    if indices is not None:
        image = (image[0][indices], image[1][indices])
    return text, image


def _joined_rotary(
    text_rope: tuple[torch.Tensor, torch.Tensor], image_rope: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary rows of [text, image tokens], as the single-stream blocks read them."""
    return tuple(torch.cat([t, i], dim=-2) for t, i in zip(_broadcast(text_rope, image_rope), image_rope))


def _broadcast(
    text_rope: tuple[torch.Tensor, torch.Tensor], image_rope: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The text rows expanded to the image rows' batch shape, so both concatenate along the sequence."""
    return tuple(t.expand(*i.shape[:-2], *t.shape) for t, i in zip(text_rope, image_rope))


def _qkv(
    attn: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], added: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V (B, L, H*d) of a FluxAttention: per-head RMS norm of Q and K, then the rotary rows."""
    to_q, to_k, to_v = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if added else (attn.to_q, attn.to_k, attn.to_v)
    norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
    query = apply_rotary(norm_q(to_q(x).unflatten(-1, (-1, attn.head_dim))), rope)
    key = apply_rotary(norm_k(to_k(x).unflatten(-1, (-1, attn.head_dim))), rope)
    return query.flatten(2), key.flatten(2), to_v(x)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate (B, L, H, d) pairs by (L, d) or (B, L, d) cos / sin rows, in float32 as diffusers does."""
    cos, sin = (t.unsqueeze(-2) for t in rope)
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _token_grid(pipe: Any, arguments: dict[str, Any]) -> Grid:
    """The packed-token grid of a FluxPipeline call: one token per 2x2 latent cells, as the pipeline packs them."""
    default = pipe.default_sample_size * pipe.vae_scale_factor
    per_token = pipe.vae_scale_factor * 2
    for name in ("height", "width"):
        check_image_side(name, arguments.get(name))  # a number: a string or NaN would fail in the arithmetic below
    height, width = arguments.get("height") or default, arguments.get("width") or default
    height, width = int(height), int(width)  # as diffusers reads a float size (64.0)
    for name, pixels in (("height", height), ("width", width)):
        if pixels // per_token < 1:  # diffusers would run it on an image of no tokens
            raise ConfigError(
                f"{name}={pixels} is less than one FLUX token ({per_token} pixels): use {per_token} or more, a multiple of {per_token}",
                field=name, value=pixels,
            )
    return Grid(height // per_token, width // per_token)


def _check_call(arguments: dict[str, Any], pipeline: str = "FluxPipeline") -> None:
    """Refuse the options of FLUX's `pipeline` class that catrt cannot run, by name (the class the user called)."""
    has_negative = arguments.get("negative_prompt") is not None or (  # diffusers' rule for true CFG
        arguments.get("negative_prompt_embeds") is not None and arguments.get("negative_pooled_prompt_embeds") is not None
    )
    if float(arguments.get("true_cfg_scale") or 1.0) > 1.0 and has_negative:
        raise UnsupportedModelError(
            "FLUX true_cfg_scale > 1 with a negative prompt calls the transformer twice per step, which catrt does not "
            "support; use the distilled guidance (guidance_scale) instead"
        )
    for name in ("ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image", "negative_ip_adapter_image_embeds"):
        if arguments.get(name) is not None:
            raise UnsupportedModelError(f"{pipeline} argument {name!r} (IP-adapter) is not supported by catrt")
    refuse_call_attention_kwargs(pipeline, arguments)


def _meta_call(config: dict[str, Any], text_tokens: int, grid: Grid) -> dict[str, Any]:
    """Batch-1 meta tensors shaped like one FluxPipeline step's transformer call (packed latents, position ids)."""
    kwargs = {
        "hidden_states": torch.empty(1, grid.num_tokens, config["in_channels"], device="meta"),
        "timestep": torch.empty(1, device="meta"),
        "encoder_hidden_states": torch.empty(1, text_tokens, config["joint_attention_dim"], device="meta"),
        "pooled_projections": torch.empty(1, config["pooled_projection_dim"], device="meta"),
        "txt_ids": torch.empty(text_tokens, 3, device="meta"),
        "img_ids": torch.empty(grid.num_tokens, 3, device="meta"),
    }
    if config.get("guidance_embeds"):
        kwargs["guidance"] = torch.empty(1, device="meta")
    return kwargs


_TEXT_TO_IMAGE = PipelineSpec(
    call_defaults={}, text_tokenizer="tokenizer_2", text_tokens_before=0, guidance="distilled", token_grid=_token_grid,
    check_call=_check_call,
    # A token packs 2x2 latent cells; a Fill or Control transformer (384 or 128 channels in, 64 out) runs in its own
    # pipeline class, registered with catrt.pipeline.register_pipeline.
    latent_channels=LatentChannels(packing=4, other_layouts="run a FLUX Fill or Control transformer in its own "
                                                            "pipeline class (catrt.pipeline.register_pipeline)"),
)
#: img2img and inpainting run the size asked for (or the default, never the image's: diffusers resizes the image to
#: it), one transformer call per step on the last steps `strength` leaves; inpainting blends its mask outside.
_FROM_IMAGE = replace(_TEXT_TO_IMAGE, strength_argument="strength")

#: FLUX's prompt limit is T5's (tokenizer_2, max_sequence_length); guidance is FLUX-dev's distilled embedding.
FAMILY = register_family(Family(
    "flux", FluxAdapter,
    {
        FluxPipeline: _TEXT_TO_IMAGE,
        FluxImg2ImgPipeline: replace(_FROM_IMAGE, check_call=partial(_check_call, pipeline="FluxImg2ImgPipeline")),
        FluxInpaintPipeline: replace(_FROM_IMAGE, check_call=partial(_check_call, pipeline="FluxInpaintPipeline")),
    },
    _meta_call,
))
