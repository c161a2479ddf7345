"""Example inputs of a build's graphs, taken from a real pipeline call, and the eager outputs on them.

The first transformer call of a generation at the build's settings gives the exact context tensors
(their names, shapes and dtypes) the pipeline will hand the runtime, whatever the model family. The
sample generation runs the pipeline's whole loop with a recorder in the transformer's place (it
returns zeros, so the loop is cheap) and keeps the first call's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from catrt.build_config import BuildConfig
from catrt.contract import FULL, PRUNED, pruned_graph
from catrt.errors import BuildError
from catrt.export.quiet import errors_only
from catrt.models.base import Adapter, Context
from catrt.pipeline import pipeline_spec, transformer_replaced


SAMPLE_PROMPT = "a photo of a red circle on a blue background"
Graphs = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class StepSample:
    """One full step's inputs: latents, timestep and the context inputs of the call."""

    hidden_states: torch.Tensor  # (B, C, H, W), or (B, N, C) packed
    timestep: torch.Tensor  # (B,)
    context_inputs: Context


class _FirstCallRecorder:
    """Stands in for the transformer: keeps the first call's inputs, answers zeros."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.sample: StepSample | None = None

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, call_kwargs: dict[str, Any]) -> torch.Tensor:
        if self.sample is None:
            self.sample = StepSample(hidden_states.clone(), timestep.clone(), self.adapter.context_inputs(call_kwargs))
        return hidden_states.new_zeros(self.adapter.prediction_shape(tuple(hidden_states.shape)))


def capture_step_sample(pipe: Any, adapter: Adapter, build: BuildConfig) -> StepSample:
    """The inputs of the first step of a `build`-shaped generation of `pipe`."""
    recorder = _FirstCallRecorder(adapter)
    kwargs: dict[str, Any] = dict(pipeline_spec(pipe).call_defaults)
    kwargs.update(build.call_arguments(), prompt=[SAMPLE_PROMPT] * build.batch, output_type="latent")
    kwargs["generator"] = torch.Generator(device=pipe.device).manual_seed(0)
    # The prompt is ours, not the user's: diffusers' notice that a short --max-sequence-length truncates it
    # (every tiny-model build) is noise in a build's output.
    with transformer_replaced(pipe.transformer, recorder), torch.no_grad(), errors_only("diffusers"):
        pipe(**kwargs)
    if recorder.sample is None:
        raise BuildError(f"the {type(pipe).__name__} never called its transformer", field="model")
    return recorder.sample


def random_indices(batch: int, num_tokens: int, k: int, device: torch.device) -> torch.Tensor:
    """(B, k) distinct token indices per row, seeded: a pruned step's example selection."""
    generator = torch.Generator().manual_seed(0)
    return torch.stack([torch.randperm(num_tokens, generator=generator)[:k] for _ in range(batch)]).to(device)


@torch.no_grad()
def reference_io(sample: StepSample, adapter: Adapter, ks: tuple[int, ...]) -> tuple[Graphs, Graphs]:
    """Every graph's example inputs and the eager adapter's outputs on them, by graph, in graph order:
    context, full, then one pruned graph per k of `ks` (`pruned_graph(k)`)."""
    latent_shape = tuple(sample.hidden_states.shape)
    context = adapter.prepare_context(sample.context_inputs, latent_shape)
    derived = {name: tensor for name, tensor in context.items() if name not in sample.context_inputs}
    full = FULL.bind((sample.hidden_states, sample.timestep), context)
    full_outputs = FULL.named_outputs(adapter.export_full(sample.hidden_states, sample.timestep, context))
    inputs: Graphs = {"context": dict(sample.context_inputs), "full": full}
    outputs: Graphs = {"context": derived, "full": full_outputs}
    patches = adapter.tokens_of(sample.hidden_states)
    for k in ks:
        indices = random_indices(patches.shape[0], patches.shape[1], k, patches.device)
        selected = patches.gather(1, indices.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        graph = pruned_graph(k)
        inputs[graph] = PRUNED.bind((selected, indices, sample.timestep, full_outputs["kv"]), context)
        outputs[graph] = PRUNED.named_outputs(
            adapter.export_pruned(selected, indices, sample.timestep, context, full_outputs["kv"])
        )
    return inputs, outputs
