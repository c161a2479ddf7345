"""Per-family adapters, chosen by the class of the loaded diffusers transformer."""

from __future__ import annotations

from torch import nn

from catrt.errors import UnsupportedModelError
from catrt.models.base import Adapter, Context
from catrt.models import flux, pixart, sd3
from catrt.pipeline_spec import PipelineSpec
from catrt.tokens import Grid, patchify, unpatchify

ADAPTERS: dict[type[nn.Module], type[Adapter]] = {
    module.ADAPTER.transformer_class: module.ADAPTER for module in (sd3, pixart, flux)
}
#: Each family's pipeline classes and their specs, declared in its adapter module.
FAMILY_PIPELINES: dict[type, PipelineSpec] = {**sd3.PIPELINES, **pixart.PIPELINES, **flux.PIPELINES}


def make_adapter(transformer: nn.Module) -> Adapter:
    """The adapter for a loaded transformer; refuses classes catrt cannot prune."""
    adapter_class = ADAPTERS.get(type(transformer))
    if adapter_class is None:
        supported = ", ".join(cls.__name__ for cls in ADAPTERS)
        raise UnsupportedModelError(
            f"no catrt adapter for transformer class {type(transformer).__name__}; supported: {supported}"
        )
    return adapter_class(transformer)


__all__ = ["ADAPTERS", "FAMILY_PIPELINES", "Adapter", "Context", "Grid", "make_adapter", "patchify", "unpatchify"]
