"""The tensors a pipeline hands its transformer, checked against what the transformer takes.

A latent, prompt embedding or pooled projection of the wrong width, rank, batch or dtype (a user's
`latents=` or `prompt_embeds=`, a callback's swap, a pipeline moved to another dtype after
`catrt.load`) would otherwise fail deep inside a matmul, a conv or an engine's scatter. The expected
shapes are the family's `meta_call` (the same declaration `catrt macs` counts with), made for the
call's own text length and token grid, so only the fixed dimensions are compared: widths and ranks
exactly, a batch dimension as 1 (broadcast, as diffusers allows) or the latents' batch. Position
ids and other inputs the adapters read themselves are left to them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from catrt.errors import ConfigError
from catrt.models.base import Adapter
from catrt.models.registry import FAMILIES
from catrt.tokens import Grid

#: Inputs the transformer's own layers consume directly, so they must have its weights' dtype and widths.
WEIGHT_DTYPE_INPUTS: tuple[str, ...] = ("hidden_states", "encoder_hidden_states", "pooled_projections")
#: Those the pipeline's text encoders make: a width of theirs other than the transformer's is named by its config key.
TEXT_INPUTS: tuple[str, ...] = ("encoder_hidden_states", "pooled_projections")


def check_transformer_inputs(
    adapter: Adapter, arguments: dict[str, Any], grid: Grid | None = None, shapes: bool = True
) -> None:
    """Raise a ConfigError naming the first transformer input whose dtype, device, rank, width or batch cannot run.

    `arguments`: the transformer call's arguments by name (hidden_states included); `grid`: the token grid
    where the latents do not carry it (packed latents); `shapes`: check shapes too (a generation's first
    call: later ones the runtime holds to the first's shapes). Families without a meta call are not checked.
    """
    hidden_states = arguments.get("hidden_states")
    if not isinstance(hidden_states, torch.Tensor):
        return
    dtype = adapter.dtype
    for name in WEIGHT_DTYPE_INPUTS:
        tensor = arguments.get(name)
        if isinstance(tensor, torch.Tensor) and tensor.dtype != dtype:
            raise ConfigError(
                f"the transformer's input {name!r} is {_dtype(tensor.dtype)} but the transformer runs {_dtype(dtype)}; "
                f"pass latents and prompt embeddings of the pipeline's dtype (or move the pipeline with pipe.to)",
                field=name, value=_dtype(tensor.dtype),
            )
    _check_device(adapter, arguments)
    if not shapes:
        return
    family = next((f for f in FAMILIES.values() if f.adapter is type(adapter)), None)
    text = arguments.get("encoder_hidden_states")
    if family is None or family.meta_call is None or not isinstance(text, torch.Tensor) or text.ndim < 2:
        return
    config = dict(adapter.transformer.config)
    ranks = family.meta_call(config, 1, Grid(1, 1))  # ranks do not depend on the sizes
    _check(adapter, arguments, ranks, hidden_states.shape[0], rank_only=True)
    grid = adapter.latent_grid(hidden_states) or grid
    if grid is None or (hidden_states.ndim == 3 and hidden_states.shape[1] != grid.num_tokens):
        return  # packed latents of another token count: the runtime names the grid they miss
    expected = family.meta_call(config, int(text.shape[1]), grid)
    _check(adapter, arguments, expected, hidden_states.shape[0], width_key=partial(_width_key, family.meta_call, config))


def _check_device(adapter: Adapter, arguments: dict[str, Any]) -> None:
    """Every tensor argument on the transformer's device (a weightless stand-in's meta device checks nothing).

    A CPU prompt embedding or position id handed to a CUDA transformer would fail deep in a matmul, after
    the runtime made its step buffers for this shape from it.
    """
    device = adapter.device
    if device.type == "meta":
        return
    for name, tensor in arguments.items():
        if isinstance(tensor, torch.Tensor) and tensor.device != device:
            raise ConfigError(
                f"the transformer's input {name!r} is on {tensor.device} but the transformer runs on {device}; pass "
                f"latents, prompt embeddings and other tensors on the pipeline's device (or move the pipeline with pipe.to)",
                field=name, value=str(tensor.device),
            )


def _check(
    adapter: Adapter,
    arguments: dict[str, Any],
    expected: dict[str, Any],
    batch: int,
    rank_only: bool = False,
    width_key: Callable[[str], str | None] | None = None,
) -> None:
    for name in WEIGHT_DTYPE_INPUTS:
        tensor, meta = arguments.get(name), expected.get(name)
        if not isinstance(tensor, torch.Tensor) or not isinstance(meta, torch.Tensor):
            continue
        shape, wanted = tuple(tensor.shape), tuple(meta.shape)
        if len(shape) == len(wanted) and (rank_only or _fits(shape, wanted, batch)):
            continue
        sizes = ("B", *wanted[1:]) if wanted[:1] == (1,) else wanted
        takes = f"{len(wanted)}-D tensors" if rank_only else f"{_shape(sizes)} here (B = {batch}, the latents' batch)"
        key = width_key(name) if width_key is not None and name in TEXT_INPUTS and _fits(shape[:-1], wanted[:-1], batch) else None
        hint = "" if key is None else (
            f"; {wanted[-1]} is the transformer config's {key}, so a model whose text encoders give {shape[-1]} needs "
            f"{key} {shape[-1]} in its transformer/config.json"
        )
        raise ConfigError(
            f"the transformer's input {name!r} has shape {shape}, but this {type(adapter.transformer).__name__} takes "
            f"{takes}: check the latents, prompt embeddings and other tensors passed to the call{hint}",
            field=name, value=shape,
        )


def _width_key(meta_call: Callable[..., dict[str, Any]], config: dict[str, Any], name: str) -> str | None:
    """The transformer config key that sets the width (last size) of input `name` in the family's meta call, or None.

    Found by asking the meta call itself (the one declaration of the inputs' shapes) which whole-number key moves that
    width, so a text width the model's own text encoders do not give is named by the config key to fix (SD3 and FLUX:
    joint_attention_dim, pooled_projection_dim; PixArt: caption_channels)."""
    width = meta_call(config, 1, Grid(1, 1))[name].shape[-1]
    for key, value in config.items():
        if isinstance(value, int) and not isinstance(value, bool) and value == width:
            try:
                moved = meta_call({**config, key: value + 1}, 1, Grid(1, 1))[name].shape[-1]
            except Exception:  # a registered family's meta call may refuse the changed config its own way: no hint there
                continue
            if moved != width:
                return key
    return None


def _fits(shape: tuple[int, ...], expected: tuple[int, ...], batch: int) -> bool:
    """The meta call's sizes; a leading batch dimension (1 in the meta call) may be 1 or the latents' batch."""
    if shape[1:] != expected[1:]:
        return False
    return shape[:1] == expected[:1] or (expected[:1] == (1,) and shape[0] in (1, batch))


def _shape(shape: tuple[Any, ...]) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ")"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
