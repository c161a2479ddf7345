"""The image-token layout shared by the adapters, the runtime and the clustering: the grid of a
resolution and the (B, C, H, W) <-> (B, N, C*p*p) patch orders."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    """The image-token grid of a resolution: N = height * width tokens in raster order."""

    height: int
    width: int

    @property
    def num_tokens(self) -> int:
        return self.height * self.width


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
