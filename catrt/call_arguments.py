"""The diffusers call arguments every accelerated pipeline checks before its first step, naming the argument.

diffusers takes these without checking them, then fails deep in a tokenizer, a reshape or a `torch.cat`
(an empty prompt list, `num_images_per_prompt=0`, a negative height, `max_sequence_length=0`, PixArt's
negative prompts of another count) or runs a silently wrong generation (a NaN distilled guidance, a
keyword PixArt's `**kwargs` swallows unread, such as `attention_kwargs`). Each is one `ConfigError` here,
checked only where the pipeline's `__call__` takes the argument.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

from catrt.config import CATConfig
from catrt.errors import ConfigError, echo
from catrt.pipeline_spec import guidance_value


def check_call_arguments(signature: inspect.Signature, arguments: dict[str, Any], doubles_batch: bool) -> int:
    """The images of a bound pipeline call (`request_batch`); raise a ConfigError naming the first argument that
    diffusers cannot run as meant.

    `arguments`: the call's bound arguments (defaults applied); `doubles_batch`: whether the call runs
    classifier-free guidance, so its negative prompts are read.
    """
    _refuse_swallowed_keywords(signature, arguments)
    _check_kinds(arguments)
    batch = request_batch(arguments)  # a prompt list that is empty or not texts, num_images_per_prompt < 1: refused
    _check_count(arguments, "max_sequence_length", 1)
    for name in ("height", "width"):
        check_image_side(name, arguments.get(name), least=0)
    if "guidance_scale" in arguments and not math.isfinite(guidance_value(arguments["guidance_scale"])):
        raise ConfigError(
            f"guidance_scale must be a finite number, got {echo(arguments['guidance_scale'])}: it would make every image "
            f"NaN (or drop guidance silently)", field="guidance_scale", value=repr(arguments["guidance_scale"]),
        )
    negative, prompt = arguments.get("negative_prompt"), arguments.get("prompt")
    prompts = 1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, (list, tuple)) else None
    if doubles_batch and prompts is not None and isinstance(negative, (list, tuple)) and len(negative) != prompts:
        raise ConfigError(
            f"negative_prompt has {len(negative)} prompts but prompt has {prompts}: give one negative prompt per prompt, "
            f"or one string for all", field="negative_prompt", value=len(negative),
        )
    return batch


def check_image_side(name: str, size: Any, least: float = -math.inf) -> None:
    """A call's height or width: None (the pipeline's default) or a finite number of pixels of at least `least`
    (0, which diffusers reads as its default; a family checks its own smallest size, as FLUX does one token)."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Real) or not least <= size < math.inf):
        raise ConfigError(
            f"{name} must be a positive number of pixels (or None for the pipeline's default), got {echo(size)}",
            field=name, value=repr(size),
        )


#: Call arguments diffusers reads as tensors (`.shape`, `.to`): a numpy array or list there fails deep in it.
TENSOR_ARGUMENTS: tuple[str, ...] = (
    "latents", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
    "prompt_attention_mask", "negative_prompt_attention_mask",
)


def _check_kinds(arguments: dict[str, Any]) -> None:
    """Tensors, generators and callbacks of the kind diffusers uses them as, which it fails on deep (or after the
    first step, for a callback) when they are not."""
    for name in TENSOR_ARGUMENTS:
        value = arguments.get(name)
        if value is not None and not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"{name} must be a torch.Tensor, got {type(value).__name__}: convert it with torch.as_tensor on the "
                f"pipeline's device and dtype", field=name, value=type(value).__name__,
            )
    generator = arguments.get("generator")
    generators = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(one, torch.Generator) for one in generators):
        raise ConfigError(
            f"generator must be a torch.Generator or a list of them, got {echo(generator)}: seed one with "
            f"torch.Generator(device).manual_seed(seed)", field="generator", value=type(generator).__name__,
        )
    callback = arguments.get("callback_on_step_end")
    if callback is not None and not callable(callback):
        raise ConfigError(
            f"callback_on_step_end must be a function (pipe, step, timestep, tensors) -> dict, got {echo(callback)}",
            field="callback_on_step_end", value=type(callback).__name__,
        )


def _refuse_swallowed_keywords(signature: inspect.Signature, arguments: dict[str, Any]) -> None:
    """A keyword the pipeline's `**kwargs` takes but never reads (PixArt's) would be dropped silently."""
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and arguments.get(name):
            unknown = ", ".join(sorted(arguments[name]))
            raise ConfigError(
                f"this pipeline's __call__ has no argument(s) {echo(unknown)} (it would ignore them silently); "
                f"check the spelling against its signature", field=sorted(arguments[name])[0],
            )


def request_batch(arguments: dict[str, Any]) -> int:
    """Images per call: prompts (or prompt embeddings) times images per prompt; a prompt that is no text or list
    of texts, an empty list or a count of images that is no positive integer is refused, naming it. The one rule of
    accelerated calls and engine bundles (whose static graphs take exactly the built batch)."""
    prompt = arguments.get("prompt")
    if isinstance(prompt, str):
        prompts = 1
    elif prompt is not None:
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise ConfigError(
                f"prompt must be a text or a non-empty list of texts, got {_describe(prompt)}", field="prompt", value=_describe(prompt)
            )
        prompts = len(prompt)
    else:
        embeds = arguments.get("prompt_embeds")
        prompts = embeds.shape[0] if getattr(embeds, "ndim", 0) >= 1 else 1  # not a tensor: diffusers names it
    per_prompt = arguments.get("num_images_per_prompt", 1)
    if isinstance(per_prompt, bool) or not isinstance(per_prompt, numbers.Integral) or per_prompt < 1:
        raise ConfigError(
            f"num_images_per_prompt must be a positive integer, got {echo(per_prompt)}", field="num_images_per_prompt", value=per_prompt
        )
    return prompts * int(per_prompt)


def _describe(value: Any) -> str:
    return f"an empty {type(value).__name__}" if isinstance(value, (list, tuple)) and not value else f"{type(value).__name__} {echo(value)}"


def _check_count(arguments: dict[str, Any], name: str, least: int) -> None:
    """An integer argument (numpy's too) of at least `least`, where the call has it; None is left to diffusers."""
    value = arguments.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ConfigError(f"{name} must be an integer >= {least}, got {echo(value)}", field=name, value=repr(value))


def check_latents(pipe: Any, arguments: dict[str, Any], default_size: Callable[[], int]) -> None:
    """A call's 4-D `latents=` must be the latent grid of its height and width: diffusers takes any shape unchecked
    and runs (and decodes) that shape instead, a silently other image size (a batch of another size is named by the
    transformer input check). `default_size`: pixels where a side is None (asked only then). Packed (3-D) latents and
    resolution-binned calls (which resize height and width) are left to the runtime."""
    latents = arguments.get("latents")
    if not hasattr(latents, "ndim") or latents.ndim != 4:
        return
    scale = getattr(pipe, "vae_scale_factor", None)
    if arguments.get("use_resolution_binning") or not isinstance(scale, int):
        return
    cells = tuple(int(arguments.get(name) or default_size()) // scale for name in ("height", "width"))
    if tuple(latents.shape[2:]) != cells:
        raise ConfigError(
            f"latents have the latent grid {tuple(latents.shape[2:])}, but height x width "
            f"{cells[0] * scale} x {cells[1] * scale} makes {cells} (pixels / {scale}): pass latents of shape "
            f"(batch, channels, {cells[0]}, {cells[1]}), or the height and width they were made for",
            field="latents", value=tuple(latents.shape),
        )


def check_clip_skip(pipe: Any, arguments: dict[str, Any]) -> None:
    """SD3's `clip_skip` reads CLIP's hidden state -(clip_skip + 2): an integer from 0 to the layers of its shallowest
    CLIP text encoder minus 1 (diffusers fails on more with an IndexError while encoding the prompt)."""
    clip_skip = arguments.get("clip_skip")
    if clip_skip is None or arguments.get("prompt_embeds") is not None:
        return
    encoders = (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
    layers = [getattr(getattr(encoder, "config", None), "num_hidden_layers", None) for encoder in encoders]
    most = min(count for count in layers if isinstance(count, int)) - 1 if any(isinstance(c, int) for c in layers) else None
    whole = isinstance(clip_skip, numbers.Integral) and not isinstance(clip_skip, bool)
    if not whole or clip_skip < 0 or (most is not None and clip_skip > most):
        allowed = f"from 0 to {most}, the CLIP text encoders' layers - 1" if most is not None else ">= 0"
        raise ConfigError(
            f"clip_skip must be an integer {allowed}, got {echo(clip_skip)}", field="clip_skip", value=repr(clip_skip)
        )


def refuse_config_keywords(signature: inspect.Signature, kwargs: dict[str, Any], bundle: bool = False) -> None:
    """A CATConfig field given to a call (`t0=3`) that the pipeline does not take: only `alpha` is per call, and
    Python's "unexpected keyword argument" would not say where the others go (for an engine `bundle`, its build)."""
    fields = [name for name in kwargs if name in CATConfig.__dataclass_fields__ and name not in signature.parameters]
    if fields and bundle:
        raise ConfigError(
            f"{fields[0]} is a CATConfig setting, fixed when the bundle was built (only alpha= changes per call, "
            f"among the built alphas): build a bundle with the {fields[0]} you want (catrt build)", field=fields[0],
        )
    if fields:
        raise ConfigError(
            f"{fields[0]} is a CATConfig setting, fixed when the pipeline is accelerated (only alpha= changes per call): "
            f"accelerate it with catrt.CATConfig({fields[0]}=...)", field=fields[0],
        )
