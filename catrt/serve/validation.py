"""Every value check of an images request, in one place, and the OpenAPI description of the same rules.

A request passes, in order: the server's own limits (prompt characters, `n` up to the batch, the
formats it returns, seeds), the model call's rules (for an engine bundle, `catrt.bundle.check_request`
itself on the exact arguments the call will get; for an eager model, the one size and step count
the server was started with), then the prompt's tokens, the only costly check, last. `RequestRules`
runs on the server's admission thread, never on the event loop.

The OpenAPI document is written from the same object, so what it states (sizes, `n` range, guidance
range, prompt length) is what `admit` takes.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from catrt.bundle import check_request
from catrt.errors import ConfigError
from catrt.request_values import (
    blank_text_pattern,
    check_guidance,
    check_prompt_text,
    check_seed,
    largest_seed,
    plain_text_pattern,
    prompt_pattern,
)
from catrt.serve.model import BatchOptions, Row, ServedModel
from catrt.serve.metrics import alpha_label
from catrt.serve.echo import echo, shorten
from catrt.serve.schemas import UNSERVED_OUTPUT, ImageGenerationRequest

# The largest guidance_scale a request may ask for (ComfyUI's CFG bound; the models' defaults are 3.5 to 7): the
# OpenAPI document states it, so a schema-driven client's guidance is one a model runs (1e307 overflowed to a NaN
# image, a 400 the schema could not foretell).
MAX_GUIDANCE = 100.0
SIZE_PATTERN = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")  # whole strings only: fullmatch


def parse_size(size: str, example: str) -> tuple[int, int]:
    """(width, height) of a "WxH" size; else the refusal naming `size`, with a served size as `example`."""
    match = SIZE_PATTERN.fullmatch(size)
    if match is None:
        raise ConfigError(f'size must be "WxH" (e.g. "{example}") or "auto", got {echo(size)}', field="size",
                          value=size)
    return int(match.group(1)), int(match.group(2))


# check_request's argument names -> the request field a client sets them with.
CALL_PARAMS = {"height": "size", "width": "size", "num_inference_steps": "steps", "batch": "n"}
SERVED_CALL_ARGUMENTS = ("height", "width", "num_inference_steps")


class RequestRules:
    """What one loaded model takes: `admit` checks a request, `properties` describes it for OpenAPI."""

    def __init__(self, served: ServedModel, max_prompt_chars: int) -> None:
        self.served = served
        self.spec = served.spec
        self.max_prompt_chars = max_prompt_chars
        self.guidance_floor = self._guidance_floor()

    def admit(self, body: ImageGenerationRequest) -> tuple[list[Row], BatchOptions]:
        """The request's rows (prompt, seed per image) and batch options; raises ConfigError naming the param."""
        self._check_text_length("prompt", body.prompt)
        check_prompt_text("prompt", body.prompt)
        if body.negative_prompt is not None:
            self._check_text_length("negative_prompt", body.negative_prompt)
            check_prompt_text("negative_prompt", body.negative_prompt, blank_ok=True)
        self._check_formats(body)
        n = 1 if body.n is None else body.n
        if not 1 <= n <= self.spec.batch:
            raise ConfigError(
                f"n={echo(n)} is not served: this server makes 1 to {self.spec.batch} images per request (its batch) at size "
                f"{self.spec.size}",
                field="n", value=n,
            )
        guidance = self._guidance(body.guidance_scale)
        seed = secrets.randbelow(2**31) if body.seed is None else check_seed(body.seed, self.spec.batch)
        self._check_call(body, guidance)
        self.served.reader.check("prompt", body.prompt)
        if body.negative_prompt is not None:
            self.served.reader.check("negative_prompt", body.negative_prompt)
            self.served.runner.spec.refuse_unread_negative_prompt(body.negative_prompt, "negative_prompt")
        rows = [Row(body.prompt, seed + index) for index in range(n)]
        options = BatchOptions(guidance_scale=guidance, negative_prompt=body.negative_prompt, size=self.spec.size,
                               alpha=self._alpha(body.alpha))
        return rows, options

    def _check_text_length(self, name: str, text: str) -> None:
        """Characters first: a huge prompt is refused without being tokenized."""
        if len(text) > self.max_prompt_chars:
            raise ConfigError(
                f"{name} is {len(text)} characters; this server takes at most {self.max_prompt_chars}",
                field=name, value=len(text),
            )

    @staticmethod
    def _check_formats(body: ImageGenerationRequest) -> None:
        if body.response_format not in (None, "b64_json"):
            hint = " (the server hosts no images; images come inline)" if body.response_format == "url" else ""
            raise ConfigError(
                f"response_format {echo(body.response_format)} is not served{hint}; ask for b64_json, the default",
                field="response_format", value=body.response_format,
            )
        if body.output_format not in (None, "png"):
            raise ConfigError(
                f"output_format {echo(body.output_format)} is not served; this server returns png only",
                field="output_format", value=body.output_format,
            )
        if body.background not in (None, "auto", "opaque"):
            raise ConfigError(
                f"background {echo(body.background)} is not served; images are opaque (ask for auto or opaque)",
                field="background", value=body.background,
            )
        if body.stream:
            raise ConfigError("stream=true is not served; images come in one answer", field="stream", value=True)
        if body.partial_images:
            raise ConfigError(
                f"partial_images={echo(body.partial_images)} is not served: partial images come only with streaming, "
                "which this server does not do; leave it out or send 0",
                field="partial_images", value=body.partial_images,
            )
        for name, purpose in UNSERVED_OUTPUT.items():
            if getattr(body, name) is not None:
                raise ConfigError(
                    f"{purpose}, which this server does not make (it returns png only); leave {name} out",
                    field=name,
                )

    def _guidance(self, value: float | None) -> float:
        if value is None:
            return self.spec.default_guidance
        guidance = check_guidance(value)
        if guidance > MAX_GUIDANCE:
            raise ConfigError(
                f"guidance_scale={echo(value)} is not served: this server takes at most {MAX_GUIDANCE:g} (this model's "
                f"default is {self.spec.default_guidance:g}); ask for a smaller one",
                field="guidance_scale", value=value,
            )
        return guidance

    def _alpha(self, alpha: float | None) -> float | None:
        """A pinned alpha must be one the server serves (a build's alphas, or the eager model's --alpha values)."""
        if alpha is not None and alpha not in self.spec.alphas:
            served = ", ".join(map(alpha_label, self.spec.alphas))
            raise ConfigError(
                f"alpha={echo(alpha)} is not served: this server serves alpha {served}; ask for one of those or leave "
                f"alpha out (the server's policy picks)",
                field="alpha", value=alpha,
            )
        return None if alpha is None else float(alpha)

    def _size(self, size: str | None) -> tuple[int, int]:
        """(width, height) asked for; "auto" and absent are the served size."""
        if size is None or size == "auto":
            return self.spec.width, self.spec.height
        return parse_size(size, self.spec.size)

    def call_arguments(self, width: int, height: int, steps: int, guidance: float) -> dict[str, Any]:
        """The arguments the model call would get, padded to the batch as the worker pads it."""
        arguments = dict(self.served.call_arguments)
        arguments.update(
            height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
            prompt=[""] * self.spec.batch,
        )
        return arguments

    def _check_call(self, body: ImageGenerationRequest, guidance: float) -> None:
        width, height = self._size(body.size)
        steps = self.spec.steps if body.steps is None else body.steps
        arguments = self.call_arguments(width, height, steps, guidance)
        asked = {"size": body.size or "auto", "steps": steps, "n": body.n, "guidance_scale": guidance}
        try:
            if self.served.build is not None:
                check_request(arguments, self.served.build, self.served.runner.spec)
            else:
                self._check_served_call(arguments)
        except ConfigError as error:
            param = CALL_PARAMS.get(error.field or "", error.field)
            shown = f"{width}x{height}" if param == "size" else asked.get(param)
            raise ConfigError(f"{param}={shorten(str(shown))} is not served: {error}", field=param,
                              value=shown) from None

    def _check_served_call(self, arguments: dict[str, Any]) -> None:
        """An eager server runs the one size and step count it was started with (its warm-up and batches)."""
        for name in SERVED_CALL_ARGUMENTS:
            if arguments[name] != self.served.call_arguments[name]:
                raise ConfigError(
                    f"this server serves {self.spec.size} images in {self.spec.steps} steps only; ask for those "
                    f"(size \"auto\") or start another server for other values",
                    field=name, value=arguments[name],
                )

    def _guidance_floor(self) -> float | None:
        """1.0 where the bundle's `check_request` refuses guidance_scale 1 (classifier-free guidance only).

        Asked of `check_request` itself, so the document states its rule without a second copy of it.
        """
        if self.served.build is None:
            return None
        arguments = self.call_arguments(self.spec.width, self.spec.height, self.spec.steps, 1.0)
        try:
            check_request(arguments, self.served.build, self.served.runner.spec)
        except ConfigError as error:
            if error.field == "guidance_scale":
                return 1.0
        return None

    def properties(self) -> dict[str, dict[str, Any]]:
        """JSON Schema of the request fields whose served values this model fixes."""
        spec = self.spec
        chars = self.max_prompt_chars
        lowest = {"minimum": 0} if self.guidance_floor is None else {"exclusiveMinimum": self.guidance_floor}
        guidance: dict[str, Any] = {"type": "number", **lowest, "maximum": MAX_GUIDANCE}
        return {
            "prompt": {
                "type": "string", "minLength": 1, "maxLength": chars, "pattern": prompt_pattern(),
                "description": f"text to draw: not blank, no control characters but tabs and line breaks, at most {chars} characters and at most {spec.text_tokens} "
                "tokens as the model's tokenizer counts them; longer prompts are refused (400), never truncated",
            },
            "negative_prompt": _nullable(
                {"type": "string", "maxLength": chars, "pattern": plain_text_pattern()},
                f"same limits as prompt ({spec.text_tokens} tokens)",
            ) if self.served.runner.spec.reads_negative_prompt else _nullable(
                {"type": "string", "maxLength": chars, "pattern": blank_text_pattern()},
                "blank only: this model's guidance is distilled, it reads no negative prompt",
            ),
            "n": _nullable({"type": "integer", "minimum": 1, "maximum": spec.batch, "default": 1}, "images"),
            "size": _nullable(
                {"type": "string", "enum": [spec.size, "auto"], "default": "auto"}, f'"auto" is {spec.size}'
            ),
            "steps": _nullable({"type": "integer", "enum": [spec.steps]}, "the served step count"),
            "alpha": _nullable({"type": "number", "enum": list(spec.alphas)}, "a served alpha (pinned); absent: the server's policy picks"),
            "guidance_scale": _nullable(guidance, f"default {spec.default_guidance:g}"),
            "seed": _nullable({"type": "integer", "minimum": 0, "maximum": largest_seed(spec.batch)}, "image i uses seed + i"),
            "response_format": _nullable({"type": "string", "enum": ["b64_json"], "default": "b64_json"}, "url is not served"),
            "output_format": _nullable({"type": "string", "enum": ["png"], "default": "png"}, "png only"),
            "background": _nullable({"type": "string", "enum": ["auto", "opaque"]}, "images are opaque"),
            "stream": _nullable({"type": "boolean", "enum": [False]}, "streaming is not served"),
            "partial_images": _nullable({"type": "integer", "enum": [0]}, "partial images need streaming, which is not served"),
            **{name: {"type": "null", "description": f"{purpose}, which is not served: leave it out"}
               for name, purpose in UNSERVED_OUTPUT.items()},
        }


def _nullable(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """`schema` or null (null = the default), as pydantic writes optional fields."""
    return {"anyOf": [schema, {"type": "null"}], "description": description}
