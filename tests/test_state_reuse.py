"""What an accelerated pipeline keeps between calls (step buffers per shape, the wrapped pipeline's spec and call
signature, the context made at step 1) must never leak a value from an earlier call or step into a later one: a call
equals the same call on a fresh accelerated pipeline, exactly."""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
from typing import Any

import pytest
import torch

import catrt
from catrt import CATConfig, ConfigError, UnsupportedModelError
from catrt.runtime import BASELINE_RULES
from catrt.step_state import RuntimeBuffers
from tests.conftest import call_kwargs

CONFIG = CATConfig(alpha=0.3, t0=3)


def _images(runner: Any, pipe: Any, alpha: float | None = None, **overrides: Any) -> torch.Tensor:
    kwargs = call_kwargs(pipe, **{"num_inference_steps": 6, **overrides})
    return (runner(**kwargs) if alpha is None else runner(**kwargs, alpha=alpha)).images


@pytest.mark.parametrize(("first", "then"), [("tiny-flux", "tiny-sd3"), ("tiny-sd3", "tiny-pixart")])
def test_a_pipeline_set_on_the_accelerated_one_runs_as_its_own_class(first: str, then: str, tiny_pipelines: dict[str, Any]) -> None:
    """`fast.pipe = other` kept the first pipeline's spec and call signature: a FLUX spec ran SD3's [uncond, cond]
    rows as 2 x batch images with no guidance (another image, no error), an SD3 signature handed PixArt SD3's
    arguments (a TypeError deep in diffusers)."""
    fast = catrt.accelerate(tiny_pipelines[first], CONFIG)
    _images(fast, tiny_pipelines[first])
    fast.pipe = tiny_pipelines[then]
    expected = _images(catrt.accelerate(tiny_pipelines[then], CONFIG), tiny_pipelines[then])
    assert torch.equal(_images(fast, tiny_pipelines[then]), expected)


def test_a_pipeline_catrt_cannot_run_is_refused_when_set_and_the_old_one_keeps_running(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, CONFIG)
    with pytest.raises(UnsupportedModelError, match="catrt cannot accelerate object") as caught:
        fast.pipe = object()
    assert caught.value.field == "pipe"
    assert fast.pipe is pipe
    assert torch.equal(_images(fast, pipe), _images(catrt.accelerate(pipe, CONFIG), pipe))


def test_one_set_of_step_buffers_serves_pipelines_of_transformers_with_other_cache_layouts(tiny_pipelines: dict[str, Any]) -> None:
    """A `RuntimeBuffers` given to two accelerated pipelines kept one state per latent and text shape, whatever the
    transformer: SD3.5's dual-attention blocks (more K/V slots) then ran on SD3's cache, an IndexError deep in a block."""
    shared = RuntimeBuffers()
    pipes = [tiny_pipelines[name] for name in ("tiny-sd3", "tiny-sd3.5", "tiny-sd3")]
    expected = [_images(catrt.accelerate(pipe, CONFIG), pipe) for pipe in pipes]
    for pipe, images in zip(pipes, expected):
        fast = catrt.accelerate(pipe, CONFIG)
        fast.buffers = shared
        assert torch.equal(_images(fast, pipe), images)
    assert len(shared) == 2


@pytest.mark.parametrize("rule", ["cat", *sorted(BASELINE_RULES)])
def test_a_seed_gives_one_image_at_every_batch_position_as_in_the_plain_pipeline(rule: str, tiny_pipelines: dict[str, Any]) -> None:
    """The random rule drew its tokens per batch row, so one prompt and seed made another image at row 1 than at row 0
    (0.17 apart), where the plain pipeline makes the same image at both."""
    pipe = tiny_pipelines["tiny-sd3"]

    def twice(runner: Any) -> torch.Tensor:
        kwargs = call_kwargs(pipe, num_inference_steps=6, prompt=["a red circle"] * 2)
        kwargs["generator"] = [torch.Generator().manual_seed(3) for _ in range(2)]
        return runner(**kwargs).images

    plain = twice(pipe)
    assert torch.equal(plain[0], plain[1])
    images = twice(catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=3, rule=rule)))
    assert torch.equal(images[0], images[1])


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_a_plain_pipeline_run_from_a_callback_runs_unpruned_and_leaves_the_generation_as_it_was(
    name: str, tiny_pipelines: dict[str, Any]
) -> None:
    """A callback running a plain pipeline that shares the transformer (a preview, say) had its transformer calls taken,
    on this thread, as the accelerated generation's next steps: its latents went into the caches and the step count ran
    over ("called the transformer 9 times for 8 steps")."""
    pipe = tiny_pipelines[name]
    preview = type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))  # the transformer shared
    previews: list[torch.Tensor] = []

    def run_a_preview(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if step == 4:
            previews.append(_images(preview, pipe, num_inference_steps=2))
        return {}

    expected = _images(catrt.accelerate(pipe, CONFIG), pipe, num_inference_steps=8)
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=3, trace=True))
    assert torch.equal(_images(fast, pipe, num_inference_steps=8, callback_on_step_end=run_a_preview), expected)
    assert len(fast.last_trace) == 8
    assert torch.equal(previews[0], _images(pipe, pipe, num_inference_steps=2))


@pytest.mark.parametrize("where", ["transformer", "global"])
def test_a_hook_registered_mid_generation_leaves_every_step_pruned(where: str, tiny_pipelines: dict[str, Any]) -> None:
    """A forward hook put on the transformer (or on every module, as a monitoring tool on another thread may) after
    the first step puts nn.Module's hook frame between the pipeline and the forward: the later steps were taken as
    calls deeper than the pipeline's and ran the transformer's own forward, unpruned (3 of 6 steps run by catrt)."""
    pipe = tiny_pipelines["tiny-sd3"]
    handles: list[Any] = []

    def add_a_hook(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if step == 2:
            hook = lambda module, args, output: None  # noqa: E731 - changes nothing
            register = pipe.transformer.register_forward_hook if where == "transformer" else torch.nn.modules.module.register_module_forward_hook
            handles.append(register(hook))
        return {}

    expected = _images(catrt.accelerate(pipe, CONFIG), pipe)
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=3, trace=True))
    try:
        images = _images(fast, pipe, callback_on_step_end=add_a_hook)
    finally:
        for handle in handles:
            handle.remove()
    assert [record.step for record in fast.last_trace] == [1, 2, 3, 4, 5, 6]
    assert torch.equal(images, expected)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("buffers", 5, "buffers must be a catrt.runtime.RuntimeBuffers, got int"),
        ("buffers", None, "buffers must be a catrt.runtime.RuntimeBuffers, got NoneType"),
        ("functions", "compile", "functions must be step functions .* str has no prepare_context"),
        ("cuda_graphs", "yes", "cuda_graphs must be True, False or None, got 'yes'"),
    ],
)
def test_a_runtime_setting_of_the_wrong_kind_is_refused_when_set_and_the_calls_run_as_before(
    name: str, value: Any, message: str, tiny_pipelines: dict[str, Any]
) -> None:
    """`accelerate` checks these; set on the accelerated pipeline afterwards they were kept unchecked until a call
    failed deep in a step (`'int' object has no attribute 'state'`), or, for `buffers = None`, ran every later call on
    newly allocated buffers."""
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, CONFIG)
    expected = _images(fast, pipe)
    with pytest.raises(ConfigError, match=message) as caught:
        setattr(fast, name, value)
    assert caught.value.field == name
    assert torch.equal(_images(fast, pipe), expected)
    assert len(fast.buffers) == 1


class _Stop(Exception):
    pass


def _failing_at(step: int) -> Any:
    def callback(pipeline: Any, index: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if index == step:
            raise _Stop
        return {}

    return callback


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd3.5", "tiny-pixart", "tiny-flux"])
def test_a_call_after_calls_of_every_other_kind_equals_it_on_a_fresh_pipeline(name: str, tiny_pipelines: dict[str, Any]) -> None:
    """What the runtime keeps per shape (caches, reference, staleness, clusters, indices) is rewritten by each call
    before it is read: calls of another size (FLUX's transposed one has the same latents' shape), batch, guidance,
    step count, alpha, t0 and step reuse, and calls that failed or were interrupted part-way, change no later call."""
    pipe = tiny_pipelines[name]
    callbacks = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
    expected = _images(catrt.accelerate(pipe, CONFIG), pipe)
    fast = catrt.accelerate(pipe, CONFIG)
    before: list[dict[str, Any]] = [
        {"height": 96, "width": 64}, {"guidance_scale": 1.0}, {"prompt": "one"}, {"num_images_per_prompt": 2},
        {"num_inference_steps": 9}, {"alpha": 0.7}, {"seed": 5, "negative_prompt": ["dark", "blurry"]},
    ]
    if callbacks:
        before += [{"callback_on_step_end": _failing_at(4)}, {"callback_on_step_end": _failing_at(1), "alpha": 0.5}]
    for overrides in before:
        with contextlib.suppress(_Stop):
            _images(fast, pipe, **overrides)
    fast.config = CATConfig(alpha=0.3, t0=4, reuse_every=2)
    _images(fast, pipe)
    fast.config = CONFIG
    assert torch.equal(_images(fast, pipe), expected)


def test_pipelines_of_two_transformers_sharing_step_buffers_run_at_once_on_states_of_their_own(
    tiny_pipelines: dict[str, Any]
) -> None:
    """Two transformers of one architecture (a fine-tune beside its base) given one RuntimeBuffers found one state for
    their shapes; their calls are not serialized (each transformer has its own lock), so a call on one thread wrote
    the caches another thread's generation was part-way through: a wrong image, no error."""
    pipe = tiny_pipelines["tiny-sd3"]
    tuned = type(pipe).from_pipe(pipe, transformer=copy.deepcopy(pipe.transformer), scheduler=copy.deepcopy(pipe.scheduler))
    with torch.no_grad():
        for weight in tuned.transformer.parameters():
            weight.mul_(1.01)
    expected = _images(catrt.accelerate(pipe, CONFIG), pipe, num_inference_steps=8)
    shared = RuntimeBuffers()
    fast, other = catrt.accelerate(pipe, CONFIG), catrt.accelerate(tuned, CONFIG)
    fast.buffers = other.buffers = shared
    paused, other_ran = threading.Event(), threading.Event()

    def wait_for_the_other(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if step == 4:  # part-way, pruning: the other generation runs entirely now
            paused.set()
            assert other_ran.wait(timeout=600)  # a bound for a hang only
        return {}

    result: list[torch.Tensor] = []

    def generate() -> None:
        try:
            result.append(_images(fast, pipe, num_inference_steps=8, callback_on_step_end=wait_for_the_other))
        finally:
            paused.set()  # a generation that failed before step 4 does not leave the other waiting

    thread = threading.Thread(target=generate)
    thread.start()
    try:
        assert paused.wait(timeout=600)  # not before: a thread slow to start ran after the other, never across it
        _images(other, tuned, num_inference_steps=8)
    finally:
        other_ran.set()
        thread.join()
    assert torch.equal(result[0], expected)
