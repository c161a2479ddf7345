"""Per-family adapters, chosen by the class of the loaded diffusers transformer.

Each family module (sd3, pixart, flux) registers its `Family` when imported; see `registry`.
"""

from __future__ import annotations

from catrt.models import flux, pixart, sd3  # noqa: F401  (each registers its family)
from catrt.models.base import Adapter, Context, PackedTokensAdapter
from catrt.models.registry import (
    ADAPTERS,
    FAMILIES,
    PIPELINES,
    Family,
    family_of,
    make_adapter,
    pipeline_named,
    register_family,
    transformer_named,
)
from catrt.tokens import Grid, patchify, unpatchify

__all__ = [
    "ADAPTERS",
    "FAMILIES",
    "PIPELINES",
    "Adapter",
    "Context",
    "Family",
    "Grid",
    "PackedTokensAdapter",
    "family_of",
    "make_adapter",
    "patchify",
    "pipeline_named",
    "register_family",
    "transformer_named",
    "unpatchify",
]
