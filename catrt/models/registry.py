"""The model families catrt knows, registered as data: one `Family` per adapter module.

A family names its adapter (which transformer class it serves), the diffusers pipeline classes it
runs with their `PipelineSpec`s (the first is the one published models load as), and how to make a
meta-device transformer call of a given size (for MAC counting without weights). A new family is an
adapter module that declares one `Family` and one `register_family` call; nothing else branches on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from catrt.errors import ConfigError, UnsupportedModelError, echo
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
    """Make a family's adapter, pipelines and meta call known to every part of catrt.

    All or nothing: a half-filled family (an adapter that leaves abstract methods, no transformer class,
    pipelines that are not classes with a `PipelineSpec`) or one that would take over another family's
    name, transformer class or pipeline class is refused, naming what to fix, before anything is
    registered, where it would otherwise fail at its first call or silently replace a built-in family.
    Registering the same family again changes nothing; registering a family of one's own under its name
    again replaces it (its earlier adapter and pipelines are dropped), as re-running a notebook cell does.
    """
    check_family(family)
    earlier = FAMILIES.get(family.name)
    if earlier is not None and earlier != family:
        ADAPTERS.pop(earlier.adapter.transformer_class, None)
        for pipeline_class in earlier.pipelines:
            PIPELINES.pop(pipeline_class, None)
    FAMILIES[family.name] = family
    ADAPTERS[family.adapter.transformer_class] = family.adapter
    PIPELINES.update(family.pipelines)
    return family


def check_family(family: Family) -> None:
    """Raise a ConfigError naming the first part of `family` that cannot be registered."""
    if not isinstance(family, Family):
        raise ConfigError(f"register_family takes a catrt Family, got {type(family).__name__}", field="family")
    name, adapter = family.name, family.adapter
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"Family.name must be a non-empty string, got {echo(name)}", field="name", value=name)
    if not (isinstance(adapter, type) and issubclass(adapter, Adapter)):
        raise ConfigError(f"family {echo(name)}: Family.adapter must be a subclass of catrt's Adapter, got {echo(adapter)}", field="adapter")
    transformer_class = getattr(adapter, "transformer_class", None)
    if not (isinstance(transformer_class, type) and issubclass(transformer_class, nn.Module)):
        raise ConfigError(
            f"family {echo(name)}: {adapter.__name__}.transformer_class must be the diffusers transformer class it serves "
            f"(an nn.Module subclass), got {echo(transformer_class)}",
            field="transformer_class",
        )
    if inspect.isabstract(adapter):
        missing = ", ".join(sorted(adapter.__abstractmethods__))
        raise ConfigError(f"family {echo(name)}: {adapter.__name__} does not implement {missing}", field="adapter", value=missing)
    if not isinstance(family.pipelines, dict) or not family.pipelines:
        raise ConfigError(
            f"family {echo(name)}: Family.pipelines must be a non-empty dict of pipeline classes to PipelineSpec, got "
            f"{echo(family.pipelines)}",
            field="pipelines",
        )
    for pipeline_class, spec in family.pipelines.items():
        if not isinstance(pipeline_class, type) or not isinstance(spec, PipelineSpec):
            raise ConfigError(
                f"family {echo(name)}: Family.pipelines maps pipeline classes to PipelineSpec, got {echo(pipeline_class)}: "
                f"{type(spec).__name__}",
                field="pipelines",
            )
    if family.meta_call is not None and not callable(family.meta_call):
        raise ConfigError(f"family {echo(name)}: Family.meta_call must be callable or None", field="meta_call")
    _check_no_takeover(family)


def is_built_in(family: Family) -> bool:
    """A family catrt ships (its adapter lives in catrt.models): never replaced by a registration."""
    return family.adapter.__module__.startswith("catrt.models.")


def _check_no_takeover(family: Family) -> None:
    """Refuse a family taking a built-in family's name, or another family's transformer or pipeline class."""
    earlier = FAMILIES.get(family.name)
    if earlier is not None and earlier != family and is_built_in(earlier):
        raise ConfigError(
            f"a catrt model family named {echo(family.name)} is built in and already registered; choose another name",
            field="name",
        )
    transformer_class = family.adapter.transformer_class
    for other in FAMILIES.values():
        if other.name == family.name:
            continue
        if other.adapter.transformer_class is transformer_class:
            raise ConfigError(
                f"family {echo(family.name)}: {transformer_class.__name__} is already served by family {echo(other.name)}; "
                f"a transformer class has one adapter (subclass it for another layout)",
                field="adapter",
            )
        shared = [cls.__name__ for cls in family.pipelines if cls in other.pipelines]
        if shared:
            raise ConfigError(
                f"family {echo(family.name)}: pipeline class {shared[0]} is already registered by family {echo(other.name)}",
                field="pipelines",
            )


def pipeline_named(name: str) -> type | None:
    """The registered pipeline class called `name` (as a saved folder or a bundle's manifest names it), else None."""
    return next((cls for cls in PIPELINES if cls.__name__ == name), None)


def transformer_named(name: str, module: str | None = None) -> type[nn.Module] | None:
    """The registered transformer class called `name` (as a saved folder's model_index.json names it), defined in
    `module` where given (two families' classes, or a family's and diffusers', may share a name), else None."""
    return next((cls for cls in ADAPTERS if cls.__name__ == name and module in (None, cls.__module__)), None)


def family_of(name: str) -> Family:
    family = FAMILIES.get(name)
    if family is None:
        raise UnsupportedModelError(f"no catrt model family {echo(name)}; registered: {', '.join(sorted(FAMILIES))}")
    return family


def make_adapter(transformer: nn.Module) -> Adapter:
    """The adapter for a loaded transformer; refuses classes catrt cannot prune."""
    adapter_class = ADAPTERS.get(type(transformer))
    compiled = getattr(transformer, "_orig_mod", None)
    if adapter_class is None and isinstance(compiled, nn.Module) and type(compiled) in ADAPTERS:
        raise UnsupportedModelError(
            f"the transformer is a torch.compile wrapper of {type(compiled).__name__}: catrt runs its own step "
            "functions, so accelerate the uncompiled transformer (pipe.transformer = pipe.transformer._orig_mod) "
            "and pass backend=\"compile\" to compile those",
            field="transformer",
        )
    if adapter_class is None:
        supported = ", ".join(cls.__name__ for cls in ADAPTERS)
        raise UnsupportedModelError(
            f"no catrt adapter for transformer class {type(transformer).__name__}; supported: {supported}"
        )
    return adapter_class(transformer)
