"""Step-level reuse (`CATConfig.reuse_every`): the plan, a reused step runs no transformer and returns the
previous prediction, it combines with every token rule and with refresh steps, its MAC and FLOP counts,
and engine builds that carry it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import catrt
from catrt import CATConfig, ConfigError
from catrt.build import build_engines
from catrt.build_config import BuildConfig
from catrt.macs import model_macs
from catrt.models import make_adapter
from catrt.models.base import Adapter, Context
from catrt.scheduler import plan, step_kind
from tests.conftest import call_kwargs

KIND_LETTERS = {"full": "f", "pruned": "p", "reused": "r"}


def _letters(kinds: list[str]) -> str:
    return "".join(KIND_LETTERS[kind] for kind in kinds)


# -- the plan ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "t0", "refresh_every", "reuse_every", "expected"),
    [
        (12, 4, 0, 0, "ffff" + "pppppppp"),
        (12, 4, 0, 2, "ffff" + "prprprpr"),
        (12, 4, 0, 3, "ffff" + "pprpprpp"),
        (12, 4, 3, 2, "ffff" + "prfrpfpr"),  # step 10 (t0 + 6) is both: the refresh wins
        (12, 4, 2, 2, "ffff" + "pfpfpfpf"),  # equal periods: every such step refreshes, none is reused
        (12, 4, 2, 3, "ffff" + "pfrfpfpf"),
        (10, 4, 0, 1, "ffff" + "rrrrrr"),  # 1: every step after t0 reuses step t0's prediction
        (10, 4, 3, 1, "ffff" + "rrfrrf"),
        (9, 8, 0, 2, "ffffffff" + "p"),  # the first reuse step would be past the end
        (28, 8, 5, 2, "f" * 8 + "prpr" + "f" + "rprp" + "f" + "prpr" + "f" + "rprp" + "f"),
    ],
)
def test_plan_kinds(steps: int, t0: int, refresh_every: int, reuse_every: int, expected: str) -> None:
    kinds = plan(steps, t0, refresh_every, reuse_every)
    assert _letters(kinds) == expected
    assert kinds == [step_kind(step, t0, refresh_every, reuse_every) for step in range(1, steps + 1)]


def test_plan_without_reuse_is_unchanged() -> None:
    assert plan(12, 4, 3) == plan(12, 4, 3, 0)
    assert "reused" not in plan(50, 8, 5)


@pytest.mark.parametrize(("value", "message"), [(-1, r"reuse_every must be an integer >= 0 \(0 = off\), got -1"),
                                                (1.5, r"reuse_every must be an integer >= 0"),
                                                (True, r"reuse_every must be an integer >= 0")])
def test_a_bad_reuse_every_names_the_field(value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        CATConfig(reuse_every=value)
    assert caught.value.field == "reuse_every"
    assert CATConfig().reuse_every == 0
    assert CATConfig.from_dict(CATConfig(reuse_every=3).to_dict()).reuse_every == 3


# -- the runtime -------------------------------------------------------------------------------


class CountingSteps:
    """The adapter's step functions, counting the calls of each."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.calls = {"prepare_context": 0, "full_forward": 0, "pruned_forward": 0}

    def prepare_context(self, inputs: Context, latent_shape: tuple[int, ...]) -> Context:
        self.calls["prepare_context"] += 1
        return self.adapter.prepare_context(inputs, latent_shape)

    def full_forward(self, *args: Any) -> torch.Tensor:
        self.calls["full_forward"] += 1
        return self.adapter.full_forward(*args)

    def pruned_forward(self, *args: Any) -> torch.Tensor:
        self.calls["pruned_forward"] += 1
        return self.adapter.pruned_forward(*args)


def _snapshots(fast: Any, steps: CountingSteps) -> tuple[list[dict[str, Any]], Any]:
    """A forward hook on the pipeline's transformer: after each step, its output and the runtime's state."""
    seen: list[dict[str, Any]] = []

    def hook(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        state = next(iter(fast.buffers._states.values()))
        seen.append({
            "prediction": output[0].clone(),
            "calls": dict(steps.calls),
            **{name: getattr(state, name).clone() for name in ("staleness", "last_computed", "kv_cache", "output_cache")},
            "indices": next(iter(state.selected.values())).clone(),  # one alpha: one k
        })

    return seen, fast.pipe.transformer.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-pixart", "tiny-flux"])
def test_a_reused_step_returns_the_previous_prediction_and_runs_no_transformer(name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    counting = CountingSteps(make_adapter(pipe.transformer))
    config = CATConfig(alpha=0.3, t0=4, reuse_every=2, trace=True)
    fast = catrt.accelerate(pipe, config, functions=counting)
    seen, handle = _snapshots(fast, counting)
    try:
        fast(**call_kwargs(pipe))
    finally:
        handle.remove()
    kinds = plan(12, 4, 0, 2)
    assert [r.kind for r in fast.last_trace] == kinds
    assert counting.calls == {"prepare_context": 1, "full_forward": 4, "pruned_forward": 4}
    for step in range(2, 13):
        now, before = seen[step - 1], seen[step - 2]
        ran = {call: now["calls"][call] - before["calls"][call] for call in ("full_forward", "pruned_forward")}
        record = fast.last_trace[step - 1]
        if record.kind == "reused":
            assert ran == {"full_forward": 0, "pruned_forward": 0}
            assert record.indices is None
            # Exactly the last prediction, and nothing the next pruned step reads has changed.
            for tensor in ("prediction", "staleness", "last_computed", "kv_cache", "output_cache", "indices"):
                assert torch.equal(now[tensor], before[tensor]), (step, tensor)
        else:
            assert ran == {"full_forward": int(record.kind == "full"), "pruned_forward": int(record.kind == "pruned")}
            assert not torch.equal(now["prediction"], before["prediction"])
        if record.kind == "pruned" and kinds[step - 2] == "reused":
            # The tokens a pruned step after a reused one computes were selected after the last computed step.
            assert torch.equal(record.indices, seen[step - 3]["indices"])
            assert int(now["last_computed"].max()) == step


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-pixart", "tiny-flux"])
def test_alpha_one_with_reuse_equals_the_plain_pipeline_reusing_the_same_steps(name: str, tiny_pipelines: dict[str, Any]) -> None:
    """Reuse is exactly 'return the previous transformer output': the plain pipeline with a transformer
    wrapped to do that on the planned steps gives the same latents as catrt at alpha = 1."""
    pipe = tiny_pipelines[name]
    kinds = plan(12, 3, 0, 2)
    original = pipe.transformer.forward
    outputs: list[torch.Tensor] = []

    def reusing_forward(*args: Any, **kwargs: Any) -> Any:
        if kinds[len(outputs)] == "reused":
            outputs.append(outputs[-1])
        else:
            outputs.append(original(*args, **kwargs)[0])
        return (outputs[-1],)

    pipe.transformer.forward = reusing_forward
    try:
        expected = pipe(**call_kwargs(pipe)).images
    finally:
        del pipe.transformer.forward
    assert len(outputs) == 12
    got = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3, reuse_every=2))(**call_kwargs(pipe)).images
    error = float((got - expected).abs().max() / expected.abs().max())
    assert error < 1e-4
    plain = pipe(**call_kwargs(pipe)).images
    assert float((got - plain).abs().max() / plain.abs().max()) > 1e-3  # reuse really changed the result


@pytest.mark.parametrize("rule", ["cat", "round_robin", "random", "magnitude", "sequential", "attention"])
def test_reuse_combines_with_every_rule_and_refresh(rule: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3.5"]
    config = CATConfig(alpha=0.3, t0=4, rule=rule, reuse_every=3, refresh_every=4, trace=True)
    fast = catrt.accelerate(pipe, config)
    images = fast(**call_kwargs(pipe, output_type="pt")).images
    assert images.shape == (2, 3, 64, 96) and torch.isfinite(images).all()
    assert _letters([r.kind for r in fast.last_trace]) == "ffff" + "pprfprpf"
    for record in fast.last_trace:
        if record.kind == "pruned":
            assert record.indices.shape == (2, 8)
            assert all(len(set(row.tolist())) == 8 for row in record.indices)
        else:
            assert record.indices is None


@pytest.mark.parametrize("rule", ["cat", "round_robin"])
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-pixart"])
def test_reuse_with_cat_and_round_robin_gives_finite_images(rule: str, name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=4, rule=rule, reuse_every=2, trace=True))
    images = fast(**call_kwargs(pipe, output_type="pt")).images
    assert torch.isfinite(images).all()
    assert [r.kind for r in fast.last_trace] == plan(12, 4, 0, 2)
    if rule == "round_robin":  # the stalest sweep goes on over computed steps only: 4 pruned steps of 8 over 24 tokens
        pruned = [r.indices[0].tolist() for r in fast.last_trace if r.kind == "pruned"]
        assert pruned[:3] == [list(range(8)), list(range(8, 16)), list(range(16, 24))]


# -- MACs and FLOPs ----------------------------------------------------------------------------


def test_sd3_mac_ratio_drops_by_the_reused_pruned_steps() -> None:
    without = model_macs("sd3", 1024, 1024, CATConfig(alpha=0.3, t0=8), 28)
    reused = model_macs("sd3", 1024, 1024, CATConfig(alpha=0.3, t0=8, reuse_every=2), 28)
    assert (without.full_steps, without.pruned_steps, without.reused_steps) == (8, 20, 0)
    assert (reused.full_steps, reused.pruned_steps, reused.reused_steps) == (8, 10, 10)
    assert (reused.full_step, reused.pruned_step, reused.context) == (without.full_step, without.pruned_step, without.context)
    predicted = without.schedule_ratio - 10 * without.pruned_step / (28 * without.full_step)
    assert reused.schedule_ratio == pytest.approx(predicted, rel=1e-9)
    assert reused.schedule_ratio < without.schedule_ratio
    assert reused.schedule_ratio == pytest.approx(0.411, abs=0.003)  # 0.537 - 10 x 0.352 / 28


def test_mac_report_counts_the_plans_steps() -> None:
    report = model_macs("reference", 32, 32, CATConfig(alpha=0.3, t0=8, reuse_every=2, refresh_every=5), 28)
    assert (report.full_steps, report.pruned_steps, report.reused_steps) == (12, 8, 8)  # the 28-step plan above
    assert report.schedule_macs == report.context + 12 * report.full_step + 8 * report.pruned_step
    assert report.schedule_ratio == pytest.approx(report.schedule_macs / (28 * report.full_step))


def _transformer_flops(runner: Any, kwargs: dict[str, Any]) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        runner(**kwargs)
    return sum(counter.get_flop_counts()["SD3Transformer2DModel"].values())


def test_flops_of_the_real_call_follow_the_plan(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    steps, t0 = 10, 4
    settings = dict(num_inference_steps=steps, height=256, width=256, prompt="a cat", max_sequence_length=8)
    plain = _transformer_flops(pipe, call_kwargs(pipe, **settings))
    pruned_only = _transformer_flops(catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=t0)), call_kwargs(pipe, **settings))
    reused = _transformer_flops(catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=t0, reuse_every=2)), call_kwargs(pipe, **settings))
    full_step = plain / steps
    pruned_step = (pruned_only - t0 * full_step) / (steps - t0)  # the pruned forward and its selection
    kinds = plan(steps, t0, 0, 2)
    assert kinds.count("reused") == 3
    predicted = kinds.count("full") * full_step + kinds.count("pruned") * pruned_step
    assert reused == pytest.approx(predicted, rel=0.02)
    assert reused < pruned_only


# -- engine builds -----------------------------------------------------------------------------


def test_build_config_carries_reuse_every() -> None:
    plain = BuildConfig("tiny-sd3", height=64, width=96, steps=12, t0=4)
    reusing = BuildConfig("tiny-sd3", height=64, width=96, steps=12, t0=4, reuse_every=2)
    assert plain.reuse_every == 0 and "-r" not in plain.build_name().split("-a0.30")[1]
    assert reusing.build_name().startswith("tiny-sd3-96x64-b1-s12-t4-a0.30-r2-")
    assert reusing.cat_config().reuse_every == 2 and plain.cat_config().reuse_every == 0
    assert reusing.cat_config(rule="round_robin", reuse_every=2).rule == "round_robin"  # the build's own value is fine
    with pytest.raises(ConfigError, match=r"built for reuse_every=2, the config asks for reuse_every=0") as caught:
        reusing.cat_config(reuse_every=0)
    assert caught.value.field == "reuse_every"
    with pytest.raises(ConfigError, match="reuse_every must be an integer >= 0") as caught:
        BuildConfig("tiny-sd3", reuse_every=-2)
    assert caught.value.field == "reuse_every"
    assert BuildConfig.from_dict(reusing.to_dict()) == reusing
    old = reusing.to_dict()
    del old["reuse_every"]  # a manifest written before reuse_every existed
    assert BuildConfig.from_dict(old).reuse_every == 0


@pytest.fixture(scope="module")
def reusing_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reuse-bundle")
    build = BuildConfig("reference", height=32, width=32, batch=1, steps=6, t0=2, reuse_every=2, backend="eager")
    return build_engines(build, out_dir=folder / "engines", export_dir=folder / "export", progress=False)


def test_a_bundle_runs_its_builds_reuse_schedule(reusing_bundle: Path) -> None:
    assert reusing_bundle.name.startswith("reference-32x32-b1-s6-t2-a0.30-r2-")
    fast = catrt.load(reusing_bundle)
    assert fast.accelerated.config.reuse_every == 2
    traced = catrt.load(reusing_bundle, config=CATConfig(alpha=0.3, t0=2, reuse_every=2, trace=True))
    images = traced("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(images).all()
    assert _letters([r.kind for r in traced.last_trace]) == "ff" + "prpr"


def test_inspect_shows_a_bundles_reuse_schedule(reusing_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """catrt inspect printed t0 but not reuse_every, the other half of the schedule a bundle runs."""
    from catrt.cli import main

    assert main(["inspect", str(reusing_bundle)]) == 0
    assert "  build:     32x32, batch 1, 6 steps, t0 2, reuse_every 2, N = 256 image tokens, fp32, eager" in capsys.readouterr().out


def test_a_bundle_refuses_another_reuse_every(reusing_bundle: Path) -> None:
    with pytest.raises(ConfigError, match="reuse_every") as caught:
        catrt.load(reusing_bundle, config=CATConfig(alpha=0.3, t0=2, reuse_every=0))
    assert caught.value.field == "reuse_every"
