"""catrt: CAT Pruning (cluster-aware token pruning) for diffusion transformers."""

from catrt.bundle import load
from catrt.config import CATConfig
from catrt.errors import CatrtError, ConfigError, UnknownModelError, UnsupportedModelError
from catrt.loading import load_pipeline
from catrt.pipeline import AcceleratedPipeline, accelerate

__version__ = "0.1.0"

__all__ = [
    "AcceleratedPipeline",
    "CATConfig",
    "CatrtError",
    "ConfigError",
    "UnknownModelError",
    "UnsupportedModelError",
    "accelerate",
    "load",
    "load_pipeline",
]
