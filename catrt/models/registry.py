"""The model families catrt knows, registered as data: one `Family` per adapter module.

A family names its adapter (which transformer class it serves), the diffusers pipeline classes it
runs with their `PipelineSpec`s (the first is the one published models load as), and how to make a
meta-device transformer call of a given size (for MAC counting without weights). A new family is an
adapter module that declares one `Family` and one `register_family` call; nothing else branches on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from catrt.errors import UnsupportedModelError
from catrt.models.base import Adapter
from catrt.pipeline_spec import PipelineSpec
from catrt.tokens import Grid

#: (transformer config, text tokens, token grid) -> batch-1 meta-device keyword arguments of one transformer call.
MetaCall = Callable[[dict[str, Any], int, Grid], dict[str, Any]]


@dataclass(frozen=True)
class Family:
    """One model family: its adapter, its pipelines and their specs, and its meta-device call."""

    name: str
    adapter: type[Adapter]
    pipelines: dict[type, PipelineSpec] = field(hash=False)
    meta_call: MetaCall | None = field(default=None, compare=False)

    @property
    def pipeline_class(self) -> type:
        """The pipeline class a published model of this family loads as."""
        return next(iter(self.pipelines))


FAMILIES: dict[str, Family] = {}
ADAPTERS: dict[type[nn.Module], type[Adapter]] = {}
#: Every pipeline class catrt accelerates and its spec (families' and `register_pipeline`'s).
PIPELINES: dict[type, PipelineSpec] = {}


def register_family(family: Family) -> Family:
    """Make a family's adapter, pipelines and meta call known to every part of catrt."""
    FAMILIES[family.name] = family
    ADAPTERS[family.adapter.transformer_class] = family.adapter
    PIPELINES.update(family.pipelines)
    return family


def family_of(name: str) -> Family:
    family = FAMILIES.get(name)
    if family is None:
        raise UnsupportedModelError(f"no catrt model family {name!r}; registered: {', '.join(sorted(FAMILIES))}")
    return family


def make_adapter(transformer: nn.Module) -> Adapter:
    """The adapter for a loaded transformer; refuses classes catrt cannot prune."""
    adapter_class = ADAPTERS.get(type(transformer))
    if adapter_class is None:
        supported = ", ".join(cls.__name__ for cls in ADAPTERS)
        raise UnsupportedModelError(
            f"no catrt adapter for transformer class {type(transformer).__name__}; supported: {supported}"
        )
    return adapter_class(transformer)
