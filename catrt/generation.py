"""One image from a pipeline, an accelerated pipeline or an engine bundle: what `catrt generate` runs."""

from __future__ import annotations

import inspect
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from catrt.errors import ConfigError
from catrt.model_cards import check_image_size
from catrt.pipeline import pipeline_spec
from catrt.reference.text import WordTokenizer

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


def pipeline_size_limits(pipe: Any) -> tuple[int, int | None]:
    """(multiple, largest) pixel size a loaded pipeline takes; largest is None when unbounded.

    For models without a card (tiny ones, local folders) the limits are only known once loaded:
    pixels per latent cell times cells per token, and for SD3 the fixed position table's side.
    """
    pipe = getattr(pipe, "pipe", pipe)
    config = pipe.transformer.config
    multiple = int(pipe.vae_scale_factor) * int(config.patch_size)
    table = config.get("pos_embed_max_size")
    return multiple, None if table is None else int(table) * multiple


def check_pipeline_size(pipe: Any, height: int | None, width: int | None, model: str) -> None:
    """Refuse a requested size the loaded pipeline cannot take (None = the pipeline's default)."""
    multiple, largest = pipeline_size_limits(pipe)
    check_image_size(height or multiple, width or multiple, multiple, largest, model)


def text_length_limit(pipe: Any) -> int:
    """Tokens the pipeline's long-text encoder reads by default (`max_sequence_length`, else the tokenizer's)."""
    pipe = getattr(pipe, "pipe", pipe)
    parameter = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    if parameter is not None and isinstance(parameter.default, int):
        return parameter.default
    return int(pipe.tokenizer.max_length)  # the reference pipeline's word tokenizer


def count_prompt_tokens(pipe: Any, text: str) -> int:
    """Tokens the long-text encoder reads for `text`, special tokens included.

    SD3 truncates T5 (`tokenizer_3`) at `max_sequence_length`, PixArt its only (T5) tokenizer; the
    reference tokenizer is one <cls> plus one id per lower-case word, as `WordTokenizer.encode`.
    """
    pipe = getattr(pipe, "pipe", pipe)
    tokenizer = getattr(pipe, "tokenizer_3", None) or pipe.tokenizer
    if isinstance(tokenizer, WordTokenizer):
        return 1 + len(re.findall(r"[a-z]+", text.lower()))
    return len(tokenizer(text).input_ids)


def check_prompt_length(pipe: Any, prompt: str, limit: int, field: str = "prompt") -> None:
    """Refuse a prompt longer than the `limit` tokens the model reads, instead of truncating it silently.

    The server refuses the same prompts, so the CLI and the server answer alike.
    """
    tokens = count_prompt_tokens(pipe, prompt)
    if tokens > limit:
        raise ConfigError(
            f"{field} is {tokens} tokens but this model reads at most {limit} (max_sequence_length); shorten it",
            field=field, value=tokens,
        )
