"""One image from a pipeline, an accelerated pipeline or an engine bundle: what `catrt generate` runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor

from catrt.errors import ConfigError, GenerationError, UnsupportedModelError
from catrt.model_cards import check_image_size
from catrt.pipeline import default_image_size, pipeline_spec
from catrt.pipeline_spec import call_default
from catrt.prompts import PromptReader, text_limit


@dataclass(frozen=True)
class GenerationRequest:
    """The per-image settings of a generation; None means the runner's own default
    (the pipeline's for a pipeline, the build's for an engine bundle)."""

    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None


def generate_image(runner: Any, request: GenerationRequest) -> tuple[Any, float]:
    """Run a diffusers pipeline, `catrt.accelerate(...)` or `catrt.load(...)` once: (PIL image, seconds)."""
    pipe = getattr(runner, "pipe", runner)  # the diffusers pipeline underneath
    kwargs: dict[str, Any] = dict(pipeline_spec(pipe).call_defaults)
    kwargs.update(prompt=request.prompt, output_type="np")
    for name, value in (
        ("num_inference_steps", request.steps),
        ("negative_prompt", request.negative_prompt),
        ("height", request.height),
        ("width", request.width),
        ("guidance_scale", request.guidance_scale),
    ):
        if value is not None:
            kwargs[name] = value
    device = pipe.device
    kwargs["generator"] = torch.Generator(device=device).manual_seed(request.seed)
    if device.type == "cuda":  # work queued before this call (catrt compare's MAC count between images) is not its time
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    pixels = runner(**kwargs).images
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    default_guidance = call_default(pipe, "guidance_scale")
    guidance = kwargs.get("guidance_scale", default_guidance)
    (image,) = finite_images(pixels, guidance, default_guidance, "--guidance-scale")
    return image, seconds


def finite_images(pixels: np.ndarray, guidance: float, default_guidance: float, name: str = "guidance_scale") -> list[Any]:
    """PIL images of a pipeline's `output_type="np"` output, refused when a value is NaN or inf.

    diffusers turns NaN into black pixels, so an overflowed generation (a huge guidance scale; fp16 past its
    range) would otherwise be written or answered as a flat black image that looks like a result. A guidance
    above the model's default is named as the cause (`name`, a ConfigError); otherwise it is a GenerationError.
    """
    if np.isfinite(pixels).all():
        return VaeImageProcessor.numpy_to_pil(pixels)
    if guidance > default_guidance:
        raise ConfigError(
            f"{name} {guidance:g} made the generation overflow (the image came out NaN or inf): use a smaller "
            f"{name}; this model's default is {default_guidance:g}",
            field=name, value=guidance,
        )
    raise GenerationError(
        "the generation overflowed (the image came out NaN or inf): run at fp32 or bf16 precision, or try another seed"
    )


def pipeline_size_limits(pipe: Any) -> tuple[int, int | None]:
    """(multiple, largest) pixel size a loaded pipeline takes; largest is None when unbounded.

    For models without a card (tiny ones, local folders) the limits are only known once loaded:
    pixels per latent cell times latent cells per token, and the side of the grid its positions cover (both the adapter's).
    """
    from catrt.models import make_adapter

    pipe = getattr(pipe, "pipe", pipe)
    adapter = make_adapter(pipe.transformer)
    multiple = int(pipe.vae_scale_factor) * adapter.cells_per_token
    side = adapter.max_grid_side
    return multiple, None if side is None else side * multiple


def check_text_to_image(pipe: Any, model: str) -> None:
    """Refuse, by name, a loaded pipeline that generates from an image (a saved img2img or inpainting folder): the CLI,
    server and build call it with a prompt only, which diffusers would fail on deep in its image preprocessing."""
    spec = pipeline_spec(pipe)
    if spec.takes_image:
        raise UnsupportedModelError(
            f"{model}: {type(pipe).__name__} generates from an image (its {spec.strength_argument!r} argument), and "
            f"catrt's CLI, server and build run text-to-image pipelines only; accelerate it from Python with "
            f"catrt.accelerate(pipe), or give a text-to-image model",
            field="model", value=model,
        )


def check_pipeline_size(pipe: Any, height: int | None, width: int | None, model: str) -> None:
    """Refuse a requested size the loaded pipeline cannot take (None = the pipeline's default, which a call then runs)."""
    multiple, largest = pipeline_size_limits(pipe)
    default = default_image_size(getattr(pipe, "pipe", pipe))
    check_image_size(height or default, width or default, multiple, largest, model)


def check_prompt_length(runner: Any, prompt: str, length: int | None = None, field: str = "prompt") -> None:
    """Refuse a prompt the model cannot read whole (`length`: a build's text length; None = the
    pipeline's default), instead of truncating it silently: the server's rule (`catrt.prompts`)."""
    pipe = getattr(runner, "pipe", runner)
    PromptReader(pipe, text_limit(pipe, pipeline_spec(pipe), length)).check(field, prompt)
