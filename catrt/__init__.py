"""catrt: CAT Pruning (cluster-aware token pruning) for diffusion transformers."""

from catrt.config import CATConfig
from catrt.errors import CatrtError, ConfigError, UnknownModelError, UnsupportedModelError
from catrt.pipeline import AcceleratedPipeline, accelerate

__version__ = "0.1.0"


def load_pipeline(*args, **kwargs):  # noqa: ANN002, ANN003 - thin re-export, see catrt.loading
    """Load a diffusers pipeline by catrt name, published name or local folder (`catrt.loading`)."""
    from catrt.loading import load_pipeline as _load

    return _load(*args, **kwargs)


__all__ = [
    "AcceleratedPipeline",
    "CATConfig",
    "CatrtError",
    "ConfigError",
    "UnknownModelError",
    "UnsupportedModelError",
    "accelerate",
    "load_pipeline",
]
