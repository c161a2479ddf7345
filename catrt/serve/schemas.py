"""Request and response bodies of the images endpoint: OpenAI's schema plus catrt's own fields.

The request model checks types only: strict (a string "2" is not an `n`), unknown fields refused,
so a typo is a 400 naming the field rather than a silently ignored setting. What values a server
takes (its size, `n` range, guidance, prompt length) depends on the build, so those rules live in
`catrt.serve.validation.RequestRules`, which also writes them into the OpenAPI document.

OpenAI SDK fields that do not apply here are accepted and ignored (`model`, `quality`, `style`,
`user`, `safety_identifier`, `moderation`, `output_compression`), or accepted for the values this
server honours (`output_format` png, `background` auto / opaque, `stream` false, `partial_images` 0,
`size` "auto").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

IGNORED = "accepted for OpenAI clients and ignored"


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`; `seed`, `negative_prompt`, `guidance_scale`, `steps` and `alpha` are catrt's."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(description="text to draw; not blank, at most the model's text length in tokens")
    n: StrictInt | None = Field(None, description="images (default 1); at most the build's batch")
    size: StrictStr | None = Field(None, description='"WxH" as the build serves, or "auto" (the served size; default)')
    response_format: StrictStr | None = Field(None, description="b64_json (default); url is not served")
    output_format: StrictStr | None = Field(None, description="png (default); no other format is served")
    background: StrictStr | None = Field(None, description="auto or opaque (images are opaque); transparent is not served")
    stream: StrictBool | None = Field(None, description="false; streaming is not served")
    partial_images: StrictInt | None = Field(None, description="0; partial images come only with streaming, which is not served")
    model: StrictStr | None = Field(None, description=f"{IGNORED}: the server serves one model")
    quality: StrictStr | None = Field(None, description=f"{IGNORED}: the build fixes steps and size")
    style: StrictStr | None = Field(None, description=IGNORED)
    user: StrictStr | None = Field(None, description=IGNORED)
    safety_identifier: StrictStr | None = Field(None, description=IGNORED)
    moderation: StrictStr | None = Field(None, description=f"{IGNORED}: this server runs no moderation")
    output_compression: StrictInt | None = Field(None, description=f"{IGNORED}: PNG is lossless")
    seed: StrictInt | None = Field(None, description="image i uses seed + i; random if absent")
    negative_prompt: StrictStr | None = Field(None, description="what to steer away from; same limits as prompt")
    guidance_scale: float | None = Field(None, strict=True, description="classifier-free guidance; the model's default if absent")
    steps: StrictInt | None = Field(None, description="must be the build's step count")
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
