"""Request and response bodies of the images endpoint: OpenAI's schema plus catrt's own fields.

Types are strict (a string "2" is not an `n`), and unknown fields are refused, so a typo is a 400
naming the field rather than a silently ignored setting.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

SIZE_PATTERN = r"^[1-9][0-9]*x[1-9][0-9]*$"
MAX_SEED = 2**63 - 1


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`; `seed`, `negative_prompt`, `guidance_scale` and `steps` are catrt's."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(description="text to draw; at most the model's text length in tokens")
    n: StrictInt = Field(1, ge=1, description="images; at most the build's batch")
    size: StrictStr | None = Field(None, pattern=SIZE_PATTERN, description='"WxH"; the build serves one size')
    response_format: Literal["b64_json"] = Field("b64_json", description="only base64 PNG is served")
    model: StrictStr | None = Field(None, description="accepted for OpenAI clients; the server serves one model")
    user: StrictStr | None = Field(None, description="accepted for OpenAI clients; unused")
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED, description="image i uses seed + i; random if absent")
    negative_prompt: StrictStr | None = None
    guidance_scale: float | None = Field(None, ge=0.0, strict=True, description="the pipeline's default if absent")
    steps: StrictInt | None = Field(None, ge=1, description="must be the build's step count")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be empty")
        return prompt

    @field_validator("guidance_scale")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("guidance_scale must be a finite number")
        return value


class ImageData(BaseModel):
    b64_json: str


class Timings(BaseModel):
    """Seconds. The four phases are the model call's, shared by the requests batched into it."""

    queue_wait: float = Field(description="arrival until the model call started")
    encode: float = Field(description="text encoding and latent set-up, before the first transformer call")
    full_steps: float = Field(description="transformer calls of the full steps (selection included)")
    pruned_steps: float = Field(description="transformer calls of the pruned steps (selection included)")
    decode: float = Field(description="after the last transformer call: VAE decode and PNG encoding")
    total: float = Field(description="arrival until the answer was ready")


class CatrtInfo(BaseModel):
    timings: Timings
    alpha: float
    steps: int
    seeds: list[int]
    batch_rows: int = Field(description="images in the model call that made these (before padding)")


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    catrt: CatrtInfo


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorBody
