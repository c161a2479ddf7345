"""`accelerate` called the way diffusers users call their pipelines: custom schedules, callbacks that edit
the step inputs, and options catrt cannot run (refused by name, never a wrong image or a deep shape error)."""

from __future__ import annotations

import copy
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

import catrt
from catrt import CATConfig, ConfigError, UnsupportedModelError
from catrt.models import make_adapter
from catrt.step_state import RuntimeBuffers
from tests.conftest import call_kwargs


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))


def _count_context_preparations(fast: catrt.AcceleratedPipeline) -> list[int]:
    """Count the runtime's `prepare_context` calls (the eager adapter's), one entry per call."""
    calls: list[int] = []
    prepare = fast.adapter.prepare_context

    def counted(*args: Any) -> Any:
        calls.append(1)
        return prepare(*args)

    fast.adapter.prepare_context = counted
    return calls


@pytest.mark.parametrize(("name", "argument"), [("tiny-sd3", "sigmas"), ("tiny-flux", "sigmas"), ("tiny-pixart", "timesteps")])
def test_a_custom_schedule_sets_the_step_count(name: str, argument: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    schedule = list(np.linspace(1.0, 0.2, 6)) if argument == "sigmas" else [999, 800, 600, 400, 200, 100]
    # diffusers runs len(schedule) steps and ignores num_inference_steps (12 here)
    expected = pipe(**call_kwargs(pipe, **{argument: schedule})).images
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3, trace=True))
    got = fast(**call_kwargs(pipe, **{argument: schedule})).images
    assert _relative_error(got, expected) < 1e-4
    assert [r.kind for r in fast.last_trace] == ["full"] * 3 + ["pruned"] * 3


def test_custom_sigmas_that_end_with_the_final_one_run_one_step_fewer(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-pixart"]
    own = pipe.scheduler
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(own.config)  # takes sigmas[-1] as the final sigma
    try:
        sigmas = [14.0, 8.0, 4.0, 2.0, 1.0, 0.5]
        expected = pipe(**call_kwargs(pipe, sigmas=sigmas)).images
        fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3, trace=True))
        got = fast(**call_kwargs(pipe, sigmas=sigmas)).images
    finally:
        pipe.scheduler = own
    assert _relative_error(got, expected) < 1e-4
    assert [r.kind for r in fast.last_trace] == ["full"] * 3 + ["pruned"] * 2


def test_custom_sigmas_that_leave_t0_steps_or_fewer_are_refused_before_any_step(tiny_pipelines: dict[str, Any]) -> None:
    """t0 + 1 sigmas ending with the final one run t0 steps, every one full: an unpruned image from a call that asked
    for CAT. Refused by name at the first transformer call, as a `strength` leaving t0 steps is; a scheduler that runs
    t0 + 1 steps from t0 + 1 sigmas still prunes its last."""
    pipe = tiny_pipelines["tiny-pixart"]
    own = pipe.scheduler
    blocks: list[int] = []
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: blocks.append(1))
    fast = catrt.accelerate(pipe, CATConfig(t0=3, trace=True))
    try:
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(own.config)
        with pytest.raises(ConfigError, match=r"^EulerDiscreteScheduler runs 3 steps from the 4 sigmas given, and CATConfig.t0 = 3 "
                           r"needs t0 < the steps run; give more sigmas values, or lower t0") as error:
            fast(**call_kwargs(pipe, sigmas=[14.0, 8.0, 4.0, 2.0]))
        assert error.value.field == "sigmas" and blocks == [] and fast.last_trace == []
    finally:
        pipe.scheduler = own
        hook.remove()
    sd3 = tiny_pipelines["tiny-sd3"]  # FlowMatchEuler appends the final sigma itself: 4 sigmas run 4 steps
    fast = catrt.accelerate(sd3, CATConfig(t0=3, trace=True))
    fast(**call_kwargs(sd3, sigmas=[1.0, 0.75, 0.5, 0.25]))
    assert [r.kind for r in fast.last_trace] == ["full"] * 3 + ["pruned"]


def test_a_numpy_step_count_runs_as_diffusers_runs_it(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-pixart"]
    fast = catrt.accelerate(pipe, CATConfig(t0=3, trace=True))
    fast(**call_kwargs(pipe, num_inference_steps=np.int64(5)))
    assert len(fast.last_trace) == 5
    with pytest.raises(ConfigError, match="num_inference_steps must be a positive integer, got True"):
        fast(**call_kwargs(pipe, num_inference_steps=True))


def test_a_custom_schedule_too_short_for_t0_is_refused_before_running(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, CATConfig(t0=3))
    with pytest.raises(ConfigError, match=r"t0 = 3 needs t0 < num_inference_steps, got 3 steps"):
        fast(**call_kwargs(pipe, sigmas=[1.0, 0.6, 0.3]))


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd3.5"])
def test_skip_layer_guidance_is_refused_by_name_before_any_step(name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    steps: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: steps.append(1))
    try:
        with pytest.raises(UnsupportedModelError, match="argument 'skip_guidance_layers' .* catrt does not support"):
            catrt.accelerate(pipe)(**call_kwargs(pipe, skip_guidance_layers=[0]))
    finally:
        hook.remove()
    assert steps == []


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_empty_attention_kwargs_run_and_a_lora_scale_is_refused_by_name(name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    expected = pipe(**call_kwargs(pipe, joint_attention_kwargs={})).images
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3))
    assert _relative_error(fast(**call_kwargs(pipe, joint_attention_kwargs={})).images, expected) < 1e-4
    with pytest.raises(UnsupportedModelError, match="joint_attention_kwargs.* not supported by catrt"):
        fast(**call_kwargs(pipe, joint_attention_kwargs={"scale": 0.5}))


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_a_callback_that_swaps_the_prompt_embeddings_is_followed(name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]

    def halve_the_prompt(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"prompt_embeds": tensors["prompt_embeds"] * 0.5} if step == 5 else {}

    def run(runner: Any) -> torch.Tensor:
        return runner(**call_kwargs(
            pipe, callback_on_step_end=halve_the_prompt, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]
        )).images

    expected = run(pipe)
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3))
    preparations = _count_context_preparations(fast)
    assert _relative_error(run(fast), expected) < 1e-4
    assert len(preparations) == 2  # step 1, and the step after the swap: not every step


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_a_callback_that_edits_the_prompt_embeddings_in_place_is_followed(
    name: str, inference: bool, tiny_pipelines: dict[str, Any]
) -> None:
    """The runtime kept the context it made at step 1 while the transformer's inputs were the same objects, so a
    callback writing into the prompt embeddings (`mul_`, where a swap hands a new tensor) ran every later step on
    the old values: alpha = 1 was 0.06 off the plain pipeline. Under inference_mode (no write count) too."""
    pipe = tiny_pipelines[name]

    def halve_in_place(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if step == 5:
            tensors["prompt_embeds"].mul_(0.5)
        return {}

    def run(runner: Any) -> torch.Tensor:
        with torch.inference_mode(inference):
            return runner(**call_kwargs(
                pipe, callback_on_step_end=halve_in_place, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]
            )).images

    expected = run(pipe)
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3))
    preparations = _count_context_preparations(fast)
    assert _relative_error(run(fast), expected) < 1e-4
    # step 1 and the step after the edit; an inference tensor keeps no write count, so each step makes it again
    assert len(preparations) == (12 if inference else 2)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-pixart", "tiny-flux"])
def test_under_inference_mode_with_nothing_between_steps_the_context_is_made_once(name: str, tiny_pipelines: dict[str, Any]) -> None:
    """Inference tensors keep no write count, so the context was made again at every step under inference_mode, a
    common production habit, even where no callback or hook could write the inputs: PixArt's cross-attention K/V of
    every block each step (+24% on a pruned step of a 2-block PixArt-Sigma-wide model at 512 x 512, CPU). The same
    images as without it."""
    pipe = tiny_pipelines[name]
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=3))
    preparations = _count_context_preparations(fast)
    expected = fast(**call_kwargs(pipe)).images
    with torch.inference_mode():
        got = fast(**call_kwargs(pipe)).images
    assert torch.equal(got, expected)
    assert len(preparations) == 2  # one per call


def test_under_inference_mode_a_hook_that_edits_the_prompt_embeddings_in_place_is_followed(tiny_pipelines: dict[str, Any]) -> None:
    """A forward pre-hook on the transformer runs between steps with the inputs in reach: where one is registered the
    context is made again each step under inference_mode, as for a step-end callback."""
    pipe = tiny_pipelines["tiny-sd3"]

    def fade(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        kwargs["encoder_hidden_states"].mul_(0.9)

    def run(runner: Any) -> torch.Tensor:
        with torch.inference_mode():
            return runner(**call_kwargs(pipe, prompt_embeds=prompt_embeds.clone(), negative_prompt_embeds=negative.clone(),
                                        pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled, prompt=None)).images

    with torch.inference_mode():
        prompt_embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            ["a red circle", "a green square"], None, None, do_classifier_free_guidance=True, max_sequence_length=16
        )
    handle = pipe.transformer.register_forward_pre_hook(fade, with_kwargs=True)
    try:
        expected = run(pipe)
        fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3))
        preparations = _count_context_preparations(fast)
        assert _relative_error(run(fast), expected) < 1e-4
    finally:
        handle.remove()
    assert len(preparations) == 12


def test_a_callback_that_changes_the_text_length_is_refused_by_the_input_name(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]

    def shorter_prompt(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"prompt_embeds": tensors["prompt_embeds"][:, :-1]} if step == 5 else {}

    with pytest.raises(ConfigError, match="context input 'encoder_hidden_states' is missing or has another shape") as error:
        catrt.accelerate(pipe, CATConfig(t0=3))(**call_kwargs(
            pipe, callback_on_step_end=shorter_prompt, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]
        ))
    assert error.value.field == "encoder_hidden_states"


def test_a_callback_that_drops_the_guidance_rows_is_refused_and_the_next_call_is_clean(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]

    def guidance_off(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if step != 5:
            return {}
        pipeline._guidance_scale = 0.0  # diffusers' dynamic-guidance callback: keep the conditional rows only
        return {name: tensors[name].chunk(2)[-1] for name in ("prompt_embeds", "pooled_prompt_embeds")}

    config = CATConfig(alpha=0.3, t0=3)
    expected = catrt.accelerate(pipe, config)(**call_kwargs(pipe)).images
    fast = catrt.accelerate(pipe, config)
    with pytest.raises(ConfigError, match=r"input changed shape at step 7, from \(4, 16, 8, 12\) to \(2, 16, 8, 12\)") as error:
        fast(**call_kwargs(
            pipe, callback_on_step_end=guidance_off,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "pooled_prompt_embeds"],
        ))
    assert error.value.field == "callback_on_step_end"
    assert torch.equal(fast(**call_kwargs(pipe)).images, expected)


@pytest.mark.parametrize(("name", "moved"), [("tiny-sd3", "encoder_hidden_states"), ("tiny-flux", "txt_ids")])
def test_an_input_on_another_device_is_refused_by_name_and_the_next_call_is_clean(
    name: str, moved: str, tiny_pipelines: dict[str, Any]
) -> None:
    """A CPU prompt embedding handed to a CUDA pipeline, played here by the meta device against a CPU one: refused
    naming the input before the runtime runs, where it failed deep in a matmul after making this shape's step
    buffers from it - buffers every later call of the shape then reused, failing the same way."""
    pipe = tiny_pipelines[name]
    config = CATConfig(alpha=0.3, t0=3)
    expected = catrt.accelerate(pipe, config)(**call_kwargs(pipe)).images
    fast = catrt.accelerate(pipe, config)

    def elsewhere(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, {**kwargs, moved: kwargs[moved].to("meta")}  # the transformer gets `moved` on another device

    hook = pipe.transformer.register_forward_pre_hook(elsewhere, with_kwargs=True)
    try:
        with pytest.raises(ConfigError, match=rf"the transformer's input '{moved}' is on meta but the transformer runs on cpu") as error:
            fast(**call_kwargs(pipe))
    finally:
        hook.remove()
    assert error.value.field == moved
    assert torch.equal(fast(**call_kwargs(pipe)).images, expected)


def test_a_forward_set_on_the_transformer_before_is_put_back(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    calls: list[int] = []
    original = pipe.transformer.forward

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    pipe.transformer.forward = wrapped
    try:
        catrt.accelerate(pipe, CATConfig(t0=3))(**call_kwargs(pipe, num_inference_steps=4))
        assert pipe.transformer.forward is wrapped and calls == []
        pipe(**call_kwargs(pipe, num_inference_steps=4))
        assert len(calls) == 4
    finally:
        del pipe.transformer.forward


def test_a_transformer_with_accelerate_offload_hooks_is_refused_by_name(tiny_pipelines: dict[str, Any]) -> None:
    """enable_model_cpu_offload moves the transformer to the GPU in a hook of the forward catrt replaces (on a GPU
    the steps then ran CPU weights on CUDA latents); sequential offload hooks every submodule. Attached here as
    diffusers attaches them, on the CPU: what is checked is the refusal, not the crash it prevents."""
    accelerate = pytest.importorskip("accelerate")
    hooks = pytest.importorskip("accelerate.hooks")
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, CATConfig(t0=3))
    cases = [
        (pipe.transformer, lambda: accelerate.cpu_offload_with_hook(pipe.transformer, execution_device="cpu"),
         r"the transformer has an accelerate hook \(CpuOffload: enable_model_cpu_offload"),
        (pipe.transformer.proj_out, lambda: hooks.add_hook_to_module(pipe.transformer.proj_out, hooks.AlignDevicesHook("cpu")),
         r"module 'proj_out' of the transformer has an accelerate hook \(AlignDevicesHook"),
    ]
    for module, attach, message in cases:
        attach()
        try:
            with pytest.raises(UnsupportedModelError, match=message + r".*pipe.to\(device\) instead of CPU offload"):
                fast(**call_kwargs(pipe, num_inference_steps=4))
        finally:
            hooks.remove_hook_from_module(module)
            vars(module).pop("forward", None)  # accelerate puts the class's forward back as an instance attribute
    assert fast(**call_kwargs(pipe, num_inference_steps=4)).images.isfinite().all()  # no hook left: runs again


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_a_generation_interrupted_by_its_callback_returns_as_diffusers_does(name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]

    def stop_after_step_7(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        pipeline._interrupt = step == 6  # diffusers' documented way to stop a generation early
        return {}

    expected = pipe(**call_kwargs(pipe, callback_on_step_end=stop_after_step_7)).images
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3, trace=True))
    got = fast(**call_kwargs(pipe, callback_on_step_end=stop_after_step_7)).images
    assert _relative_error(got, expected) < 1e-4
    assert [r.kind for r in fast.last_trace] == ["full"] * 3 + ["pruned"] * 4


@pytest.mark.parametrize(("name", "scheduler"), [("tiny-sd3", "FlowMatchHeunDiscreteScheduler"), ("tiny-pixart", "HeunDiscreteScheduler")])
def test_a_scheduler_of_two_calls_per_step_is_refused_before_any_step(name: str, scheduler: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    own = pipe.scheduler
    steps: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: steps.append(1))
    pipe.scheduler = getattr(diffusers, scheduler).from_config(own.config)
    try:
        with pytest.raises(ConfigError, match=f"{scheduler} calls the transformer 2 times per step; catrt needs exactly one"):
            catrt.accelerate(pipe)(**call_kwargs(pipe))
    finally:
        pipe.scheduler = own
        hook.remove()
    assert steps == []


def test_a_scheduler_set_on_the_accelerated_pipeline_is_the_one_its_calls_run(tiny_pipelines: dict[str, Any]) -> None:
    """`fast.scheduler = X.from_config(fast.scheduler.config)` (diffusers' idiom, on what `accelerate` returned) was set
    on the wrapper: reads showed X, calls ran the pipeline's old scheduler (a Heun scheduler ran unrefused)."""
    pipe = tiny_pipelines["tiny-sd3"]
    own = pipe.scheduler
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=2))
    try:
        fast.scheduler = diffusers.FlowMatchHeunDiscreteScheduler.from_config(fast.scheduler.config)
        assert pipe.scheduler is fast.scheduler and "scheduler" not in vars(fast)
        with pytest.raises(ConfigError, match="FlowMatchHeunDiscreteScheduler calls the transformer 2 times per step"):
            fast(**call_kwargs(pipe, num_inference_steps=4))
        fast.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(own.config, shift=1.0)
        expected = pipe(**call_kwargs(pipe, num_inference_steps=4)).images  # the pipeline runs the shift fast was given
        assert _relative_error(fast(**call_kwargs(pipe, num_inference_steps=4)).images, expected) < 1e-4
    finally:
        pipe.scheduler = own
    fast.buffers = RuntimeBuffers(max_shapes=1)  # the wrapper's own attributes stay its own
    assert "buffers" in vars(fast) and not hasattr(pipe, "buffers")


def test_a_config_set_on_the_accelerated_pipeline_runs_every_later_call(tiny_pipelines: dict[str, Any]) -> None:
    """`fast.config = ...`: calls naming an alpha ran the config each alpha was first derived from (its cache kept the
    old config's t0); a dict is refused naming config, as accelerate refuses it. `del fast.x` removes the `x` that
    `fast.x = ...` set on the pipeline (it raised AttributeError)."""
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.5, t0=2, trace=True))
    fast.set_progress_bar_config(disable=True)
    kinds = lambda: [record.kind for record in fast.last_trace]  # noqa: E731
    fast(**call_kwargs(pipe, num_inference_steps=4), alpha=0.5)
    assert kinds() == ["full", "full", "pruned", "pruned"]
    fast.config = CATConfig(alpha=0.5, t0=3, trace=True)
    for alpha in (None, 0.5):
        fast(**call_kwargs(pipe, num_inference_steps=4), alpha=alpha)
        assert kinds() == ["full", "full", "full", "pruned"], alpha
    with pytest.raises(ConfigError, match="config must be a catrt.CATConfig, got dict") as error:
        fast.config = {"alpha": 0.5, "t0": 3}
    assert error.value.field == "config" and fast.config.t0 == 3
    fast.marker = 1
    assert pipe.marker == 1
    del fast.marker
    assert not hasattr(pipe, "marker") and not hasattr(fast, "marker")


def test_a_transformer_set_to_none_is_refused_naming_it(tiny_pipelines: dict[str, Any]) -> None:
    """`fast.transformer = None` reaches the pipeline (attributes set on fast are its): a call or `fast.to(...)` failed
    with "cannot create weak reference to 'NoneType' object" from the call locks; it is refused naming transformer,
    and runs again once the transformer is back."""
    pipe = tiny_pipelines["tiny-sd3"]
    own = pipe.transformer
    fast = catrt.accelerate(pipe, CATConfig(t0=2))
    fast.set_progress_bar_config(disable=True)
    try:
        fast.transformer = None
        for use in (lambda: fast(**call_kwargs(pipe, num_inference_steps=4)), lambda: fast.to("cpu")):
            with pytest.raises(UnsupportedModelError, match="pipe.transformer is NoneType, not a transformer model") as error:
                use()
            assert error.value.field == "transformer"
    finally:
        fast.transformer = own
    assert fast(**call_kwargs(pipe, num_inference_steps=4)).images.isfinite().all()


@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_a_scheduler_that_repeats_timesteps_is_refused_before_any_step(skip_prk_steps: bool, tiny_pipelines: dict[str, Any]) -> None:
    """PNDM has `order` 1 but sets num_inference_steps + 1 timesteps (its PLMS warm-up runs the first one twice), and
    the pipeline calls the transformer once per timestep: refused by name at the first call, where the runtime
    refused the call past its plan only after every planned step had run."""
    pipe = tiny_pipelines["tiny-pixart"]
    own = pipe.scheduler
    blocks: list[int] = []
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: blocks.append(1))
    pipe.scheduler = diffusers.PNDMScheduler.from_config(own.config, skip_prk_steps=skip_prk_steps)
    fast = catrt.accelerate(pipe, CATConfig(t0=3))
    try:
        with pytest.raises(ConfigError, match=r"PNDMScheduler set \d+ timesteps for 6 steps, so the pipeline would call the "
                           r"transformer more than once in some steps; catrt needs exactly one") as error:
            fast(**call_kwargs(pipe, num_inference_steps=6))
    finally:
        pipe.scheduler = own
        hook.remove()
    assert error.value.field == "scheduler" and blocks == [] and len(fast.buffers) == 0


def test_a_scheduler_that_resizes_the_latents_is_refused_before_any_step(tiny_pipelines: dict[str, Any]) -> None:
    """FlowMatchLCM's multi-scale sampling upsamples the latents between steps: the runtime refused the step where the
    size changed, after the steps before it ran, asking about a callback_on_step_end. Without scale factors it runs."""
    pipe = tiny_pipelines["tiny-sd3"]
    own = pipe.scheduler
    blocks: list[int] = []
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: blocks.append(1))
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=2))
    try:
        pipe.scheduler = diffusers.FlowMatchLCMScheduler.from_config(own.config, scale_factors=[1.0, 1.0, 2.0, 2.0])
        with pytest.raises(ConfigError, match=r"FlowMatchLCMScheduler resizes the latents between steps \(scale_factors "
                           r"\[1.0, 1.0, 2.0, 2.0\]\), and catrt's caches are made for one latent size") as error:
            fast(**call_kwargs(pipe, num_inference_steps=5, guidance_scale=1.0))
        assert error.value.field == "scheduler" and blocks == [] and len(fast.buffers) == 0
        hook.remove()
        pipe.scheduler = diffusers.FlowMatchLCMScheduler.from_config(own.config)
        torch.manual_seed(0)  # its step draws noise from the global generator (the pipeline passes it none)
        expected = pipe(**call_kwargs(pipe, num_inference_steps=5, guidance_scale=1.0)).images
        torch.manual_seed(0)
        assert _relative_error(fast(**call_kwargs(pipe, num_inference_steps=5, guidance_scale=1.0)).images, expected) < 1e-4
    finally:
        pipe.scheduler = own
        hook.remove()


def test_flow_match_lcm_with_scale_factors_of_one_runs(tiny_pipelines: dict[str, Any]) -> None:
    """Scale factors that are all 1.0 never resize the latents (its step interpolates to the size it had), and were
    refused as multi-scale sampling."""
    pipe = tiny_pipelines["tiny-sd3"]
    own = pipe.scheduler
    try:
        pipe.scheduler = diffusers.FlowMatchLCMScheduler.from_config(own.config, scale_factors=[1.0] * 4)
        torch.manual_seed(0)  # its step draws noise from the global generator (the pipeline passes it none)
        expected = pipe(**call_kwargs(pipe, num_inference_steps=5, guidance_scale=1.0)).images
        fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=2, trace=True))
        torch.manual_seed(0)
        got = fast(**call_kwargs(pipe, num_inference_steps=5, guidance_scale=1.0)).images
    finally:
        pipe.scheduler = own
    assert _relative_error(got, expected) < 1e-4
    assert [r.kind for r in fast.last_trace] == ["full"] * 2 + ["pruned"] * 3


@pytest.mark.parametrize("scheduler", [diffusers.DPMSolverMultistepScheduler, diffusers.SASolverScheduler])
def test_a_multistep_scheduler_keeping_the_raw_model_output_runs_as_diffusers_runs_it(scheduler: type, tiny_pipelines: dict[str, Any]) -> None:
    """Without guidance PixArt hands the transformer's output (a view of it) to the scheduler as it is, and these
    multistep solvers keep it for the next steps: the runtime's prediction buffer, overwritten by the next step,
    made their second-order term 0 (max error 2e-2 for DPM-Solver, 0.18 for SA-Solver at alpha 1)."""
    pipe = tiny_pipelines["tiny-pixart"]
    own = pipe.scheduler
    settings = {
        diffusers.DPMSolverMultistepScheduler: {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        diffusers.SASolverScheduler: {"algorithm_type": "noise_prediction"},
    }[scheduler]
    pipe.scheduler = scheduler.from_config(own.config, **settings)
    try:
        expected = pipe(**call_kwargs(pipe, num_inference_steps=5, guidance_scale=1.0)).images
        got = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=2))(**call_kwargs(pipe, num_inference_steps=5, guidance_scale=1.0)).images
    finally:
        pipe.scheduler = own
    assert expected.isfinite().all() and _relative_error(got, expected) < 1e-4


def test_the_transformer_and_processors_the_pipeline_has_at_the_call_are_run(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    own = pipe.transformer
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3))
    with_functions = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3), functions=make_adapter(own))
    other = copy.deepcopy(own)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(1.1)
    pipe.transformer = other  # a fine-tune swapped in after accelerate
    try:
        expected = pipe(**call_kwargs(pipe)).images
        assert _relative_error(fast(**call_kwargs(pipe)).images, expected) < 1e-4
        pipe.transformer = type(own).from_config({**own.config, "num_layers": own.config.num_layers + 1})  # more K/V slots
        deeper = pipe(**call_kwargs(pipe)).images
        assert _relative_error(fast(**call_kwargs(pipe)).images, deeper) < 1e-4
        pipe.transformer = other
        with pytest.raises(UnsupportedModelError, match="pipe.transformer was replaced after catrt.accelerate, and these step"):
            with_functions(**call_kwargs(pipe))
        other.transformer_blocks[0].attn.set_processor(AttnProcessor())
        with pytest.raises(UnsupportedModelError, match="block 0 uses attention processor AttnProcessor; catrt prunes only"):
            fast(**call_kwargs(pipe))
    finally:
        pipe.transformer = own


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-pixart"])
def test_a_first_call_under_inference_mode_leaves_buffers_later_calls_can_write(name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    expected = catrt.accelerate(pipe, CATConfig(t0=3))(**call_kwargs(pipe)).images
    fast = catrt.accelerate(pipe, CATConfig(t0=3))
    with torch.inference_mode():
        assert torch.equal(fast(**call_kwargs(pipe)).images, expected)
    assert torch.equal(fast(**call_kwargs(pipe)).images, expected)  # same buffers, outside inference mode


def _wrong_latents(pipe: Any) -> torch.Tensor:
    """Latents of a square 8x8 grid where `call_kwargs`' 64x96 image needs 8x12."""
    return torch.randn(2, pipe.transformer.config.in_channels, 8, 8)


#: (model, call arguments, field named, message): each one diffusers would fail on deep in a tokenizer, a reshape or a
#: torch.cat, or would run silently wrong (a swallowed keyword, a NaN guidance, latents of another size).
_CALL_MISTAKES = [
    ("tiny-sd3", {"prompt": []}, "prompt", "prompt must be a text or a non-empty list of texts, got an empty list"),
    ("tiny-pixart", {"prompt": []}, "prompt", "prompt must be a text or a non-empty list of texts, got an empty list"),
    ("tiny-flux", {"prompt": ["a", 3]}, "prompt", "prompt must be a text or a non-empty list of texts, got list"),
    ("tiny-flux", {"num_images_per_prompt": 0}, "num_images_per_prompt", "num_images_per_prompt must be a positive integer, got 0"),
    ("tiny-sd3", {"num_images_per_prompt": -1}, "num_images_per_prompt", "num_images_per_prompt must be a positive integer, got -1"),
    ("tiny-pixart", {"num_images_per_prompt": 2.0}, "num_images_per_prompt", "must be a positive integer, got 2.0"),
    ("tiny-pixart", {"height": -16}, "height", r"height must be a positive number of pixels .*got -16"),
    ("tiny-sd3", {"width": float("nan")}, "width", "width must be a positive number of pixels"),
    ("tiny-flux", {"height": float("nan")}, "height", "height must be a positive number of pixels .*got nan"),
    ("tiny-flux", {"width": "96"}, "width", "width must be a positive number of pixels .*got '96'"),
    ("tiny-sd3", {"height": float("inf")}, "height", "height must be a positive number of pixels .*got inf"),
    ("tiny-sd3", {"max_sequence_length": 0}, "max_sequence_length", r"max_sequence_length must be an integer >= 1, got 0"),
    ("tiny-flux", {"guidance_scale": float("nan")}, "guidance_scale", "guidance_scale must be a finite number, got nan"),
    ("tiny-sd3", {"guidance_scale": float("inf")}, "guidance_scale", "guidance_scale must be a finite number, got inf"),
    ("tiny-flux", {"guidance_scale": "5"}, "guidance_scale", "guidance_scale must be a number, got '5'"),
    ("tiny-pixart", {"negative_prompt": ["x", "y", "z"]}, "negative_prompt", "negative_prompt has 3 prompts but prompt has 2"),
    ("tiny-pixart", {"attention_kwargs": {"scale": 0.5}}, "attention_kwargs", r"no argument\(s\) 'attention_kwargs'"),
    ("tiny-pixart", {"callback_on_step_end": lambda *_: {}}, "callback_on_step_end", "would ignore them silently"),
    ("tiny-sd3", {"sigmas": []}, "sigmas", "sigmas is empty"),
    ("tiny-sd3", {"clip_skip": 100}, "clip_skip", r"clip_skip must be an integer from 0 to \d+, the CLIP text encoders' layers - 1, got 100"),
    ("tiny-sd3", {"clip_skip": -1}, "clip_skip", "clip_skip must be an integer from 0 to"),
    ("tiny-sd3", {"generator": 0}, "generator", r"generator must be a torch.Generator or a list of them, got 0"),
    ("tiny-flux", {"callback_on_step_end": "halve"}, "callback_on_step_end", "callback_on_step_end must be a function"),
    ("tiny-pixart", {"latents": np.zeros((2, 4, 8, 12), np.float32)}, "latents", "latents must be a torch.Tensor, got ndarray"),
    ("tiny-sd3", {"latents": "wrong"}, "latents", r"latents have the latent grid \(8, 8\), but height x width 64 x 96 makes \(8, 12\)"),
    ("tiny-pixart", {"latents": "wrong"}, "latents", r"latents have the latent grid \(8, 8\)"),
]


@pytest.mark.parametrize(("name", "overrides", "field", "message"), _CALL_MISTAKES)
def test_call_arguments_diffusers_fails_on_deep_are_refused_by_name_before_any_step(
    name: str, overrides: dict[str, Any], field: str, message: str, tiny_pipelines: dict[str, Any]
) -> None:
    pipe = tiny_pipelines[name]
    if isinstance(overrides.get("latents"), str):  # "wrong": made for this pipeline
        overrides = {"latents": _wrong_latents(pipe)}
    steps: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: steps.append(1))
    try:
        with pytest.raises(ConfigError, match=message) as error:
            kwargs = call_kwargs(pipe, num_inference_steps=4, **overrides)
            catrt.accelerate(pipe, CATConfig(t0=2))(**{**kwargs, **overrides})  # call_kwargs seeds its own generator
    finally:
        hook.remove()
    assert error.value.field == field and steps == []


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-pixart", "tiny-flux"])
def test_call_values_diffusers_runs_still_run_as_diffusers_runs_them(name: str, tiny_pipelines: dict[str, Any]) -> None:
    """The refusals above leave what diffusers accepts alone: a float size (FLUX's token grid read it as a float),
    a NaN-free guidance of 1, numpy counts, a height of 0 (diffusers' default), a list of empty prompts."""
    pipe = tiny_pipelines[name]
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=2))
    for overrides in (
        {"height": 64.0, "width": 96.0},
        {"guidance_scale": 1.0, "num_images_per_prompt": np.int64(2), "max_sequence_length": np.int64(16)},
        {"prompt": ["", ""], "negative_prompt": ["x", "y"]},
        {"clip_skip": 1} if name == "tiny-sd3" else {},
    ):
        expected = pipe(**call_kwargs(pipe, num_inference_steps=4, **overrides)).images
        got = fast(**call_kwargs(pipe, num_inference_steps=4, **overrides)).images
        assert got.shape == expected.shape and _relative_error(got, expected) < 1e-4


@pytest.mark.parametrize(("name", "setting"), [("tiny-sd3", "t0"), ("tiny-pixart", "n_clusters"), ("tiny-flux", "trace")])
def test_a_catconfig_setting_given_to_a_call_names_where_it_goes(name: str, setting: str, tiny_pipelines: dict[str, Any]) -> None:
    """Only alpha= is per call; another CATConfig field was Python's bare "unexpected keyword" (PixArt's **kwargs
    swallowed it)."""
    pipe = tiny_pipelines[name]
    with pytest.raises(ConfigError, match=rf"{setting} is a CATConfig setting, .*catrt.CATConfig\({setting}=...\)") as error:
        catrt.accelerate(pipe, CATConfig(t0=2))(**call_kwargs(pipe, num_inference_steps=4), **{setting: 3})
    assert error.value.field == setting


@pytest.mark.parametrize("module_name, class_name", [("catrt.pipeline", "AcceleratedPipeline"), ("catrt.bundle", "EnginePipeline")])
def test_every_attribute_a_wrapper_sets_on_itself_is_declared_its_own(module_name: str, class_name: str) -> None:
    """The wrappers forward every attribute set on them to their pipeline but those in `_OWN_ATTRIBUTES`: one a method
    assigns (`self.x = ...`) that the set does not name would land on the diffusers pipeline, not the wrapper."""
    import ast
    import importlib
    import inspect as inspect_module

    module = importlib.import_module(module_name)
    tree = ast.parse(inspect_module.getsource(getattr(module, class_name)))
    assigned = {
        target.attr
        for node in ast.walk(tree)
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
    }
    assert assigned and assigned <= module._OWN_ATTRIBUTES, sorted(assigned - module._OWN_ATTRIBUTES)
