"""catrt: CAT Pruning (cluster-aware token pruning) for diffusion transformers.

The public names are imported on first use (PEP 562 `__getattr__`), so `import catrt` and the
`catrt` command line's `--help` do not pay for torch and diffusers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY: dict[str, str] = {
    "load": "catrt.bundle",
    "build_engines": "catrt.build",
    "BuildConfig": "catrt.build_config",
    "CATConfig": "catrt.config",
    "CatrtError": "catrt.errors",
    "ConfigError": "catrt.errors",
    "UnknownModelError": "catrt.errors",
    "UnsupportedModelError": "catrt.errors",
    "load_pipeline": "catrt.loading",
    "AcceleratedPipeline": "catrt.pipeline",
    "accelerate": "catrt.pipeline",
}

__all__ = [
    "AcceleratedPipeline",
    "BuildConfig",
    "CATConfig",
    "CatrtError",
    "ConfigError",
    "UnknownModelError",
    "UnsupportedModelError",
    "accelerate",
    "build_engines",
    "load",
    "load_pipeline",
]

if TYPE_CHECKING:  # static tools see the real objects
    from catrt.build import build_engines
    from catrt.build_config import BuildConfig
    from catrt.bundle import load
    from catrt.config import CATConfig
    from catrt.errors import CatrtError, ConfigError, UnknownModelError, UnsupportedModelError
    from catrt.loading import load_pipeline
    from catrt.pipeline import AcceleratedPipeline, accelerate


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'catrt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
