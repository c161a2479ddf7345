"""The adapter contract: what every model family gives the runtime.

An adapter wraps a loaded diffusers transformer and uses its modules' weights directly (no copies).
It offers two static-shape functions:

- `full_forward`: all N image tokens through every block; returns the output tokens and the K/V of
  every attention over image tokens (stacked, one slot per cached K or V).
- `pruned_forward`: only k selected tokens through the blocks; their keys/values are written into
  (a copy of) the K/V cache so attention still sees all N image rows; returns the k output tokens and
  their fresh K/V rows (the runtime writes them into its persistent cache).

Both take `context`: the tensors that stay fixed for a whole generation (text embeddings, the
positional table of the resolution), made once by `prepare_context`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from catrt.errors import ConfigError, UnsupportedModelError

Context = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Grid:
    """The image-token grid of a resolution: N = height * width tokens in raster order."""

    height: int
    width: int

    @property
    def num_tokens(self) -> int:
        return self.height * self.width


class Adapter(ABC):
    """One model family's full and pruned forwards over a loaded diffusers transformer."""

    #: The diffusers transformer class this adapter serves.
    transformer_class: type[nn.Module]

    def __init__(self, transformer: nn.Module) -> None:
        if not isinstance(transformer, self.transformer_class):
            raise UnsupportedModelError(
                f"{type(self).__name__} needs a {self.transformer_class.__name__}, got {type(transformer).__name__}"
            )
        self.check_layout(transformer)
        self.transformer = transformer
        self.patch_size: int = transformer.config.patch_size
        self.out_channels: int = transformer.out_channels
        self.in_channels: int = transformer.config.in_channels
        self.recorder: AttentionRecorder | None = None  # set by the runtime for the `attention` rule

    @abstractmethod
    def check_layout(self, transformer: nn.Module) -> None:
        """Raise UnsupportedModelError naming the feature this adapter cannot prune."""

    @property
    @abstractmethod
    def num_kv_slots(self) -> int:
        """How many (B, N, D) K or V tensors one step caches."""

    @property
    def hidden_dim(self) -> int:
        return self.transformer.inner_dim

    def grid(self, latent_height: int, latent_width: int) -> Grid:
        """The token grid of a latent size; raises when the patch size does not divide it."""
        p = self.patch_size
        if latent_height % p or latent_width % p:
            raise ConfigError(
                f"latent size {latent_height}x{latent_width} is not divisible by the patch size {p}; "
                f"choose an image size whose latent is a multiple of {p}",
                field="height" if latent_height % p else "width",
                value=(latent_height, latent_width),
            )
        return Grid(latent_height // p, latent_width // p)

    @abstractmethod
    def prepare_context(self, call_kwargs: dict[str, Any], latent_shape: torch.Size) -> Context:
        """Step-invariant tensors from the pipeline's transformer-call kwargs (once per generation)."""

    def full_forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, context: Context
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) latents -> output tokens (B, N, p*p*C_out) and K/V (S, B, N, D)."""
        tokens = self.transformer.pos_embed(hidden_states)
        return self.run_blocks(tokens, timestep, context, indices=None, kv_cache=None)

    def pruned_forward(
        self,
        patches: torch.Tensor,
        indices: torch.Tensor,
        timestep: torch.Tensor,
        context: Context,
        kv_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected patches (B, k, C*p*p) at `indices` (B, k) -> outputs (B, k, p*p*C_out), K/V rows (S, B, k, D)."""
        tokens = self.embed_patches(patches, indices, context)
        return self.run_blocks(tokens, timestep, context, indices=indices, kv_cache=kv_cache)

    @abstractmethod
    def run_blocks(
        self,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        context: Context,
        indices: torch.Tensor | None,
        kv_cache: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded image tokens (B, N or k, D) through every block and the output head.

        With `indices` and `kv_cache` the tokens are the selected ones and attention reads the cache
        with their rows replaced; without, they are all N tokens. Returns the output tokens and the
        fresh K/V rows (S, B, N or k, D).
        """

    # -- shared pieces -------------------------------------------------------------------------

    def positional_table(self, latent_shape: torch.Size) -> torch.Tensor:
        """(1, N, D): patch-embedding bias plus positional embedding of this resolution.

        The patch embedding of a zero latent is exactly that, so the pruned forward can embed any
        subset of patches as `patches @ W.T + table[indices]` without knowing how a family builds its
        positional code.
        """
        zeros = torch.zeros((1, *latent_shape[1:]), device=self.device, dtype=self.dtype)
        return self.transformer.pos_embed(zeros)

    def embed_patches(self, patches: torch.Tensor, indices: torch.Tensor, context: Context) -> torch.Tensor:
        """(B, k, C*p*p) patches -> (B, k, D) tokens, the same as the conv patch embedding."""
        weight = self.transformer.pos_embed.proj.weight  # (D, C, p, p)
        tokens = patches @ weight.flatten(1).T
        table = context["positional_table"].expand(patches.shape[0], -1, -1)
        return tokens + table.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))

    @property
    def device(self) -> torch.device:
        return self.transformer.pos_embed.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.pos_embed.proj.weight.dtype


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*p*p) in the (c, p, q) order of a conv patch embedding's weight."""
    b, c, h, w = latents.shape
    p = patch_size
    x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, grid: Grid, patch_size: int) -> torch.Tensor:
    """(B, N, p*p*C) in diffusers' (p, q, c) output order -> (B, C, H, W)."""
    b, _, d = tokens.shape
    p = patch_size
    c = d // (p * p)
    x = tokens.reshape(b, grid.height, grid.width, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, grid.height * p, grid.width * p)


def heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H*d) -> (B, H, L, d)."""
    b, length, _ = x.shape
    return x.view(b, length, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) -> (B, L, H*d)."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def project_qkv(
    attn: nn.Module, x: torch.Tensor, added: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V (B, L, H*d) of a diffusers Attention, QK-norm applied per head as diffusers does."""
    to_q, to_k, to_v = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if added else (attn.to_q, attn.to_k, attn.to_v)
    norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
    query, key, value = to_q(x), to_k(x), to_v(x)
    if norm_q is not None:
        query = merge_heads(norm_q(heads(query, attn.heads)))
    if norm_k is not None:
        key = merge_heads(norm_k(heads(key, attn.heads)))
    return query, key, value


def write_rows(cache: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Out-of-place: `cache` (B, N, D) with rows `indices` (B, k) replaced by `rows` (B, k, D)."""
    return cache.scatter(1, indices.unsqueeze(-1).expand(-1, -1, rows.shape[-1]), rows)


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
