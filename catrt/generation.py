"""One image from a pipeline, an accelerated pipeline or an engine bundle: what `catrt generate` runs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from catrt.pipeline import pipeline_spec

logger = logging.getLogger(__name__)


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
