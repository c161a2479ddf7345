"""Per-family adapters, chosen by the class of the loaded diffusers transformer."""

from __future__ import annotations

from torch import nn

from catrt.errors import UnsupportedModelError
from catrt.models.base import Adapter, Context
from catrt.tokens import Grid, patchify, unpatchify
from catrt.models.pixart import PixArtAdapter
from catrt.models.sd3 import SD3Adapter

ADAPTERS: dict[type[nn.Module], type[Adapter]] = {
    SD3Adapter.transformer_class: SD3Adapter,
    PixArtAdapter.transformer_class: PixArtAdapter,
}


def make_adapter(transformer: nn.Module) -> Adapter:
    """The adapter for a loaded transformer; refuses classes catrt cannot prune."""
    adapter_class = ADAPTERS.get(type(transformer))
    if adapter_class is None:
        supported = ", ".join(cls.__name__ for cls in ADAPTERS)
        raise UnsupportedModelError(
            f"no catrt adapter for transformer class {type(transformer).__name__}; supported: {supported}"
        )
    return adapter_class(transformer)


__all__ = ["ADAPTERS", "Adapter", "Context", "Grid", "make_adapter", "patchify", "unpatchify"]
