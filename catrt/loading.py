"""Turn a model name or a folder into a diffusers pipeline.

Names resolve through `LOADERS`, one entry per name, so a new model is one more line there.
Anything that is not a name must be a local diffusers folder (with `model_index.json`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline

from catrt.errors import UnknownModelError
from catrt.model_cards import MODEL_CARDS, ModelCard
from catrt.reference.pipeline import load_reference_pipeline
from catrt.tiny import TINY_PIPELINES, build_tiny_pipeline

logger = logging.getLogger(__name__)

Loader = Callable[[torch.dtype], DiffusionPipeline]

_PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "sd3": StableDiffusion3Pipeline,
    "pixart": PixArtSigmaPipeline,
}


def _from_pretrained(
    cls: type[DiffusionPipeline], source: str, dtype: torch.dtype
) -> DiffusionPipeline:
    """`from_pretrained` with `torch_dtype`, the spelling every supported diffusers accepts.

    diffusers 0.42 renamed it `dtype` and warns on the old name; older releases lack `dtype`.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*torch_dtype.*deprecated", FutureWarning)
        return cls.from_pretrained(source, torch_dtype=dtype)


def _load_published(card: ModelCard, dtype: torch.dtype) -> DiffusionPipeline:
    """Load a published model from the hub (or the local hub cache) by its card's hub id."""
    return _from_pretrained(_PIPELINE_CLASSES[card.family], card.hub_id, dtype)


def _load_tiny(name: str, dtype: torch.dtype) -> DiffusionPipeline:
    """Build a tiny random-weight pipeline with the default seed."""
    return build_tiny_pipeline(name, dtype=dtype)


LOADERS: dict[str, Loader] = {
    **{name: partial(_load_tiny, name) for name in TINY_PIPELINES},
    **{name: partial(_load_published, card) for name, card in MODEL_CARDS.items() if card.hub_id},
    "reference": lambda dtype: load_reference_pipeline(dtype=dtype),
}


def _unknown(value: str | os.PathLike) -> UnknownModelError:
    """The error for a value that is neither a known name nor a folder, listing what would work."""
    return UnknownModelError(
        f"unknown model {str(value)!r}: known names are {', '.join(sorted(LOADERS))}; "
        "a path must be an existing diffusers folder (one with model_index.json)",
        field="model", value=value,
    )


def load_pipeline(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """Load a pipeline by catrt name or from a local diffusers folder, then move it to `device`.

    Names win over folders of the same name, so `sd3` always means the published model. A folder
    without `model_index.json` is refused here rather than by a deeper diffusers error.
    """
    key = os.fspath(name_or_path)
    if key in LOADERS:
        logger.info("loading %s as %s", key, dtype)
        pipeline = LOADERS[key](dtype)
    elif (Path(key) / "model_index.json").is_file():
        logger.info("loading diffusers folder %s as %s", key, dtype)
        pipeline = _from_pretrained(DiffusionPipeline, key, dtype)
    else:
        raise _unknown(name_or_path)
    return pipeline.to(device)
