"""What the worker runs: a generator object (accelerated pipeline or loaded engine) plus what it serves.

The worker and the routes see only `ServedModel`; whether it came from an engine folder or an eager
model is decided here, once, at load time.
"""

from __future__ import annotations

import copy
import inspect
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from catrt.scheduler import plan
from catrt.serve.config import ServeConfig
from catrt.serve.timing import StepTimer

logger = logging.getLogger(__name__)

StepObserver = Callable[[str, float], None]


@dataclass(frozen=True)
class ServedSpec:
    """What one server answers: a single size and step count, up to `batch` images per call."""

    model: str
    backend: str
    height: int
    width: int
    steps: int
    batch: int
    alpha: float
    t0: int
    refresh_every: int
    max_sequence_length: int
    requires_guidance: bool

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
    """Settings shared by every row of a call. Size and steps are not here: a server serves one of each."""

    guidance_scale: float
    negative_prompt: str | None


@dataclass(frozen=True)
class Generation:
    """PNG bytes per row and the call's phase timings in seconds (encode, full_steps, pruned_steps, decode)."""

    images: list[bytes]
    phases: dict[str, float]


class ServedModel:
    """Runs padded batches on the generator object; only the worker thread calls `generate`."""

    def __init__(self, runner: Any, spec: ServedSpec, call_defaults: dict[str, Any], device: torch.device) -> None:
        self.runner = runner
        self.spec = spec
        self.call_defaults = call_defaults
        self.device = device
        self.default_guidance = float(inspect.signature(runner.pipe.__call__).parameters["guidance_scale"].default)
        # A private copy: tokenizers are not safe to share with the worker thread that encodes prompts.
        self._tokenizer = copy.deepcopy(getattr(runner, "tokenizer_3", None) or runner.tokenizer)
        self.timer = StepTimer(runner.transformer, device)
        self.step_observer: StepObserver | None = None

    def count_tokens(self, text: str) -> int:
        """Tokens the long-text encoder (T5) reads for `text`, end-of-sequence token included."""
        return len(self._tokenizer(text).input_ids)

    def generate(self, rows: Sequence[Row], options: BatchOptions) -> Generation:
        """Images for `rows`; the call is padded to the build's batch so every call has the same shapes."""
        padded = list(rows) + [rows[0]] * (self.spec.batch - len(rows))
        kwargs = dict(self.call_defaults)
        kwargs.update(
            prompt=[row.prompt for row in padded],
            generator=[torch.Generator(device=self.device).manual_seed(row.seed) for row in padded],
            num_inference_steps=self.spec.steps,
            height=self.spec.height,
            width=self.spec.width,
            guidance_scale=options.guidance_scale,
            max_sequence_length=self.spec.max_sequence_length,
            output_type="pil",
        )
        if options.negative_prompt is not None:
            kwargs["negative_prompt"] = [options.negative_prompt] * len(padded)
        self.timer.reset()
        started = time.perf_counter()
        images = self.runner(**kwargs).images[: len(rows)]
        pngs = [_png_bytes(image) for image in images]
        return Generation(pngs, self._phases(started, time.perf_counter()))

    def _phases(self, started: float, finished: float) -> dict[str, float]:
        kinds = plan(self.spec.steps, self.spec.t0, self.spec.refresh_every)
        phases = {"encode": self.timer.first_start - started, "full_steps": 0.0, "pruned_steps": 0.0}
        for kind, seconds in zip(kinds, self.timer.durations, strict=True):  # one transformer call per step
            phases[f"{kind}_steps"] += seconds
            if self.step_observer is not None:
                self.step_observer(kind, seconds)
        phases["decode"] = finished - self.timer.last_end
        return phases


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def load_served_model(config: ServeConfig) -> ServedModel:
    """The model `config` names, loaded on this thread (which then owns it)."""
    loader = _load_engines if config.engines is not None else _load_eager
    served = loader(config)
    served.runner.set_progress_bar_config(disable=True)
    logger.info("serving %s", served.spec)
    return served


def _load_eager(config: ServeConfig) -> ServedModel:
    """An eager pipeline accelerated with `config.cat` (no build needed; for development and tests)."""
    from catrt.loading import load_pipeline
    from catrt.pipeline import accelerate, pipeline_spec

    pipe = load_pipeline(config.model, device=config.device)
    spec = ServedSpec(
        model=config.model,
        backend="eager",
        height=config.height,
        width=config.width,
        steps=config.steps,
        batch=config.batch,
        alpha=config.cat.alpha,
        t0=config.cat.t0,
        refresh_every=config.cat.refresh_every,
        max_sequence_length=_default_text_length(pipe),
        requires_guidance=False,
    )
    return ServedModel(accelerate(pipe, config.cat), spec, dict(pipeline_spec(pipe).call_defaults), pipe.device)


def _load_engines(config: ServeConfig) -> ServedModel:
    """A built bundle via `catrt.load`, which verifies files, versions and device; its manifest says what it serves."""
    from catrt.bundle import load

    runner = load(Path(config.engines))
    build = runner.build  # the manifest's build config, already read and verified by `load`
    spec = ServedSpec(
        model=build.model,
        backend=build.backend,
        height=build.height,
        width=build.width,
        steps=build.steps,
        batch=build.batch,
        alpha=build.alpha,
        t0=build.t0,
        refresh_every=build.cat_config().refresh_every,
        max_sequence_length=build.max_sequence_length or _default_text_length(runner.pipe),
        requires_guidance=True,  # the graphs take 2 x batch rows: conditional and unconditional
    )
    # EnginePipeline fills the pipeline's call defaults and the build's arguments itself.
    return ServedModel(runner, spec, {}, runner.engine.device)


def _default_text_length(pipe: Any) -> int:
    return int(inspect.signature(pipe.__call__).parameters["max_sequence_length"].default)
