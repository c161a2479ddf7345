"""Check a request body against what the loaded build serves, before it takes a queue slot.

Prompts longer than the text encoder's length are refused (400 naming the limit) rather than
truncated: a silently shortened prompt gives an image of another text.
"""

from __future__ import annotations

import secrets

from catrt.errors import ConfigError
from catrt.serve.model import BatchOptions, Row, ServedModel
from catrt.serve.schemas import MAX_SEED, ImageGenerationRequest


def admit(body: ImageGenerationRequest, served: ServedModel) -> tuple[list[Row], BatchOptions]:
    """The request's rows (prompt, seed per image) and batch options; raises ConfigError naming the param."""
    spec = served.spec
    if body.size is not None and body.size != spec.size:
        raise ConfigError(
            f"size {body.size} is not served: this build serves {spec.size} only; ask for that size or build "
            f"an engine for {body.size}",
            field="size", value=body.size,
        )
    if body.steps is not None and body.steps != spec.steps:
        raise ConfigError(
            f"steps={body.steps} is not served: this build runs {spec.steps} steps", field="steps", value=body.steps
        )
    if body.n > spec.batch:
        raise ConfigError(
            f"n={body.n} is more than this build's batch of {spec.batch} images per request", field="n", value=body.n
        )
    _check_length("prompt", body.prompt, served)
    if body.negative_prompt is not None:
        _check_length("negative_prompt", body.negative_prompt, served)
    guidance = served.default_guidance if body.guidance_scale is None else float(body.guidance_scale)
    if spec.requires_guidance and guidance <= 1.0:
        raise ConfigError(
            f"guidance_scale={guidance} is not served: this engine runs classifier-free guidance, which needs "
            f"guidance_scale > 1",
            field="guidance_scale", value=guidance,
        )
    seed = secrets.randbelow(2**31) if body.seed is None else body.seed
    if seed + body.n - 1 > MAX_SEED:
        raise ConfigError(f"seed + n - 1 must be at most {MAX_SEED}", field="seed", value=seed)
    rows = [Row(body.prompt, seed + index) for index in range(body.n)]
    return rows, BatchOptions(guidance_scale=guidance, negative_prompt=body.negative_prompt)


def _check_length(name: str, text: str, served: ServedModel) -> None:
    limit = served.spec.max_sequence_length
    tokens = served.count_tokens(text)
    if tokens > limit:
        raise ConfigError(
            f"{name} is {tokens} tokens but this model reads at most {limit} (max_sequence_length); shorten it",
            field=name, value=tokens,
        )
