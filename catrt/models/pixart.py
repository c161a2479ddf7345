"""Adapter for diffusers' `PixArtTransformer2DModel` in the PixArt-Sigma layout.

Self-attention over image tokens uses the K/V cache; the cross-attention keys and values over the
text are the same at every step, so they are computed once per generation in `prepare_context`
(an engine bundle's "context" graph).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from catrt.errors import ConfigError, UnsupportedModelError
from catrt.models.attention import attention, project_qkv, unfuse_hint
from catrt.models.base import Adapter, Context, KVStore, refuse_other_text_width, refuse_without_blocks
from catrt.models.registry import Family, register_family
from catrt.pipeline_spec import LatentChannels, PipelineSpec
from catrt.tokens import Grid


def _check_out_channels(transformer: nn.Module) -> None:
    """Refuse a prediction the pipelines cannot step the latents by: PixArt's latents have in_channels, and its
    prediction is the noise alone (out_channels = in_channels) or the noise and the learned variance (twice that, whose
    first half the pipeline keeps). diffusers builds any, but its scheduler failed on the mismatched channels after the
    first step, or broadcast a 1-channel prediction over the latents silently; a null out_channels failed in the
    pipeline's own `config.out_channels // 2`."""
    config, out = transformer.config, transformer.out_channels
    if config.out_channels is None:  # the transformer predicts in_channels, but the pipelines read the config's
        raise ConfigError(
            f"PixArtTransformer2DModel config out_channels is null: the transformer predicts in_channels "
            f"({config.in_channels}) channels, but the PixArt pipelines read config.out_channels at every step "
            f"(out_channels // 2), which fails on null; set out_channels to {config.in_channels} (or "
            f"{2 * config.in_channels} for a learned variance) in the transformer's config.json",
            field="out_channels", value=None,
        )
    if out not in (config.in_channels, 2 * config.in_channels):
        raise ConfigError(
            f"PixArtTransformer2DModel config out_channels {out} with in_channels {config.in_channels}: the pipeline "
            f"steps latents of in_channels by the prediction (or its first half, where out_channels is twice in_channels: "
            f"a learned variance), so its scheduler fails (or broadcasts a 1-channel prediction silently); set "
            f"out_channels to {config.in_channels} or {2 * config.in_channels} in the transformer's config.json",
            field="out_channels", value=out,
        )


class PixArtAdapter(Adapter):
    """BasicTransformerBlock with ada_norm_single: self-attention, cross-attention, MLP.

    K/V slots per block: the self-attention's image K and V.
    """

    transformer_class = PixArtTransformer2DModel

    def check_layout(self, transformer: nn.Module) -> None:
        config = transformer.config
        refuse_without_blocks(transformer, len(transformer.transformer_blocks), ("num_layers",))
        if config.caption_channels is None:
            raise UnsupportedModelError(
                "PixArt transformer without caption projection is not supported (its config's caption_channels is None: "
                "catrt makes the cross-attention K/V of the projected T5 text)",
                field="caption_channels",
            )
        if transformer.pos_embed.layer_norm:
            raise UnsupportedModelError("PixArt patch embedding with layer_norm=True is not supported")
        refuse_other_text_width(
            transformer, "cross_attention_dim", "PixArtTransformer2DModel",
            "the caption projection hands the cross-attention the text",
        )
        _check_out_channels(transformer)
        for index, block in enumerate(transformer.transformer_blocks):
            if block.only_cross_attention or block.attn2 is None or block.pos_embed is not None:
                no_cross = "; this one has no cross-attention (its config's cross_attention_dim is None)"
                missing = no_cross if block.attn2 is None else ""
                raise UnsupportedModelError(
                    f"PixArt block {index}: only self-attention + cross-attention blocks are supported "
                    f"(only_cross_attention, double_self_attention and positional blocks are not){missing}",
                    field="cross_attention_dim" if missing else None,
                )
            if getattr(block, "fuser", None) is not None:
                raise UnsupportedModelError(f"PixArt block {index}: GLIGEN attention_type is not supported")
            for attn in (block.attn1, block.attn2):
                if type(attn.processor) is not AttnProcessor2_0:
                    raise UnsupportedModelError(
                        f"PixArt block {index} uses attention processor {type(attn.processor).__name__}; "
                        f"catrt prunes only the default AttnProcessor2_0{unfuse_hint(attn)}"
                    )
                if attn.residual_connection or attn.rescale_output_factor != 1.0 or attn.norm_cross:
                    raise UnsupportedModelError(f"PixArt block {index}: non-default attention options are not supported")
                if attn is block.attn2 and (attn.norm_q is not None or attn.norm_k is not None):
                    raise UnsupportedModelError(f"PixArt block {index}: cross-attention QK-norm is not supported")
            if block._chunk_size is not None:
                raise UnsupportedModelError(f"PixArt block {index} uses feed-forward chunking, which catrt does not support")

    @property
    def num_kv_slots(self) -> int:
        return 2 * len(self.transformer.transformer_blocks)

    def context_inputs(self, call_kwargs: dict[str, Any]) -> Context:
        if call_kwargs.get("attention_mask") is not None:
            raise UnsupportedModelError("PixArt image attention_mask is not supported by catrt")
        if call_kwargs.get("cross_attention_kwargs"):
            raise UnsupportedModelError("PixArt cross_attention_kwargs are not supported by catrt")
        text = call_kwargs["encoder_hidden_states"]
        inputs: Context = {"encoder_hidden_states": text}
        mask = call_kwargs.get("encoder_attention_mask")
        if mask is not None:
            if mask.ndim == 2:  # 1 = keep, 0 = discard -> additive bias, as diffusers converts it
                mask = ((1 - mask.to(text.dtype)) * -10000.0).unsqueeze(1)
            inputs["encoder_attention_bias"] = mask.unsqueeze(1)  # (B, 1, 1, T)
        added = call_kwargs.get("added_cond_kwargs") or {}
        for name in ("resolution", "aspect_ratio"):
            if added.get(name) is not None:
                inputs[name] = added[name]
            elif self.transformer.use_additional_conditions:
                raise ConfigError(
                    f"this PixArt transformer embeds the image resolution and aspect ratio (use_additional_conditions, "
                    f"as PixArt-Alpha at 1024): the call needs added_cond_kwargs {name!r}; PixArtAlphaPipeline passes "
                    f"them for a transformer of sample_size 128, PixArtSigmaPipeline never does",
                    field="added_cond_kwargs", value=name,
                )
        return inputs

    def prepare_context(self, inputs: Context, latent_shape: tuple[int, ...]) -> Context:
        """Adds the caption projection's cross-attention K/V of every block (2L, B, T, D)."""
        model = self.transformer
        text = inputs["encoder_hidden_states"]
        text = model.caption_projection(text).view(text.shape[0], -1, self.hidden_dim)
        cross_kv = []
        for block in model.transformer_blocks:
            cross_kv += [block.attn2.to_k(text), block.attn2.to_v(text)]
        return {**super().prepare_context(inputs, latent_shape), "cross_kv": torch.stack(cross_kv)}

    def run_blocks(self, tokens: torch.Tensor, timestep: torch.Tensor, context: Context, store: KVStore) -> torch.Tensor:
        model = self.transformer
        batch = tokens.shape[0]
        added = {name: context.get(name) for name in ("resolution", "aspect_ratio")}
        modulation, embedded_timestep = model.adaln_single(
            timestep, added, batch_size=batch, hidden_dtype=tokens.dtype
        )
        bias = context.get("encoder_attention_bias")
        for index, block in enumerate(model.transformer_blocks):
            cross_kv = context["cross_kv"][2 * index], context["cross_kv"][2 * index + 1]
            tokens = store.run_block(self._block, block, 2 * index, 2, tokens, modulation, cross_kv, bias)
        shift, scale = (model.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        out = model.norm_out(tokens) * (1 + scale) + shift
        return model.proj_out(out)

    def first_block(self, tokens: torch.Tensor, timestep: torch.Tensor, context: Context) -> torch.Tensor:
        model = self.transformer
        added = {name: context.get(name) for name in ("resolution", "aspect_ratio")}
        modulation, _ = model.adaln_single(timestep, added, batch_size=tokens.shape[0], hidden_dtype=tokens.dtype)
        store = KVStore(None, None, in_place=False)  # fresh K/V kept aside, the cache untouched
        cross_kv = context["cross_kv"][0], context["cross_kv"][1]
        return self._block(model.transformer_blocks[0], store, tokens, modulation, cross_kv, context.get("encoder_attention_bias"))

    def _block(
        self,
        block: nn.Module,
        store: KVStore,
        x: torch.Tensor,
        modulation: torch.Tensor,
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        cross_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """One BasicTransformerBlock (ada_norm_single) on the given image tokens; self-attention K/V in slots 0-1.

        `cross_kv`: this block's cross-attention K and V of the text; `cross_bias`: the text mask's additive bias.
        """
        batch = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + modulation.reshape(batch, 6, -1)
        ).chunk(6, dim=1)
        nx = block.norm1(x) * (1 + scale_msa) + shift_msa
        query, key, value = project_qkv(block.attn1, nx)
        key, value = store.exchange(0, key), store.exchange(1, value)
        self_attention = attention(
            query, key, value, block.attn1.heads, recorder=self.recorder, num_image_keys=key.shape[1]
        )
        x = x + gate_msa * block.attn1.to_out[0](self_attention)

        query = block.attn2.to_q(x)
        cross = attention(query, *cross_kv, block.attn2.heads, cross_bias)
        x = x + block.attn2.to_out[0](cross)

        nx = block.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * block.ff(nx)


def _meta_call(config: dict[str, Any], text_tokens: int, grid: Grid) -> dict[str, Any]:
    """Batch-1 meta tensors shaped like one PixArt denoising step's transformer call.

    The resolution (B, 2) and aspect ratio (B, 1) are given always: a transformer with
    `use_additional_conditions` (PixArt-Alpha at 1024, whose pipeline passes them) embeds them and failed on
    None deep in diffusers; one without ignores them.
    """
    patch = config["patch_size"]
    return {
        "hidden_states": torch.empty(1, config["in_channels"], grid.height * patch, grid.width * patch, device="meta"),
        "timestep": torch.empty(1, device="meta"),
        "encoder_hidden_states": torch.empty(1, text_tokens, config["caption_channels"], device="meta"),
        "added_cond_kwargs": {
            "resolution": torch.empty(1, 2, device="meta"), "aspect_ratio": torch.empty(1, 1, device="meta"),
        },
    }


#: diffusers' PixArt-Sigma resolution bins: transformer sample size -> table (256 to 2048 pixels).
BINNED_SAMPLE_SIZES = (32, 64, 128, 256)
#: PixArtAlphaPipeline's: 256 to 1024 pixels (no 2048 table; a 256-cell transformer raises "Invalid sample size").
ALPHA_BINNED_SAMPLE_SIZES = (32, 64, 128)


def _default_fixes(pipe: Any) -> dict[str, Any]:
    """PixArt's `use_resolution_binning=True` default raises "Invalid sample size" for a transformer without a bin
    table (a 128-pixel one): such a pipeline runs at the size asked for, the only size it can run."""
    binned = ALPHA_BINNED_SAMPLE_SIZES if isinstance(pipe, PixArtAlphaPipeline) else BINNED_SAMPLE_SIZES
    if pipe.transformer.config.sample_size in binned:
        return {}
    return {"use_resolution_binning": False}


_SIGMA = PipelineSpec(
    call_defaults={"use_resolution_binning": False, "clean_caption": False}, text_tokens_before=0,
    default_fixes=_default_fixes, latent_channels=LatentChannels(learned_variance=True),
)

#: Resolution binning would silently change the requested size; clean_caption needs extra packages. PixArt-Alpha
#: runs the same transformer class with the same call (T5 text, 120 tokens by its own max_sequence_length default).
FAMILY = register_family(Family(
    "pixart", PixArtAdapter,
    {PixArtSigmaPipeline: _SIGMA, PixArtAlphaPipeline: _SIGMA},
    _meta_call,
))
