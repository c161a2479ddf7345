"""Adapter for diffusers' `SD3Transformer2DModel`: SD3-medium and SD3.5 (QK-norm, dual attention)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch import nn

from catrt.errors import UnsupportedModelError
from catrt.models.base import Adapter, Context, KVStore, attention, project_qkv

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
        model = self.transformer
        temb = model.time_text_embed(timestep, context["pooled_projections"])
        text = model.context_embedder(context["encoder_hidden_states"])
        for index, block in enumerate(model.transformer_blocks):
            text, tokens = self._block(block, self._slot_of_block[index], tokens, text, temb, store)
        return model.proj_out(model.norm_out(tokens, temb))

    def _block(
        self, block: nn.Module, slot: int, x: torch.Tensor, text: torch.Tensor, temb: torch.Tensor, store: KVStore
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One JointTransformerBlock on the given image tokens (all N, or the k selected)."""
        if block.use_dual_attention:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp, nx2, gate_msa2 = block.norm1(x, emb=temb)
        else:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
        if block.context_pre_only:
            ntext = block.norm1_context(text, temb)
        else:
            ntext, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(text, emb=temb)

        attn = block.attn
        query, key, value = project_qkv(attn, nx)
        t_query, t_key, t_value = project_qkv(attn, ntext, added=True)
        key, value = store.exchange(slot, key), store.exchange(slot + 1, value)
        joint = attention(
            torch.cat([query, t_query], 1),
            torch.cat([key, t_key], 1),
            torch.cat([value, t_value], 1),
            attn.heads,
            recorder=self.recorder,
            num_image_keys=key.shape[1],
        )
        x_attn, text_attn = joint[:, : query.shape[1]], joint[:, query.shape[1] :]
        x = x + gate_msa.unsqueeze(1) * attn.to_out[0](x_attn)

        if block.use_dual_attention:
            attn2 = block.attn2
            query2, key2, value2 = project_qkv(attn2, nx2)
            key2, value2 = store.exchange(slot + 2, key2), store.exchange(slot + 3, value2)
            x = x + gate_msa2.unsqueeze(1) * attn2.to_out[0](
                attention(query2, key2, value2, attn2.heads, recorder=self.recorder, num_image_keys=key2.shape[1])
            )

        nx = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp.unsqueeze(1) * block.ff(nx)

        if block.context_pre_only:
            return None, x
        text = text + c_gate_msa.unsqueeze(1) * attn.to_add_out(text_attn)
        ntext = block.norm2_context(text) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        text = text + c_gate_mlp.unsqueeze(1) * block.ff_context(ntext)
        return text, x
