"""Adapter for diffusers' `SD3Transformer2DModel`: SD3-medium and SD3.5 (QK-norm, dual attention)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.activations import GELU
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX
from torch import nn

from catrt.errors import UnsupportedModelError
from catrt.models.base import Adapter, Context, KVStore, attention, gated_add_, joint_attention, modulate_, project_qkv

logger = logging.getLogger(__name__)

_UNSUPPORTED_CALL_ARGS = ("block_controlnet_hidden_states", "joint_attention_kwargs", "skip_layers")


class SD3Adapter(Adapter):
    """Joint (MMDiT) blocks: text and image tokens attend together; the text stream runs in full.

    K/V slots per block: image K and V of the joint attention, then K and V of the image-only second
    attention on SD3.5's dual-attention blocks.
    """

    transformer_class = SD3Transformer2DModel

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__(transformer)
        self._slot_of_block: list[int] = []
        slot = 0
        for block in transformer.transformer_blocks:
            self._slot_of_block.append(slot)
            slot += 4 if block.use_dual_attention else 2
        self._num_slots = slot

    def check_layout(self, transformer: nn.Module) -> None:
        if transformer.pos_embed.layer_norm:
            raise UnsupportedModelError("SD3 patch embedding with layer_norm=True is not supported")
        for index, block in enumerate(transformer.transformer_blocks):
            attentions = [block.attn] + ([block.attn2] if block.use_dual_attention else [])
            for attn in attentions:
                if type(attn.processor) is not JointAttnProcessor2_0:
                    raise UnsupportedModelError(
                        f"block {index} uses attention processor {type(attn.processor).__name__}; catrt prunes "
                        f"only the default JointAttnProcessor2_0 (no IP-adapter, fused or custom processors)"
                    )
            if block._chunk_size is not None:
                raise UnsupportedModelError(f"block {index} uses feed-forward chunking, which catrt does not support")

    @property
    def num_kv_slots(self) -> int:
        return self._num_slots

    def context_inputs(self, call_kwargs: dict[str, Any]) -> Context:
        for name in _UNSUPPORTED_CALL_ARGS:
            if call_kwargs.get(name) is not None:
                raise UnsupportedModelError(f"SD3 transformer argument {name!r} is not supported by catrt")
        return {
            "encoder_hidden_states": call_kwargs["encoder_hidden_states"],
            "pooled_projections": call_kwargs["pooled_projections"],
        }

    def run_blocks(self, tokens: torch.Tensor, timestep: torch.Tensor, context: Context, store: KVStore) -> torch.Tensor:
        """Diffusers' SD3 forward, op for op, with fewer fresh tensors.

        On a CPU a step's time beyond its matmuls and attention is mostly fresh (B, N, D) tensors
        (each new allocation is paged in on first touch), so where diffusers makes a new tensor for
        an elementwise result that only feeds the next op, this updates the tensor in place (the same
        rounded operations in the same order): the adaLN modulations, the gated residual adds, the
        GELU. The output projections read their rows of the joint attention output where they lie
        (`_linear`: no copy of the split halves). A full eager step computes the image K and V
        straight into the cache (`KVStore.linear`). `tokens` (fresh from the base class) is updated
        in place.
        """
        model = self.transformer
        tokens = tokens.contiguous()  # the patch embedding is (B, D, N)-strided, as in diffusers
        temb = model.time_text_embed(timestep, context["pooled_projections"])
        text = model.context_embedder(context["encoder_hidden_states"])
        for index, block in enumerate(model.transformer_blocks):
            text, tokens = self._block(block, self._slot_of_block[index], tokens, text, temb, store)
        return model.proj_out(_ada_norm_continuous(model.norm_out, tokens, temb))

    def _block(
        self, block: nn.Module, slot: int, x: torch.Tensor, text: torch.Tensor, temb: torch.Tensor, store: KVStore
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One JointTransformerBlock on the given image tokens (all N, or the k selected)."""
        if block.use_dual_attention:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp, nx2, gate_msa2 = _ada_norm_zero(block.norm1, x, temb)
        else:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_norm_zero(block.norm1, x, temb)
        if block.context_pre_only:
            ntext = block.norm1_context(text, temb)
        else:
            ntext, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _ada_norm_zero(block.norm1_context, text, temb)

        attn = block.attn
        query, key, value = project_qkv(attn, nx, store=store, slot=slot)
        del nx
        t_query, t_key, t_value = project_qkv(attn, ntext, added=True)
        num_image = query.shape[1]
        joint = joint_attention(
            [query, t_query], [key, t_key], [value, t_value], attn.heads, self.recorder, num_image_keys=key.shape[1]
        )
        del query, key, value, t_query, t_key, t_value
        x = gated_add_(x, gate_msa, attn.to_out[1](_linear(attn.to_out[0], joint[:, :num_image])))

        if block.use_dual_attention:
            attn2 = block.attn2
            query2, key2, value2 = project_qkv(attn2, nx2, store=store, slot=slot + 2)
            del nx2
            out2 = attention(query2, key2, value2, attn2.heads, recorder=self.recorder, num_image_keys=key2.shape[1])
            del query2, key2, value2
            x = gated_add_(x, gate_msa2, attn2.to_out[1](attn2.to_out[0](out2)))
            del out2

        x = gated_add_(x, gate_mlp, _feed_forward(block.ff, modulate_(block.norm2(x), scale_mlp, shift_mlp)))

        if block.context_pre_only:
            return None, x
        text = gated_add_(text, c_gate_msa, _linear(attn.to_add_out, joint[:, num_image:]))
        ntext = modulate_(block.norm2_context(text), c_scale_mlp, c_shift_mlp)
        text = gated_add_(text, c_gate_mlp, _feed_forward(block.ff_context, ntext))
        return text, x


def _ada_norm_zero(norm: nn.Module, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`norm(x, emb=temb)` of an AdaLayerNormZero or SD35AdaLayerNormZeroX, modulating in place."""
    if type(norm) is AdaLayerNormZero and norm.emb is None:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm.linear(norm.silu(temb)).chunk(6, dim=1)
        return modulate_(norm.norm(x), scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp
    if type(norm) is SD35AdaLayerNormZeroX:
        emb = norm.linear(norm.silu(temb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = emb.chunk(9, dim=1)
        normed = norm.norm(x)
        first = (normed * (1 + scale_msa[:, None])).add_(shift_msa[:, None])
        return first, gate_msa, shift_mlp, scale_mlp, gate_mlp, modulate_(normed, scale_msa2, shift_msa2), gate_msa2
    return norm(x, emb=temb)


def _ada_norm_continuous(norm: nn.Module, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """`norm(x, temb)` of an AdaLayerNormContinuous (the output norm), modulating in place."""
    if type(norm) is not AdaLayerNormContinuous:
        return norm(x, temb)
    scale, shift = torch.chunk(norm.linear(norm.silu(temb).to(x.dtype)), 2, dim=1)
    return modulate_(norm.norm(x), scale, shift)


def _feed_forward(ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A diffusers FeedForward on `x`; with a GELU first layer the activation runs in place on its projection."""
    first, *rest = ff.net
    if type(first) is not GELU:
        return ff(x)
    hidden = torch.ops.aten.gelu_(first.proj(x), approximate=first.approximate)
    for module in rest:
        hidden = module(hidden)
    return hidden


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for a (B, L, D) row slice of a larger tensor, read in place.

    `F.linear` first copies a 3-D input whose batches are not adjacent in memory (the image or text
    rows of the joint attention output); a batched matmul with the weight broadcast over the batch
    reads the slice through its strides instead.
    """
    if type(layer) is not nn.Linear or layer.bias is None or x.dim() != 3 or x.is_contiguous() or x.stride(-1) != 1:
        return layer(x)
    return torch.baddbmm(layer.bias, x, layer.weight.t().expand(x.shape[0], -1, -1))
