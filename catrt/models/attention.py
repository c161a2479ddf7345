"""The attention the families' adapters compute in place of diffusers' processors, and what they refuse.

Multi-head SDPA over (B, L, H*d) tensors (`attention`, `joint_attention` over concatenated parts), the Q/K/V
projections of a diffusers `Attention` with its QK-norm (`project_qkv`, handing K and V to a `KVStore`), and the
`attention` baseline rule's recorder. That maths equals diffusers' default processors only, so the adapters refuse
the setups it does not cover by name: other (fused, IP-adapter, custom) processors (`unfuse_hint` adds the fix for a
fused one) and call `joint_attention_kwargs` that change attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from catrt.errors import UnsupportedModelError

if TYPE_CHECKING:
    from catrt.models.base import KVStore


def unfuse_hint(attn: nn.Module) -> str:
    """The fix to add to a refused attention processor when it is one of diffusers' fused-QKV ones, which
    `fuse_qkv_projections` sets (its `unfuse_qkv_projections` restores the processors, not the `fused_projections` flag)."""
    fused = type(getattr(attn, "processor", None)).__name__.startswith("Fused")
    return "; unfuse it with pipe.transformer.unfuse_qkv_projections()" if fused else ""



def attention_kwargs_change_nothing(value: Any) -> bool:
    """Whether a transformer call's `joint_attention_kwargs` leave its output as without them: None, {} or only
    diffusers' LoRA `scale` at 1.0 (its own default; LoRA layers, being the modules' own, run as loaded)."""
    if value is None:
        return True
    return isinstance(value, dict) and set(value) <= {"scale"} and value.get("scale", 1.0) == 1.0


def refuse_call_attention_kwargs(pipeline: str, arguments: dict[str, Any]) -> None:
    """A pipeline call's `joint_attention_kwargs` that would change the attention (a LoRA scale other than 1.0, an
    IP-adapter's inputs) is refused before the text encoders or any step run; the adapter refuses the same at its
    first transformer call, which is too late for a call to fail cleanly."""
    value = arguments.get("joint_attention_kwargs")
    if not attention_kwargs_change_nothing(value):
        keys = sorted(value) if isinstance(value, dict) else value
        raise UnsupportedModelError(
            f"{pipeline} argument 'joint_attention_kwargs' {keys!r} is not supported by catrt (no IP-adapter or LoRA "
            f"scale): fuse a LoRA at its scale before catrt.accelerate (pipe.fuse_lora(lora_scale=...)) and call "
            f"without joint_attention_kwargs (or with scale 1.0)"
        )


def heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H*d) -> (B, H, L, d)."""
    b, length, _ = x.shape
    return x.view(b, length, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) -> (B, L, H*d)."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def project_qkv(
    attn: nn.Module,
    x: torch.Tensor,
    added: bool = False,
    store: KVStore | None = None,
    slot: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V (B, L, H*d) of a diffusers Attention, QK-norm applied per head as diffusers does.

    With a `store`, K and V go through it as slots `slot` and `slot + 1` (`KVStore.linear`, or
    `exchange` after a QK-norm) and what it returns comes back.
    """
    to_q, to_k, to_v = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if added else (attn.to_q, attn.to_k, attn.to_v)
    norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
    query = to_q(x)
    if norm_q is not None:
        query = merge_heads(norm_q(heads(query, attn.heads)))
    if store is not None and norm_k is None:
        key = store.linear(slot, to_k, x)
    else:
        key = to_k(x)
        if norm_k is not None:
            key = merge_heads(norm_k(heads(key, attn.heads)))
        if store is not None:
            key = store.exchange(slot, key)
    value = to_v(x) if store is None else store.linear(slot + 1, to_v, x)
    return query, key, value



def joint_attention(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    num_heads: int,
    recorder: AttentionRecorder | None = None,
    num_image_keys: int = 0,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`attention` over the concatenations of (B, L_i, H*d) parts, concatenated per head as diffusers does.

    Concatenating in the head layout gives SDPA contiguous (B, H, L, d) inputs (each head's keys in
    one block, faster for the CPU kernel than (B, L, H, d)-strided ones) for the same copy; the
    values are the same. `out`: (B, H, L, d) buffers to concatenate Q, K and V into instead of new
    tensors. With a `recorder`, the parts are concatenated as (B, L, H*d) for it.
    """
    if recorder is not None and num_image_keys:
        return attention(torch.cat(queries, 1), torch.cat(keys, 1), torch.cat(values, 1), num_heads, None, recorder, num_image_keys)
    joined = []
    for index, parts in enumerate((queries, keys, values)):
        parts = [heads(part, num_heads) for part in parts]
        joined.append(torch.cat(parts, 2) if out is None else torch.cat(parts, 2, out=out[index]))
    return merge_heads(F.scaled_dot_product_attention(*joined))


class AttentionRecorder:
    """Sums the attention mass each image key receives over a step (an AT-EDM-style importance).

    Only the `attention` baseline rule of bench/ uses it: it needs the attention map, which fused
    kernels never materialise, so recording costs an extra explicit softmax per attention.
    """

    def __init__(self) -> None:
        self.importance: torch.Tensor | None = None  # (B, N)

    def record(self, query: torch.Tensor, key: torch.Tensor, num_heads: int, num_image_keys: int) -> None:
        """Add the column sums over the first `num_image_keys` keys of softmax(Q K^T / sqrt(d))."""
        query_heads, key_heads = heads(query, num_heads), heads(key, num_heads)
        scores = query_heads @ key_heads.transpose(-1, -2) / query_heads.shape[-1] ** 0.5
        received = scores.softmax(-1)[..., :num_image_keys].sum(dim=(1, 2))
        self.importance = received if self.importance is None else self.importance + received


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    mask: torch.Tensor | None = None,
    recorder: AttentionRecorder | None = None,
    num_image_keys: int = 0,
) -> torch.Tensor:
    """Multi-head SDPA on (B, L, H*d) tensors; fused kernels allowed, nothing needs the map.

    With a `recorder`, the attention the first `num_image_keys` keys receive is also recorded.
    """
    if recorder is not None and num_image_keys:
        recorder.record(query, key, num_heads, num_image_keys)
    out = F.scaled_dot_product_attention(
        heads(query, num_heads), heads(key, num_heads), heads(value, num_heads), attn_mask=mask
    )
    return merge_heads(out)
