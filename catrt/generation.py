"""One image from a pipeline, an accelerated pipeline or an engine bundle: what `catrt generate` runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from catrt.model_cards import check_image_size
from catrt.pipeline import pipeline_spec
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
    kwargs.update(prompt=request.prompt, output_type="pil")
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
    started = time.perf_counter()
    image = runner(**kwargs).images[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return image, time.perf_counter() - started


def pipeline_size_limits(pipe: Any) -> tuple[int, int | None]:
    """(multiple, largest) pixel size a loaded pipeline takes; largest is None when unbounded.

    For models without a card (tiny ones, local folders) the limits are only known once loaded:
    pixels per latent cell times latent cells per token (the adapter's), and for SD3 the fixed position table's side.
    """
    from catrt.models import make_adapter

    pipe = getattr(pipe, "pipe", pipe)
    config = pipe.transformer.config
    multiple = int(pipe.vae_scale_factor) * make_adapter(pipe.transformer).cells_per_token
    table = config.get("pos_embed_max_size")
    return multiple, None if table is None else int(table) * multiple


def check_pipeline_size(pipe: Any, height: int | None, width: int | None, model: str) -> None:
    """Refuse a requested size the loaded pipeline cannot take (None = the pipeline's default)."""
    multiple, largest = pipeline_size_limits(pipe)
    check_image_size(height or multiple, width or multiple, multiple, largest, model)


def check_prompt_length(runner: Any, prompt: str, length: int | None = None, field: str = "prompt") -> None:
    """Refuse a prompt the model cannot read whole (`length`: a build's text length; None = the
    pipeline's default), instead of truncating it silently: the server's rule (`catrt.prompts`)."""
    pipe = getattr(runner, "pipe", runner)
    PromptReader(pipe, text_limit(pipe, pipeline_spec(pipe), length)).check(field, prompt)
