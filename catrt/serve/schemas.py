"""Request and response bodies of the images endpoint: OpenAI's schema plus catrt's own fields.

The request model checks types only: strict (a string "2" is not an `n`; 2.0 is, as JSON Schema's
integer), unknown fields refused (a 400 naming the field, as OpenAI's API answers "Unknown parameter"),
so a typo is never a silently ignored setting. The fields OpenAI's `images.generate` defines take the values OpenAI's API takes (its
enums, `output_compression` 0-100, `partial_images` 0-3); another value is a 400 naming the field, as
OpenAI answers it. Every integer is a 64-bit one: a longer number is no count, seed or step any
model runs. What values a server takes within those (its size, `n` range, guidance, prompt length,
the formats it returns) depends on the build, so those rules live in
`catrt.serve.validation.RequestRules`, which also writes them into the OpenAPI document.

OpenAI fields that do not apply here are accepted and ignored (`model`, `quality`, `style`,
`complexity`, `user`, `safety_identifier`, `moderation`, `output_compression`), accepted for the
values this server honours (`output_format` png, `background` auto / opaque, `stream` false,
`partial_images` 0, `size` "auto", `response_format` b64_json), or refused naming the field when
sent at all: `frame_count`, `frame_duration_ms` (GIF output) and `svg` (SVG output) ask for output
this server does not make, and OpenAI takes them only with those output formats.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from catrt.serve.json_numbers import written_value

IGNORED = "accepted for OpenAI clients and ignored"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def whole_number(value: Any) -> Any:
    """A JSON number without a fractional part (`1.0`) as the integer it is: JSON Schema's "integer", which the
    OpenAPI document states, takes it, so a schema-driven client may send it; `1.5`, `"1"` and `true` stay refused,
    and so does a float past 64 bits (`1e300`), as not an integer any model runs, named as sent. The integer is the
    one written, not its float's (`9007199254740993.0` is 2**53 + 1; `0.99999999999999999999` is refused)."""
    if isinstance(value, float) and math.isfinite(value):
        exact = written_value(value)
        if INT64_MIN <= exact <= INT64_MAX and exact == int(exact):
            return int(exact)
    return value


def json_int(low: int, high: int) -> Any:
    """An integer field of the request from `low` to `high`: a JSON integer, written `1` or `1.0`, never a string or a
    boolean. (The bounds come before the conversion so the schema states them as `minimum` / `maximum`.)"""
    return Annotated[StrictInt, Field(ge=low, le=high), BeforeValidator(whole_number)]


Int64 = json_int(INT64_MIN, INT64_MAX)
#: The request fields for output this server does not make: sent with any value but null, a 400 naming them.
UNSERVED_OUTPUT = {
    "frame_count": "frame_count sets the frames of GIF output",
    "frame_duration_ms": "frame_duration_ms sets the frame delay of GIF output",
    "svg": "svg sets how SVG output is written",
}


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`; `seed`, `negative_prompt`, `guidance_scale`, `steps` and `alpha` are catrt's."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(description="text to draw; not blank, at most the model's text length in tokens")
    n: Int64 | None = Field(None, description="images (default 1); at most the build's batch")
    size: StrictStr | None = Field(None, description='"WxH" as the build serves, or "auto" (the served size; default)')
    response_format: Literal["url", "b64_json"] | None = Field(None, description="b64_json (default); url is not served")
    output_format: Literal["png", "webp", "jpeg", "gif", "svg"] | None = Field(
        None, description="png (default); no other format is served")
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description="auto or opaque (images are opaque); transparent is not served")
    stream: StrictBool | None = Field(None, description="false; streaming is not served")
    partial_images: json_int(0, 3) | None = Field(
        None, description="0; partial images come only with streaming, which is not served")
    model: StrictStr | None = Field(None, description=f"{IGNORED}: the server serves one model")
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"] | None = Field(
        None, description=f"{IGNORED}: the build fixes steps and size")
    style: Literal["vivid", "natural"] | None = Field(None, description=IGNORED)
    complexity: Literal["low", "medium", "high"] | None = Field(None, description=IGNORED)
    user: StrictStr | None = Field(None, description=IGNORED)
    safety_identifier: StrictStr | None = Field(None, description=IGNORED)
    moderation: Literal["low", "auto"] | None = Field(None, description=f"{IGNORED}: this server runs no moderation")
    output_compression: json_int(0, 100) | None = Field(
        None, description=f"{IGNORED}: PNG is lossless")
    frame_count: Int64 | None = Field(None, description="GIF output is not served: leave it out")
    frame_duration_ms: Int64 | None = Field(None, description="GIF output is not served: leave it out")
    svg: dict[str, Any] | None = Field(None, description="SVG output is not served: leave it out")
    seed: Int64 | None = Field(None, description="image i uses seed + i; random if absent")
    negative_prompt: StrictStr | None = Field(None, description="what to steer away from; same limits as prompt")
    guidance_scale: float | None = Field(None, strict=True, description="classifier-free guidance; the model's default if absent")
    steps: Int64 | None = Field(None, description="must be the build's step count")
    alpha: float | None = Field(
        None, strict=True, description="run at this served alpha (pinned); absent: the server's alpha policy picks"
    )


class ImageData(BaseModel):
    b64_json: str


class Timings(BaseModel):
    """Seconds. The four phases are the model call's, shared by the requests batched into it."""

    queue_wait: float = Field(description="arrival until the model call started")
    encode: float = Field(description="text encoding and latent set-up, before the first transformer call")
    full_steps: float = Field(description="transformer calls of the full steps (selection included)")
    pruned_steps: float = Field(description="transformer calls of the pruned steps (selection included)")
    reused_steps: float | None = Field(
        None, exclude_if=lambda value: value is None,
        description="steps that reuse the previous prediction (only in answers of a schedule with reuse_every)",
    )
    decode: float = Field(description="after the last transformer call: VAE decode and PNG encoding")
    total: float = Field(description="arrival until the answer was ready")


class CatrtInfo(BaseModel):
    timings: Timings
    alpha: float = Field(description="the alpha the model call ran at (pinned, or the server's policy's choice)")
    steps: int
    seeds: list[int]
    batch_rows: int = Field(description="images in the model call that made these (before padding)")


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str = Field(description='"WxH" of the images')
    catrt: CatrtInfo


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorBody


class ModelCard(BaseModel):
    """OpenAI's model object, for `GET /v1/models` and `GET /v1/models/{id}`."""

    id: str = Field(description="the served model: a catrt model name, a diffusers folder or a build's model")
    object: Literal["model"] = "model"
    created: int = Field(description="when this server started (Unix seconds)")
    owned_by: str = "catrt"


class ModelListResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
