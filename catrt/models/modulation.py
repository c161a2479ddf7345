"""adaLN modulation and gated residuals as diffusers computes them, in place where that gives the same values."""

from __future__ import annotations

import torch


def modulate_(normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`normed * (1 + scale[:, None]) + shift[:, None]` (diffusers' adaLN), in place on `normed` when the dtypes allow.

    The same two rounded operations in the same order as diffusers, so the same values; in place it
    allocates nothing (a step's fresh (B, N, D) tensors are what costs time on a CPU).
    """
    scale, shift = 1 + scale[:, None], shift[:, None]
    if not _one_dtype(normed, scale, shift):
        return normed * scale + shift
    return normed.mul_(scale).add_(shift)


def gated_add_(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """`x + gate[:, None] * update`, in place on `x` and `update` (both fresh tensors of the caller) when the dtypes allow."""
    gate = gate.unsqueeze(1)
    if not _one_dtype(x, gate, update):
        return x + gate * update
    return x.add_(update.mul_(gate))


def _one_dtype(*tensors: torch.Tensor) -> bool:
    """Whether the tensors share one dtype, so an in-place op keeps the functional result's dtype.

    Compared by attribute, not `torch.result_type`: dynamo cannot trace an op that returns a dtype, and
    each such call split a compiled SD3 forward into a graph per block.
    """
    return all(tensor.dtype == tensors[0].dtype for tensor in tensors[1:])
