"""One image from a model name: what `catrt generate` runs, reusable from Python."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from catrt.config import CATConfig
from catrt.pipeline import accelerate, pipeline_spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """The per-image settings of a generation; None means the pipeline's own default."""

    prompt: str
    negative_prompt: str | None = None
    steps: int = 28
    seed: int = 0
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None


def generate_image(pipe: Any, request: GenerationRequest, config: CATConfig | None) -> tuple[Any, float]:
    """Run `pipe` once (pruned with `config`, or unpruned when it is None); return (PIL image, seconds)."""
    kwargs: dict[str, Any] = dict(pipeline_spec(pipe).call_defaults)
    kwargs.update(prompt=request.prompt, num_inference_steps=request.steps, output_type="pil")
    for name, value in (
        ("negative_prompt", request.negative_prompt),
        ("height", request.height),
        ("width", request.width),
        ("guidance_scale", request.guidance_scale),
    ):
        if value is not None:
            kwargs[name] = value
    runner = pipe if config is None else accelerate(pipe, config)
    device = getattr(pipe, "device", torch.device("cpu"))
    kwargs["generator"] = torch.Generator(device=device).manual_seed(request.seed)
    started = time.perf_counter()
    image = runner(**kwargs).images[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return image, time.perf_counter() - started
