"""The library called as users (and careless scripts) call it: from several threads, with tensors the
transformer cannot take, with arguments of the wrong kind, copied, moved with `.to`. Each mistake is a
catrt error naming the field before any step runs, never a deep torch traceback or a wrong image."""

from __future__ import annotations

import copy
import threading
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch

import catrt
from catrt import CATConfig, ConfigError, UnknownModelError, UnsupportedModelError
from catrt.bundle import load
from tests.conftest import call_kwargs


def _quick(pipe: Any, **overrides: Any) -> dict[str, Any]:
    """A short one-prompt generation."""
    return call_kwargs(pipe, **{"prompt": "a red circle", "num_inference_steps": 5, "height": 32, "width": 48, **overrides})


def _count_steps(pipe: Any) -> tuple[list[int], Any]:
    steps: list[int] = []
    return steps, pipe.transformer.register_forward_pre_hook(lambda *_: steps.append(1))


# -- threads ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_calls_from_several_threads_run_one_at_a_time_and_leave_the_transformer_as_it_was(
    name: str, tiny_pipelines: dict[str, Any]
) -> None:
    pipe = tiny_pipelines[name]
    fast = catrt.accelerate(pipe, CATConfig(t0=2))
    prompts = ["a red circle", "a green square on a yellow background", "blue"]
    expected = {prompt: fast(**_quick(pipe, prompt=prompt)).images for prompt in prompts}
    plain = pipe(**_quick(pipe)).images
    got: dict[tuple[str, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    together = threading.Barrier(len(prompts), timeout=600)  # all started before any calls: a bound for a hang only

    def work(prompt: str) -> None:
        try:
            together.wait()
            for round_ in range(2):
                got[(prompt, round_)] = fast(**_quick(pipe, prompt=prompt)).images
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(prompt,)) for prompt in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(torch.equal(image, expected[prompt]) for (prompt, _), image in got.items()) and len(got) == 6
    assert "forward" not in pipe.transformer.__dict__  # no thread left catrt's forward on the transformer
    assert torch.equal(pipe(**_quick(pipe)).images, plain)


def test_a_plain_call_from_another_thread_during_a_generation_runs_unpruned(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    # Another pipeline on the same transformer (diffusers' way of sharing components), with its own scheduler.
    other = type(pipe)(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)})
    other.set_progress_bar_config(disable=True)
    plain = other(**_quick(other, prompt="blue")).images
    seen: list[torch.Tensor] = []

    def meanwhile(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if step == 3:  # catrt's forward is on the shared transformer now: another thread's plain call must not run it
            thread = threading.Thread(target=lambda: seen.append(other(**_quick(other, prompt="blue")).images))
            thread.start()
            thread.join()
        return {}

    catrt.accelerate(pipe, CATConfig(t0=2))(**_quick(pipe, callback_on_step_end=meanwhile))
    assert len(seen) == 1 and torch.equal(seen[0], plain)


def test_a_callback_that_calls_the_accelerated_pipeline_again_is_refused_by_name(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, CATConfig(t0=2))
    expected = fast(**_quick(pipe)).images

    def again(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        fast(**_quick(pipe))
        return {}

    with pytest.raises(ConfigError, match="called from inside one of its own generations") as error:
        fast(**_quick(pipe, callback_on_step_end=again))
    assert error.value.field == "callback_on_step_end"
    assert torch.equal(fast(**_quick(pipe)).images, expected)  # the lock was released


# -- tensors the transformer cannot take ------------------------------------------------------------


def _latents(pipe: Any, channels: int | None = None, batch: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Latents for a 32x48 image (4x6 latent cells), as the pipeline's `latents=` argument."""
    config = pipe.transformer.config
    if config.get("guidance_embeds") is not None:  # FLUX: packed, 2x3 tokens of 4 latent channels x 2 x 2
        return torch.randn(batch, 6, channels or config.in_channels, dtype=dtype)
    return torch.randn(batch, channels or config.in_channels, 4, 6, dtype=dtype)


@pytest.mark.parametrize(("name", "case", "field", "message"), [
    ("tiny-sd3", "channels", "hidden_states", r"'hidden_states' has shape \(2, 17, 4, 6\), but this SD3Transformer2DModel takes \(B, 16, 4, 6\)"),
    ("tiny-pixart", "channels", "hidden_states", r"'hidden_states' has shape \(2, 5, 4, 6\), but this PixArtTransformer2DModel takes \(B, 4, 4, 6\)"),
    ("tiny-flux", "channels", "hidden_states", r"'hidden_states' has shape \(1, 6, 65\), but this FluxTransformer2DModel takes \(B, 6, 64\)"),
    ("tiny-sd3", "batch", "encoder_hidden_states", r"'encoder_hidden_states' has shape \(2, 93, 48\), .*\(B = 4, the latents' batch\)"),
    ("tiny-pixart", "batch", "encoder_hidden_states", r"'encoder_hidden_states' has shape \(2, 16, 48\), .*\(B = 4, the latents' batch\)"),
    ("tiny-pixart", "dtype", "hidden_states", "'hidden_states' is float64 but the transformer runs float32"),
    ("tiny-sd3", "width", "encoder_hidden_states", r"'encoder_hidden_states' has shape \(2, 93, 47\), .*takes \(B, 93, 48\)"),
    ("tiny-flux", "width", "encoder_hidden_states", r"'encoder_hidden_states' has shape \(1, 16, 47\), .*takes \(B, 16, 48\)"),
    ("tiny-sd3", "embeds dtype", "hidden_states", "'hidden_states' is float64 but the transformer runs float32"),
])
def test_transformer_inputs_it_cannot_take_are_refused_by_name_before_any_step(
    name: str, case: str, field: str, message: str, tiny_pipelines: dict[str, Any]
) -> None:
    """Where plain diffusers fails deep in a conv or matmul (or catrt would in a scatter), catrt names the input."""
    pipe = tiny_pipelines[name]
    kwargs = _quick(pipe)
    if case == "channels":
        kwargs["latents"] = _latents(pipe, channels=pipe.transformer.config.in_channels + 1)
    elif case == "batch":
        kwargs["latents"] = _latents(pipe, batch=2)  # two images' latents for one prompt
    elif case == "dtype":
        kwargs["latents"] = _latents(pipe, dtype=torch.float64)
    else:
        prompt = kwargs.pop("prompt")
        if name == "tiny-sd3":
            embeds = pipe.encode_prompt(prompt, None, None, max_sequence_length=16)
            names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        else:
            embeds = pipe.encode_prompt(prompt, None, max_sequence_length=16)[:2]
            names = ("prompt_embeds", "pooled_prompt_embeds")
        tensors = dict(zip(names, embeds))
        for key in [key for key in tensors if "pooled" not in key]:
            tensors[key] = tensors[key][..., :-1] if case == "width" else tensors[key]
        if case == "embeds dtype":
            tensors = {key: tensor.double() for key, tensor in tensors.items()}
        kwargs.update(tensors)
    steps, hook = _count_steps(pipe)
    try:
        with pytest.raises(ConfigError, match=message) as error:
            catrt.accelerate(pipe, CATConfig(t0=2))(**kwargs)
    finally:
        hook.remove()
    assert error.value.field == field
    assert steps == [1]  # the first transformer call is refused before its step runs (the hook fires first)


def test_a_callback_that_changes_the_latents_dtype_is_refused_by_name(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]

    def to_double(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"latents": tensors["latents"].double()} if step == 3 else {}

    with pytest.raises(ConfigError, match="'hidden_states' is float64 but the transformer runs float32") as error:
        catrt.accelerate(pipe, CATConfig(t0=2))(**_quick(
            pipe, callback_on_step_end=to_double, callback_on_step_end_tensor_inputs=["latents"]))
    assert error.value.field == "hidden_states"


def test_inputs_diffusers_runs_still_run(tiny_pipelines: dict[str, Any]) -> None:
    """FLUX broadcasts one prompt's embeddings over two latents, as diffusers does; alpha 1 is exact there."""
    pipe = tiny_pipelines["tiny-flux"]
    latents = _latents(pipe, batch=2)
    expected = pipe(**_quick(pipe, latents=latents)).images
    got = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=2))(**_quick(pipe, latents=latents)).images
    assert got.shape[0] == 2 and float((got - expected).abs().max()) < 1e-4


def test_a_flux_size_under_one_token_is_refused_by_name(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-flux"]
    with pytest.raises(ConfigError, match=r"height=8 is less than one FLUX token \(16 pixels\)") as error:
        catrt.accelerate(pipe, CATConfig(t0=2))(**_quick(pipe, height=8))
    assert error.value.field == "height"


# -- arguments of the wrong kind --------------------------------------------------------------------


def test_accelerate_refuses_arguments_of_the_wrong_kind_by_name(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    for kwargs, field, message in [
        ({"config": {"alpha": 0.3}}, "config", "config must be a catrt.CATConfig, got dict"),
        ({"config": 0.3}, "config", "config must be a catrt.CATConfig, got float"),
        ({"functions": object()}, "functions", "object has no prepare_context, full_forward, pruned_forward"),
        ({"cuda_graphs": "yes"}, "cuda_graphs", "cuda_graphs must be True, False or None, got 'yes'"),
    ]:
        with pytest.raises(ConfigError, match=message) as error:
            catrt.accelerate(pipe, **kwargs)
        assert error.value.field == field
    with pytest.raises(UnsupportedModelError, match="catrt cannot accelerate str") as error:
        catrt.accelerate("tiny-sd3")
    assert error.value.field == "pipe"
    fast = catrt.accelerate(pipe, CATConfig(t0=2))
    for alpha in ([0.3], torch.tensor(0.3)):
        with pytest.raises(ConfigError, match=r"CATConfig.alpha must be in \(0, 1\]") as error:
            fast(**_quick(pipe), alpha=alpha)
        assert error.value.field == "alpha"


def test_load_and_load_pipeline_refuse_arguments_of_the_wrong_kind_by_name(tiny_pipelines: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="engine_dir must be a folder path") as error:
        load(None)  # type: ignore[arg-type]
    assert error.value.field == "engine_dir"
    with pytest.raises(ConfigError, match="config must be a catrt.CATConfig or None, got dict") as error:
        load("engines/any", config={"alpha": 0.3})  # type: ignore[arg-type]
    assert error.value.field == "config"
    with pytest.raises(UnsupportedModelError, match="catrt cannot accelerate str"):
        load("engines/any", pipe="tiny-sd3")
    for name in (None, 3, ""):
        with pytest.raises(UnknownModelError) as error:
            catrt.load_pipeline(name)  # type: ignore[arg-type]
        assert error.value.field == "model"


def test_config_takes_numpy_numbers_as_plain_ones_and_refuses_other_kinds() -> None:
    config = CATConfig(alpha=np.float32(0.25), t0=np.int64(3), n_clusters=np.int32(4), ewma_decay=Fraction(1, 4))
    assert config == CATConfig(alpha=0.25, t0=3, n_clusters=4, ewma_decay=0.25)
    assert [type(value) for value in (config.alpha, config.t0, config.n_clusters, config.ewma_decay)] == [float, int, int, float]
    with pytest.raises(ConfigError, match=r"t0 must be an integer >= 2, got 3.0"):
        CATConfig(t0=np.float64(3.0))
    for data in ([("alpha", 0.3)], None, {1: 0.3}):
        with pytest.raises(ConfigError, match="CATConfig.from_dict takes a dict of field names to values") as error:
            CATConfig.from_dict(data)  # type: ignore[arg-type]
        assert error.value.field == "data"


# -- copies and moves ---------------------------------------------------------------------------------


def test_an_accelerated_pipeline_copies_and_moves_as_itself(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-pixart"]
    fast = catrt.accelerate(pipe, CATConfig(t0=2, trace=True))
    expected = fast(**_quick(pipe)).images
    assert fast.to("cpu") is fast and fast.to(torch.float32) is fast  # `fast = fast.to(...)` stays pruned
    shallow = copy.copy(fast)
    assert shallow.pipe is pipe and torch.equal(shallow(**_quick(pipe)).images, expected)
    deep = copy.deepcopy(fast)
    assert deep.pipe is not pipe and deep.adapter.transformer is deep.pipe.transformer
    assert torch.equal(deep(**_quick(pipe)).images, expected)
    assert [record.kind for record in deep.last_trace] == ["full", "full", "pruned", "pruned", "pruned"]
