"""`accelerate` on real diffusers pipelines: exactness at alpha = 1, the schedule, FLOPs, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, SD3CFGCutoffCallback
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import catrt
from catrt import CATConfig, ConfigError, UnsupportedModelError
from catrt.models import make_adapter, patchify
from tests.conftest import TINY_NAMES, call_kwargs


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_alpha_one_reproduces_the_plain_pipeline(name: str, guidance_scale: float, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    expected = pipe(**call_kwargs(pipe, guidance_scale=guidance_scale)).images
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3))
    got = fast(**call_kwargs(pipe, guidance_scale=guidance_scale)).images
    assert got.shape == expected.shape
    assert _relative_error(got, expected) < 1e-4


@pytest.mark.parametrize("name", TINY_NAMES)
def test_trace_shows_the_schedule(name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=4, trace=True))
    result = fast(**call_kwargs(pipe, num_images_per_prompt=2)).images
    assert result.shape[0] == 4
    assert [r.step for r in fast.last_trace] == list(range(1, 13))
    assert [r.kind for r in fast.last_trace] == ["full"] * 4 + ["pruned"] * 8
    k = 8  # ceil(0.3 * 24 tokens of a 64x96 image)
    for record in fast.last_trace:
        if record.kind == "pruned":
            assert record.indices.shape == (4, k) and record.indices.dtype == torch.long
        else:
            assert record.indices is None


def test_the_trace_of_a_call_that_fails_shows_the_steps_it_ran_not_the_call_befores(tiny_pipelines: dict[str, Any]) -> None:
    """`last_trace` kept the previous call's records when a call raised (a callback, Ctrl-C, a refusal), so a user
    reading it after the error saw a whole generation that was not the one that failed."""
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=2, trace=True))
    fast(**call_kwargs(pipe, num_inference_steps=6))
    assert len(fast.last_trace) == 6

    def fail_after_step_4(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if step == 3:
            raise RuntimeError("callback failed")
        return {}

    with pytest.raises(RuntimeError, match="callback failed"):
        fast(**call_kwargs(pipe, num_inference_steps=6, callback_on_step_end=fail_after_step_4))
    assert [(r.step, r.kind) for r in fast.last_trace] == [(1, "full"), (2, "full"), (3, "pruned"), (4, "pruned")]
    with pytest.raises(ConfigError, match="t0 = 2 needs t0 < num_inference_steps"):
        fast(**call_kwargs(pipe, num_inference_steps=2))
    assert fast.last_trace == []


def test_refresh_steps_are_full(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, CATConfig(t0=4, refresh_every=3, trace=True))
    fast(**call_kwargs(pipe))
    kinds = "".join(r.kind[0] for r in fast.last_trace)
    assert kinds == "ffff" + "ppf" + "ppf" + "pp"


def test_pruning_changes_the_output_but_not_much(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    expected = pipe(**call_kwargs(pipe)).images
    got = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=4))(**call_kwargs(pipe)).images
    error = _relative_error(got, expected)
    assert 0 < error < 1.0


def test_every_token_is_recomputed_after_t0(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=8, trace=True))
    fast(**call_kwargs(pipe, num_inference_steps=28, height=128, width=128))
    seen = torch.zeros(2, 64, dtype=torch.bool)
    for record in fast.last_trace:
        if record.indices is not None:
            seen.scatter_(1, record.indices, True)
    assert bool(seen.all())


def _transformer_flops(runner: Any, kwargs: dict[str, Any], transformer_class: str) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        runner(**kwargs)
    return sum(counter.get_flop_counts()[transformer_class].values())


def test_flops_of_the_real_call_drop_as_the_schedule_predicts(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    steps, t0 = 10, 4
    settings = dict(num_inference_steps=steps, height=256, width=256, prompt="a cat", max_sequence_length=8)
    plain = _transformer_flops(pipe, call_kwargs(pipe, **settings), "SD3Transformer2DModel")
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=t0))
    pruned_run = _transformer_flops(fast, call_kwargs(pipe, **settings), "SD3Transformer2DModel")

    # Predicted: t0 full steps plus (steps - t0) pruned steps, each counted alone.
    adapter = make_adapter(pipe.transformer)
    latents = torch.randn(2, 16, 32, 32)
    text = {"encoder_hidden_states": torch.randn(2, 85, 48), "pooled_projections": torch.randn(2, 64)}
    context = adapter.prepare_context(adapter.context_inputs(text), tuple(latents.shape))
    _, kv = adapter.export_full(latents, torch.ones(2), context)
    k = CATConfig().num_selected(256)
    indices = torch.arange(k).expand(2, k)
    patches = patchify(latents, 2)[:, :k]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        adapter.pruned_forward(patches, indices, torch.ones(2), context, kv)
    pruned_step = counter.get_total_flops()
    full_step = plain / steps
    predicted = (t0 * full_step + (steps - t0) * pruned_step) / plain
    measured = pruned_run / plain
    assert measured < 0.75
    assert measured == pytest.approx(predicted, rel=0.02)


def test_saved_pipeline_loads_by_path_and_accelerates(tmp_path: Path, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3.5"]
    pipe.save_pretrained(tmp_path / "saved")
    loaded = catrt.load_pipeline(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    config = CATConfig(alpha=0.3, t0=4)
    expected = catrt.accelerate(pipe, config)(**call_kwargs(pipe)).images
    got = catrt.accelerate(loaded, config)(**call_kwargs(loaded)).images
    assert (got - expected).abs().max() < 1e-4


def test_unsupported_pipeline_class_is_refused() -> None:
    class NotAPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(UnsupportedModelError, match="catrt cannot accelerate NotAPipeline; supported pipelines"):
        catrt.accelerate(NotAPipeline())


def test_an_accelerated_pipeline_is_not_accelerated_again(tiny_pipelines: dict[str, Any]) -> None:
    fast = catrt.accelerate(tiny_pipelines["tiny-sd3"], CATConfig(t0=4))
    with pytest.raises(UnsupportedModelError, match=r"already accelerated \(an AcceleratedPipeline\); accelerate its diffusers pipeline, catrt.accelerate\(fast.pipe, config\)") as caught:
        catrt.accelerate(fast, CATConfig(alpha=0.5, t0=4))
    assert caught.value.field == "pipe"


def test_t0_not_before_the_last_step_is_refused(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    with pytest.raises(ConfigError, match=r"t0 = 8 needs t0 < num_inference_steps, got 8 steps"):
        catrt.accelerate(pipe, CATConfig(t0=8))(**call_kwargs(pipe, num_inference_steps=8))


def test_resolution_the_patch_grid_cannot_take_is_refused(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-pixart"]  # PixArt accepts multiples of 8: a 72-pixel side is a 9-cell latent
    with pytest.raises(ConfigError, match="latent size 9x8 is not divisible by the patch size 2"):
        catrt.accelerate(pipe, CATConfig(t0=4))(**call_kwargs(pipe, height=72, width=64))


@pytest.mark.parametrize("rule", ["random", "round_robin", "magnitude", "sequential", "attention"])
@pytest.mark.parametrize("name", ["tiny-sd3.5", "tiny-pixart"])
def test_baseline_rules_select_k_distinct_tokens(rule: str, name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=4, rule=rule, trace=True))
    fast(**call_kwargs(pipe))
    pruned = [r.indices for r in fast.last_trace if r.kind == "pruned"]
    assert len(pruned) == 8
    for indices in pruned:
        assert indices.shape == (2, 8)
        assert all(len(set(row.tolist())) == 8 for row in indices)
    if rule == "round_robin":  # stalest first: 8 pruned steps of 8 sweep the 24 tokens in order
        assert pruned[0][0].tolist() == list(range(8)) and pruned[1][0].tolist() == list(range(8, 16))


def test_a_prompts_selection_does_not_depend_on_its_batch_row(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    runs = []
    for order in ([0, 1], [1, 0]):
        fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=4, n_clusters=6, trace=True))
        kwargs = call_kwargs(pipe, prompt=[prompts[i] for i in order], height=128, width=128)
        kwargs["generator"] = [torch.Generator().manual_seed(seeds[i]) for i in order]
        images = fast(**kwargs).images
        runs.append((images[order.index(0)], [r.indices[order.index(0)] for r in fast.last_trace if r.indices is not None]))
    (first, first_indices), (second, second_indices) = runs
    assert all(torch.equal(a, b) for a, b in zip(first_indices, second_indices))
    assert (first - second).abs().max() < 1e-4


def test_tiny_pixart_plain_default_call_runs_and_alpha_one_reproduces_it(tiny_pipelines: dict[str, Any]) -> None:
    """tiny-pixart's transformer has a size diffusers has a resolution-bin table for (256 pixels), so the plain
    pipeline's own default call (binning on) runs, as PixArt-Sigma's does, and the accelerated one matches it."""
    pipe = tiny_pipelines["tiny-pixart"]
    for size in ({}, {"height": 64, "width": 96}):
        arguments = dict(prompt=["a red circle", "a cat"], num_inference_steps=5, output_type="latent", **size)
        expected = pipe(**arguments, generator=torch.Generator().manual_seed(0)).images
        got = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=2))(**arguments, generator=torch.Generator().manual_seed(0)).images
        assert got.shape == expected.shape
        assert _relative_error(got, expected) < 1e-4
    assert expected.shape[-2:] == (26, 38)  # 64x96 binned to 208x304 as diffusers' 256-pixel table has it


def test_pixart_without_a_bin_table_runs_with_the_pipelines_own_defaults() -> None:
    """diffusers' PixArt bins resolutions only for 256-2048 pixel transformers; for one without a bin table a call
    that leaves `use_resolution_binning` at its default runs unbinned at the size asked for."""
    pipe = catrt.load_pipeline("tiny-pixart")
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.register_to_config(sample_size=16)  # 128 pixels: no table
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=2, trace=True))
    images = fast("a red circle", num_inference_steps=3, height=48, width=80, output_type="pt").images
    assert images.shape == (1, 3, 48, 80)
    assert [r.kind for r in fast.last_trace] == ["full", "full", "pruned"]
    with pytest.raises(ValueError, match="Invalid sample size"):  # an explicit value is the caller's, as diffusers has it
        fast("a red circle", num_inference_steps=3, use_resolution_binning=True)


def test_pixart_keeps_resolution_binning_where_diffusers_has_a_table() -> None:
    from types import SimpleNamespace

    from catrt.models.pixart import _default_fixes

    for sample_size, fixes in [(128, {}), (32, {}), (16, {"use_resolution_binning": False})]:
        pipe = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(sample_size=sample_size)))
        assert _default_fixes(pipe) == fixes


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_lora_scale_one_runs_as_no_attention_kwargs(name: str, tiny_pipelines: dict[str, Any]) -> None:
    """`joint_attention_kwargs={"scale": 1.0}` is diffusers' own default LoRA scale: it changes nothing, so it runs;
    any other scale or key would change the attention catrt replaces, so it is still refused by name."""
    pipe = tiny_pipelines[name]
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=2))
    expected = fast(**call_kwargs(pipe, num_inference_steps=4)).images
    got = fast(**call_kwargs(pipe, num_inference_steps=4), joint_attention_kwargs={"scale": 1.0}).images
    assert torch.equal(got, expected)
    with pytest.raises(UnsupportedModelError, match="joint_attention_kwargs"):
        fast(**call_kwargs(pipe, num_inference_steps=4), joint_attention_kwargs={"scale": 0.5})


@pytest.mark.parametrize(("overrides", "field", "message"), [
    ({"prompt_2": "x"}, "prompt_2", r"prompt_2 has 1 prompt\(s\) but prompt has 2: .*reuse prompt\)"),
    ({"prompt_3": ["x", "y", "z"]}, "prompt_3", r"prompt_3 has 3 prompt\(s\) but prompt has 2"),
    ({"negative_prompt_2": ["x"]}, "negative_prompt_2", r"negative_prompt_2 has 1 .*reuse negative_prompt\)"),
])
def test_sd3_second_and_third_prompts_of_another_count_are_refused_before_any_step(
    overrides: dict[str, Any], field: str, message: str, tiny_pipelines: dict[str, Any]
) -> None:
    """SD3 concatenates its three encoders' outputs per prompt: diffusers fails on another count in a torch.cat."""
    pipe = tiny_pipelines["tiny-sd3"]
    steps: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: steps.append(1))
    try:
        with pytest.raises(ConfigError, match=message) as error:
            catrt.accelerate(pipe, CATConfig(t0=2))(**call_kwargs(pipe, num_inference_steps=4, **overrides))
    finally:
        hook.remove()
    assert error.value.field == field and steps == []


def test_sd3_second_and_third_prompts_diffusers_accepts_run_as_diffusers_runs_them(tiny_pipelines: dict[str, Any]) -> None:
    """What diffusers runs still runs: an empty prompt_2 (it reuses prompt), a list of the prompts' count, one negative
    string for every prompt, and a negative list of any count without guidance (diffusers does not encode it)."""
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=2))
    for overrides in (
        {"prompt_2": [], "prompt_3": ["x", "y"], "negative_prompt_2": "z"},
        {"negative_prompt_3": ["x"], "guidance_scale": 1.0},
    ):
        expected = pipe(**call_kwargs(pipe, num_inference_steps=4, **overrides)).images
        assert _relative_error(fast(**call_kwargs(pipe, num_inference_steps=4, **overrides)).images, expected) < 1e-4


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("attention_kwargs", [{"scale": 0.5}, {"ip_adapter_image_embeds": [torch.zeros(1)]}, "scale"])
def test_attention_kwargs_that_change_attention_are_refused_before_text_encoding(
    name: str, attention_kwargs: Any, tiny_pipelines: dict[str, Any]
) -> None:
    """A LoRA scale other than 1.0 (or an IP-adapter's inputs) is refused at the call, naming the fix, before the text
    encoders or any step run: refused only at the first transformer call, the call had already encoded its prompts."""
    pipe = tiny_pipelines[name]
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=2))
    calls: list[str] = []
    hooks = [getattr(pipe, part).register_forward_pre_hook(lambda *_, part=part: calls.append(part)) for part in ("text_encoder", "transformer")]
    try:
        with pytest.raises(UnsupportedModelError, match=r"argument 'joint_attention_kwargs' .*not supported by catrt.*pipe\.fuse_lora"):
            fast(**call_kwargs(pipe, num_inference_steps=4), joint_attention_kwargs=attention_kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []


def test_a_cfg_cutoff_callback_is_refused_before_any_step_where_it_would_halve_the_batch(tiny_pipelines: dict[str, Any]) -> None:
    """diffusers' SD3CFGCutoffCallback turns guidance off after its cutoff step and keeps one prompt embedding: refused at the
    call, naming callback_on_step_end (the runtime refused it only at the step after the cutoff). A cutoff at the last
    step, or a generation of one image without guidance, changes no batch a step sees, and runs as diffusers runs it."""
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=2))
    steps: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: steps.append(1))
    try:
        for callback in (SD3CFGCutoffCallback(cutoff_step_ratio=0.5), MultiPipelineCallbacks([SD3CFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=3)])):
            with pytest.raises(ConfigError, match=r"callback_on_step_end SD3CFGCutoffCallback turns guidance off after step 4 of 6") as error:
                fast(**call_kwargs(pipe, num_inference_steps=6), callback_on_step_end=callback)
            assert error.value.field == "callback_on_step_end"
    finally:
        hook.remove()
    assert steps == []
    for callback, kwargs in (
        (SD3CFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=5), {}),
        (SD3CFGCutoffCallback(cutoff_step_ratio=0.5), {"prompt": "a green square", "guidance_scale": 1.0}),
    ):
        kwargs = dict(num_inference_steps=6, **kwargs)
        expected = pipe(**call_kwargs(pipe, **kwargs), callback_on_step_end=callback).images
        assert _relative_error(fast(**call_kwargs(pipe, **kwargs), callback_on_step_end=callback).images, expected) < 1e-4
