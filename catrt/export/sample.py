"""Example inputs of a build's graphs, taken from a real pipeline call.

The first transformer call of a generation at the build's settings gives the exact context tensors
(their names, shapes and dtypes) the pipeline will hand the runtime, whatever the model family.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from catrt.build_config import BuildConfig
from catrt.models.base import Adapter, Context, patchify
from catrt.pipeline import accelerate, pipeline_spec

logger = logging.getLogger(__name__)

SAMPLE_PROMPT = "a photo of a red circle on a blue background"


@dataclass(frozen=True)
class StepSample:
    """One full step's inputs, and the pruned-step inputs that follow from them."""

    hidden_states: torch.Tensor  # (B, C, H, W)
    timestep: torch.Tensor  # (B,)
    context: Context


class _SampleTaken(Exception):
    """Stops the sample generation after its first transformer call."""


class _FirstStepRecorder:
    """Step functions that record the first full step's inputs and stop the generation."""

    sample: StepSample | None = None

    def full_forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, context: Context) -> Any:
        self.sample = StepSample(hidden_states, timestep, context)
        raise _SampleTaken

    def pruned_forward(self, *args: Any) -> Any:
        raise AssertionError("a generation starts with a full step")


def capture_step_sample(pipe: Any, build: BuildConfig) -> StepSample:
    """The inputs of the first step of a `build`-shaped generation of `pipe`."""
    recorder = _FirstStepRecorder()
    kwargs: dict[str, Any] = dict(pipeline_spec(pipe).call_defaults)
    kwargs.update(build.call_arguments(), prompt=[SAMPLE_PROMPT] * build.batch, output_type="latent")
    kwargs["generator"] = torch.Generator(device=pipe.device).manual_seed(0)
    try:
        accelerate(pipe, build.cat_config(), functions=recorder)(**kwargs)
    except _SampleTaken:
        pass
    assert recorder.sample is not None, "the pipeline never called its transformer"
    return recorder.sample


def full_inputs(sample: StepSample) -> dict[str, torch.Tensor]:
    """The full graph's inputs, in graph order."""
    return {"hidden_states": sample.hidden_states, "timestep": sample.timestep, **sample.context}


def pruned_inputs(sample: StepSample, adapter: Adapter, k: int, kv_cache: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pruned graph's inputs: k random distinct tokens per row, and the full step's K/V cache."""
    batch = sample.hidden_states.shape[0]
    patches = patchify(sample.hidden_states, adapter.patch_size)
    generator = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(patches.shape[1], generator=generator)[:k] for _ in range(batch)])
    indices = indices.to(patches.device)
    selected = patches.gather(1, indices.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    return {
        "patches": selected,
        "indices": indices,
        "timestep": sample.timestep,
        "kv_cache": kv_cache,
        **sample.context,
    }
