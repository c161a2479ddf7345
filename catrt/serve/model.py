"""What the worker runs: a generator object (accelerated pipeline or loaded engine) plus what it serves.

The worker and the routes see only `ServedModel`; whether it came from an engine folder or an eager
model is decided here, once, at load time. Model facts (which tokenizer limits a prompt, the text
length, the default guidance and size) come from the pipeline's `PipelineSpec`, its call signature,
the model card and the bundle's build config, never from a model family's attribute names.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from catrt.build_config import PRECISIONS, BuildConfig
from catrt.generation import check_pipeline_size, check_text_to_image, finite_images, pipeline_size_limits
from catrt.model_cards import MODEL_CARDS, default_precision
from catrt.pipeline import default_image_size, pipeline_spec
from catrt.pipeline_spec import call_default
from catrt.scheduler import plan
from catrt.serve.config import ServeConfig, check_distinct_ks
from catrt.prompts import PromptReader, TextLimit, text_limit
from catrt.serve.timing import StepTimer

logger = logging.getLogger(__name__)

StepObserver = Callable[[str, float], None]

#: diffusers' pipelines log, at WARNING on every call, the part of a prompt cut off at CLIP's 77 tokens:
#: a server would write its users' prompts into its log, one record per request.
PROMPT_ECHO = "The following part of your input was truncated"
#: Seconds the device probe after a failed call may take (it waits for the work still queued on the device) before
#: the device is taken as hung: generous, so a busy device is never mistaken for one.
DEVICE_PROBE_SECONDS = 60.0


class _NoPromptEcho(logging.Filter):
    """Drops the pipeline's records that quote a prompt (PROMPT_ECHO)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return PROMPT_ECHO not in record.getMessage()


def keep_prompts_out_of_logs(pipe: Any) -> None:
    """Filter the pipeline module's logger (diffusers logs with the module's name) in this serving process."""
    pipeline_logger = logging.getLogger(type(pipe).__module__)
    if not any(isinstance(existing, _NoPromptEcho) for existing in pipeline_logger.filters):
        pipeline_logger.addFilter(_NoPromptEcho())


@dataclass(frozen=True)
class ServedSpec:
    """What one server answers: a single size and step count, up to `batch` images per call, at any of
    `alphas` (`alpha`, the first, is the default)."""

    model: str
    backend: str
    precision: str
    height: int
    width: int
    steps: int
    batch: int
    alpha: float
    t0: int
    refresh_every: int
    text_tokens: int  # a prompt may have at most this many tokens of the limiting tokenizer
    default_guidance: float
    reuse_every: int = 0
    alphas: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.alphas:
            object.__setattr__(self, "alphas", (self.alpha,))

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class Row:
    """One image of a request: its prompt and the seed of its own generator."""

    prompt: str
    seed: int


@dataclass(frozen=True)
class BatchOptions:
    """Settings shared by every row of a call: `size` picks the build ("WxH"; None = the server's first);
    `alpha` is the alpha a request pinned (None: the server's policy picks), so pinned requests batch
    only with requests that pinned the same alpha.
    """

    guidance_scale: float
    negative_prompt: str | None
    size: str | None = None
    alpha: float | None = None


@dataclass(frozen=True)
class Generation:
    """Base64 PNG per row and the call's phase timings in seconds (encode, full_steps, pruned_steps, decode)."""

    images: list[str]
    phases: dict[str, float]


class ServedModel:
    """Runs padded batches on the generator object; only the worker thread calls `generate`.

    Args:
        runner: `catrt.accelerate(...)`'s or `catrt.load(...)`'s result.
        spec: what it serves.
        call_arguments: the pipeline arguments every call passes (size, steps, text length, the
            pipeline's call defaults); a request's checks compare against these.
        device: where generators are made.
        build: the bundle's build config (its `check_request` rules apply), None for an eager model.
        reader: the prompt checks (tokenizers, text limit), used off the worker thread.
    """

    def __init__(
        self,
        runner: Any,
        spec: ServedSpec,
        call_arguments: dict[str, Any],
        device: torch.device,
        build: BuildConfig | None,
        reader: PromptReader,
    ) -> None:
        self.runner = runner
        self.spec = spec
        self.call_arguments = call_arguments
        self.device = device
        self.build = build
        self.reader = reader
        self.timer = StepTimer(runner.transformer, device)
        self.step_observer: StepObserver | None = None
        keep_prompts_out_of_logs(runner.pipe)

    def generate(
        self,
        rows: Sequence[Row],
        options: BatchOptions,
        should_stop: Callable[[], bool] | None = None,
        alpha: float | None = None,
    ) -> Generation:
        """Images for `rows` at `alpha` (None: the default); the call is padded to the build's batch so
        every call has the same shapes.

        `should_stop` is asked before each denoising step; once it says yes the call is abandoned
        (raises `Abandoned`), so requests already answered (timed out, client gone) cost no more steps.
        """
        padded = list(rows) + [rows[0]] * (self.spec.batch - len(rows))
        kwargs = dict(self.call_arguments)
        kwargs.update(
            prompt=[row.prompt for row in padded],
            generator=[torch.Generator(device=self.device).manual_seed(row.seed) for row in padded],
            guidance_scale=options.guidance_scale,
            output_type="np",
        )
        if options.negative_prompt is not None:
            kwargs["negative_prompt"] = [options.negative_prompt] * len(padded)
        self.timer.reset(should_stop)
        started = time.perf_counter()
        try:
            pixels = self.runner(**kwargs, alpha=alpha).images[: len(rows)]
        finally:
            self.timer.finish()
        images = finite_images(pixels, options.guidance_scale, self.spec.default_guidance)
        encoded = [_png_base64(image) for image in images]
        return Generation(encoded, self._phases(started, time.perf_counter()))

    def device_fault(self, timeout: float = DEVICE_PROBE_SECONDS) -> Exception | None:
        """What a tiny computation on the served device raises now, else None: after one of CUDA's sticky errors
        (an illegal memory access, a device-side assert) every later call in the process fails. Running out of memory
        here is the load, not a fault; the CPU has none to look for. A probe still running after `timeout` seconds (a
        hung device) is a fault too: it runs on a thread of its own, so the worker is not held with it."""
        if self.device.type != "cuda":
            return None
        outcome: list[Exception | None] = []
        probe = threading.Thread(target=lambda: outcome.append(_probe(self.device)), name="catrt-device-probe", daemon=True)
        probe.start()
        probe.join(timeout)
        if not outcome:
            return TimeoutError(f"the device did not finish a tiny computation within {timeout:g} s")
        return outcome[0]

    def _phases(self, started: float, finished: float) -> dict[str, float]:
        kinds = plan(self.spec.steps, self.spec.t0, self.spec.refresh_every, self.spec.reuse_every)
        phases = {"encode": self.timer.first_start - started, "full_steps": 0.0, "pruned_steps": 0.0}
        if "reused" in kinds:  # only schedules with step reuse have reused steps to time
            phases["reused_steps"] = 0.0
        for kind, seconds in zip(kinds, self.timer.durations, strict=True):  # one transformer call per step
            phases[f"{kind}_steps"] += seconds
            if self.step_observer is not None:
                self.step_observer(kind, seconds)
        phases["decode"] = finished - self.timer.last_end
        return phases


def _png_base64(image: Any) -> str:
    """PNG-encoded and base64'd here, on the worker thread: both take time the event loop must not spend."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def load_served_model(config: ServeConfig) -> ServedModel:
    """The eager model `config` names, loaded on this thread (which then owns it).

    Builds (`config.engines`) are loaded by `catrt.serve.routing.load_builds`, which shares one
    pipeline across builds of a model.
    """
    return _ready(_load_eager(config))


def _ready(served: ServedModel) -> ServedModel:
    served.runner.set_progress_bar_config(disable=True)
    logger.info("serving %s", served.spec)
    return served


def _load_eager(config: ServeConfig) -> ServedModel:
    """An eager pipeline accelerated with `config.cat` (no build needed; for development and tests)."""
    from catrt.loading import load_pipeline
    from catrt.pipeline import accelerate

    device = torch.device(config.device)
    precision = config.precision or default_precision(config.model, device.type)
    pipe = load_pipeline(config.model, device=device, dtype=PRECISIONS[precision])
    check_text_to_image(pipe, config.model)
    check_pipeline_size(pipe, config.height, config.width, config.model)  # a model without a card: known once loaded
    default_size = _default_size(pipe)
    height, width = config.height or default_size, config.width or default_size
    multiple = pipeline_size_limits(pipe)[0]
    check_distinct_ks(config.served_alphas, height, width, multiple)
    limit = text_limit(pipe, pipeline_spec(pipe))
    spec = ServedSpec(
        model=config.model, backend="eager", precision=precision, height=height, width=width, steps=config.steps,
        batch=config.batch, alpha=config.cat.alpha, t0=config.cat.t0, refresh_every=config.cat.refresh_every,
        text_tokens=limit.tokens, default_guidance=_default_guidance(config.model, pipe),
        reuse_every=config.cat.reuse_every, alphas=config.served_alphas,
    )
    arguments = _call_arguments(pipe, spec, limit)
    return ServedModel(accelerate(pipe, config.cat), spec, arguments, device, None, PromptReader(pipe, limit))


def load_engines(folder: Path, bundle_key: bytes | None, pipe: Any = None) -> ServedModel:
    """A built bundle via `catrt.load`, which verifies it; its build config says what it serves.

    `pipe`: as for `catrt.load`, a loaded pipeline of the build's model to share.
    """
    from catrt.bundle import load

    runner = load(folder, key=bundle_key, pipe=pipe)
    build = runner.build
    pipe = runner.pipe
    limit = text_limit(pipe, pipeline_spec(pipe), build.max_sequence_length)
    spec = ServedSpec(
        model=build.model, backend=build.backend, precision=build.precision, height=build.height, width=build.width,
        steps=build.steps, batch=build.batch, alpha=build.alpha, t0=build.t0,
        refresh_every=runner.accelerated.config.refresh_every, text_tokens=limit.tokens,
        default_guidance=_default_guidance(build.model, pipe), reuse_every=build.reuse_every, alphas=build.alphas,
    )
    arguments = _call_arguments(pipe, spec, limit)
    return _ready(ServedModel(runner, spec, arguments, runner.engine.device, build, PromptReader(pipe, limit)))


def _call_arguments(pipe: Any, spec: ServedSpec, limit: TextLimit) -> dict[str, Any]:
    arguments: dict[str, Any] = dict(pipeline_spec(pipe).call_defaults)
    arguments.update(height=spec.height, width=spec.width, num_inference_steps=spec.steps)
    if limit.argument is not None:
        arguments[limit.argument] = limit.tokens
    return arguments


def _default_size(pipe: Any) -> int:
    """The model's own image size in pixels, as `catrt build` takes it when none is given."""
    return default_image_size(pipe)


def _default_guidance(model: str, pipe: Any) -> float:
    """The model card's guidance for a published or shipped model, else the pipeline's own default."""
    card = MODEL_CARDS.get(model)
    if card is not None:
        return float(card.default_guidance)
    return float(call_default(pipe, "guidance_scale"))


def _probe(device: torch.device) -> Exception | None:
    """A tiny computation on `device`, waited for: what it raises (a fault), or None (running out of memory is none)."""
    try:
        torch.ones(1, device=device).add_(1).cpu()
        torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 - returned to the worker, which stops on it (raised here, it would wait out the timeout)
        return None if out_of_memory(error) else error
    return None


def out_of_memory(error: BaseException) -> bool:
    """A device or host out of memory (torch's OutOfMemoryError is a RuntimeError saying so): the load, not the request
    nor the device."""
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower())
