"""Turn a model name or a folder into a diffusers pipeline.

Names resolve through `loader_for`: the built-in `LOADERS`, one entry per name, then a published model's
`ModelCard` a script added to `MODEL_CARDS`.
Anything that is not a name must be a local diffusers folder (with `model_index.json`).

An engine bundle that carries its own weights asks for the pipeline without the transformer's:
the transformer is then a weightless stand-in on the meta device (its config, classes and dtype,
no parameter data), and a published model's transformer weights are never read.
"""

from __future__ import annotations

import logging
import os
import types
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline
from torch import nn

from catrt.errors import PATH_ECHO_LIMIT, CatrtError, ConfigError, UnsupportedModelError, echo
from catrt.hub_errors import hub_error, is_hub_failure
from catrt.model_cards import MODEL_CARDS, ModelCard, check_model_source
from catrt.models import family_of, pipeline_named, transformer_named
from catrt.reference.pipeline import load_reference_pipeline
from catrt.tiny import TINY_PIPELINES, build_tiny_pipeline

logger = logging.getLogger(__name__)

Loader = Callable[[torch.dtype, bool], DiffusionPipeline]

def _from_pretrained(
    cls: type[DiffusionPipeline], source: str, dtype: torch.dtype, transformer_weights: bool = True
) -> DiffusionPipeline:
    """`from_pretrained` with `torch_dtype`, the spelling every supported diffusers accepts.

    diffusers 0.42 renamed it `dtype` and warns on the old name; older releases lack `dtype`.
    Without transformer weights the transformer component is skipped and a stand-in is made from
    its config.
    """
    skip = {} if transformer_weights else {"transformer": None}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*torch_dtype.*deprecated", FutureWarning)
        pipeline = cls.from_pretrained(source, torch_dtype=dtype, **skip)
    if not transformer_weights:
        transformer_class = _transformer_class(source)
        config = transformer_class.load_config(source, subfolder="transformer")
        pipeline.transformer = weightless_transformer(transformer_class, config, dtype)
    return pipeline


def _transformer_class(source: str) -> type[nn.Module]:
    """The transformer class a pipeline folder or hub repo names in its model_index.json as [module, class], as its
    loaded (weighted) pipeline has it: a registered family's class saved from that module (diffusers records a class
    of its own by its module, and a family's subclass may keep the diffusers class's name), else diffusers' class,
    else a registered class of that name."""
    module, name = DiffusionPipeline.load_config(source)["transformer"]
    found = transformer_named(name, module)
    if found is None and isinstance(name, str) and hasattr(diffusers, name):
        found = getattr(diffusers, name)
    found = found or transformer_named(name)
    if found is None:
        raise UnsupportedModelError(
            f"transformer class {echo(name)} is neither diffusers' nor a registered catrt family's; register its "
            f"family (catrt.models.register_family) before loading", field="transformer", value=name,
        )
    return found


def weightless_transformer(transformer_class: type[nn.Module], config: dict, dtype: torch.dtype) -> nn.Module:
    """A transformer with `config` on the meta device: shapes, classes and dtype, no parameter data.

    Its `to` takes a dtype and leaves the device: torch cannot copy meta tensors anywhere, and diffusers'
    `pipe.to("cuda")` (the idiom, on `fast.pipe` as on any pipeline) calls `to` on every component."""
    with torch.device("meta"):
        module = transformer_class.from_config(config)
    module = nn.Module.to(module, dtype=dtype).eval().requires_grad_(False)
    module.to = types.MethodType(_dtype_only_to, module)
    return module


def _dtype_only_to(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """`nn.Module.to` for a weightless stand-in: the dtype asked for (a call still sees the pipeline's dtype, and
    is refused where the build's differs), no device (nothing to move)."""
    dtype = _to_dtype(args, kwargs)
    return module if dtype is None else nn.Module.to(module, dtype=dtype)


def _to_dtype(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.dtype | None:
    """The dtype a `to(...)` call's arguments ask for (`dtype=`, a dtype, or a tensor's), else None."""
    if kwargs.get("dtype") is not None:
        return kwargs["dtype"]
    tensor = kwargs.get("tensor")
    for arg in (*args, tensor):
        if isinstance(arg, torch.dtype):
            return arg
        if isinstance(arg, torch.Tensor):
            return arg.dtype
    return None


def _without_weights(pipeline: DiffusionPipeline, dtype: torch.dtype) -> DiffusionPipeline:
    """Swap a built pipeline's transformer for its weightless stand-in."""
    transformer = pipeline.transformer
    pipeline.transformer = weightless_transformer(type(transformer), dict(transformer.config), dtype)
    return pipeline


def _load_published(card: ModelCard, dtype: torch.dtype, transformer_weights: bool) -> DiffusionPipeline:
    """Load a published model from the hub (or the local hub cache) by its card's hub id; a failed download (gated,
    offline, not cached) is one catrt error saying what to do, from Python as from the CLI and the server."""
    try:
        return _from_pretrained(family_of(card.family).pipeline_class, card.hub_id, dtype, transformer_weights)
    except CatrtError:
        raise
    except Exception as error:
        if not is_hub_failure(error):
            raise
        raise hub_error(card, error) from error


def _load_tiny(name: str, dtype: torch.dtype, transformer_weights: bool) -> DiffusionPipeline:
    """Build a tiny random-weight pipeline with the default seed."""
    pipeline = build_tiny_pipeline(name, dtype=dtype)
    return pipeline if transformer_weights else _without_weights(pipeline, dtype)


def _load_reference(dtype: torch.dtype, transformer_weights: bool) -> DiffusionPipeline:
    pipeline = load_reference_pipeline(dtype=dtype)
    return pipeline if transformer_weights else _without_weights(pipeline, dtype)


LOADERS: dict[str, Loader] = {
    **{name: partial(_load_tiny, name) for name in TINY_PIPELINES},
    **{name: partial(_load_published, card) for name, card in MODEL_CARDS.items() if card.hub_id},
    "reference": _load_reference,
}


def loader_for(name: str) -> Loader | None:
    """How `name` loads: a built-in name, or a published model's card added to `MODEL_CARDS` at run time (by the
    script that registers its family), which `check_model_source` already accepts; None for a folder path."""
    if name in LOADERS:
        return LOADERS[name]
    card = MODEL_CARDS.get(name)
    return partial(_load_published, card) if card is not None and card.hub_id else None


def _load_folder(folder: str, dtype: torch.dtype, transformer_weights: bool) -> DiffusionPipeline:
    """A local diffusers folder; one that diffusers cannot load (a component missing or corrupt, a pipeline class
    diffusers does not know) is a ConfigError naming the folder and diffusers' reason, not its traceback."""
    try:
        return _from_pretrained(_pipeline_class(folder), folder, dtype, transformer_weights)
    except Exception as error:  # diffusers raises OSError, ValueError, AttributeError, KeyError... for a bad folder
        reason = next(iter(str(error).splitlines()), "")
        raise ConfigError(
            f"could not load the model folder {echo(folder, PATH_ECHO_LIMIT)} as a diffusers pipeline ({type(error).__name__}: {reason}); "
            f"pass a folder written by a diffusers pipeline's save_pretrained, or a catrt model name",
            field="model", value=folder,
        ) from error


def _pipeline_class(folder: str) -> type[DiffusionPipeline]:
    """The class that loads `folder`: DiffusionPipeline finds a pipeline class by its saved name in diffusers
    only, so a pipeline class registered with catrt and not in diffusers (the reference model's) loads itself."""
    try:
        name = DiffusionPipeline.load_config(folder).get("_class_name")
    except (OSError, ValueError):
        return DiffusionPipeline  # its load says what is wrong with the folder
    if not isinstance(name, str) or hasattr(diffusers, name):
        return DiffusionPipeline
    own = pipeline_named(name)
    return own if own is not None and issubclass(own, DiffusionPipeline) else DiffusionPipeline


def usable_device(device: str | torch.device) -> torch.device:
    """The torch device `device` names, refused before any loading when it is no device or this machine has none."""
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {echo(device)} is not a torch device; use cpu, cuda or cuda:N", field="device", value=device) from None
    if found.type == "cuda" and not torch.cuda.is_available():
        build = "" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)"
        raise ConfigError(f"device {echo(device)}: this machine has no usable CUDA GPU{build}; use cpu", field="device", value=device)
    return found


def load_pipeline(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    transformer_weights: bool = True,
) -> DiffusionPipeline:
    """Load a pipeline by catrt name or from a local diffusers folder, then move it to `device`.

    Names win over folders of the same name, so `sd3` always means the published model. A folder
    without `model_index.json` is refused here rather than by a deeper diffusers error. With
    `transformer_weights=False` the transformer is a weightless stand-in (for engine bundles).
    """
    device = usable_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(
            f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, torch.float16), got {echo(dtype)}",
            field="dtype", value=dtype,
        )
    key = check_model_source(name_or_path)
    loader = loader_for(key)
    if loader is not None:
        logger.info("loading %s as %s", key, dtype)
        pipeline = loader(dtype, transformer_weights)
    else:
        logger.info("loading diffusers folder %s as %s", key, dtype)
        pipeline = _load_folder(key, dtype, transformer_weights)
    if transformer_weights:
        return pipeline.to(device)
    stand_in, pipeline.transformer = pipeline.transformer, None  # meta tensors cannot be moved
    pipeline.to(device)
    pipeline.transformer = stand_in
    return pipeline
