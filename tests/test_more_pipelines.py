"""img2img, inpainting and PixArt-Alpha pipelines over the transformers catrt prunes: exactness at alpha = 1, the
schedule over the steps `strength` leaves, the token grid of the size actually run, and strength refused by name."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy
import PIL.Image
import pytest
import torch
from diffusers import (
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
)

import catrt
from catrt import CATConfig, ConfigError, UnsupportedModelError
from catrt.cli import main
from catrt.models.pixart import _default_fixes
from catrt.pipeline_spec import PipelineSpec, strength_steps
from tests.conftest import call_kwargs

#: An image of another size than the calls ask for (80x48 against 96x64): diffusers resizes it to the size run.
IMAGE = PIL.Image.new("RGB", (80, 48), (200, 30, 30))
MASK = PIL.Image.new("L", (80, 48), 0)
MASK.paste(255, (0, 0, 40, 48))  # the left half is repainted

FROM_IMAGE: dict[str, tuple[str, type, dict[str, Any]]] = {
    "sd3-img2img": ("tiny-sd3", StableDiffusion3Img2ImgPipeline, {"image": IMAGE}),
    "sd3-inpaint": ("tiny-sd3", StableDiffusion3InpaintPipeline, {"image": IMAGE, "mask_image": MASK}),
    "flux-img2img": ("tiny-flux", FluxImg2ImgPipeline, {"image": IMAGE}),
    "flux-inpaint": ("tiny-flux", FluxInpaintPipeline, {"image": IMAGE, "mask_image": MASK}),
}


@pytest.fixture(scope="module")
def pipes(tiny_pipelines: dict[str, Any]) -> Callable[[str], Any]:
    """The pipeline class of a FROM_IMAGE entry (or "pixart-alpha") built from a tiny model's components."""
    made: dict[str, Any] = {}

    def make(key: str) -> Any:
        if key not in made:
            name, cls, _ = FROM_IMAGE[key] if key in FROM_IMAGE else ("tiny-pixart", PixArtAlphaPipeline, {})
            made[key] = cls(**tiny_pipelines[name].components)
            made[key].set_progress_bar_config(disable=True)
        return made[key]

    return make


def _kwargs(key: str, pipe: Any, **overrides: Any) -> dict[str, Any]:
    return call_kwargs(pipe, **{**FROM_IMAGE[key][2], "strength": 0.7, **overrides})


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))


def _count_calls(transformer: torch.nn.Module) -> tuple[list[int], Any]:
    calls: list[int] = []
    return calls, transformer.register_forward_pre_hook(lambda module, args: calls.append(1))


@pytest.mark.parametrize("key", sorted(FROM_IMAGE))
@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_alpha_one_reproduces_the_plain_image_pipeline(key: str, guidance_scale: float, pipes: Callable[[str], Any]) -> None:
    pipe = pipes(key)
    expected = pipe(**_kwargs(key, pipe, guidance_scale=guidance_scale)).images
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3, trace=True))
    got = fast(**_kwargs(key, pipe, guidance_scale=guidance_scale)).images
    assert got.shape == expected.shape
    assert _relative_error(got, expected) < 1e-4
    assert "".join(r.kind[0] for r in fast.last_trace) == "fff" + "p" * 6  # 12 steps at strength 0.7 run 9


@pytest.mark.parametrize("key", sorted(FROM_IMAGE))
def test_pruned_image_pipelines_run_t0_full_steps_of_the_steps_run_then_pruned(key: str, pipes: Callable[[str], Any]) -> None:
    pipe = pipes(key)
    calls, hook = _count_calls(pipe.transformer)
    try:
        fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=4, trace=True))
        result = fast(**_kwargs(key, pipe, strength=0.5)).images
    finally:
        hook.remove()
    assert torch.isfinite(result).all()
    assert len(calls) == 6  # diffusers: int(12 * 0.5) steps
    assert [r.step for r in fast.last_trace] == list(range(1, 7))
    assert [r.kind for r in fast.last_trace] == ["full"] * 4 + ["pruned"] * 2
    k = math.ceil(0.3 * 24)  # the 96x64 asked for: 24 tokens (SD3: 2x2 patches, FLUX: packed 2x2 latent cells)
    assert [tuple(r.indices.shape) for r in fast.last_trace[4:]] == [(2, k)] * 2  # one row per image


def test_the_refresh_schedule_counts_the_steps_run(pipes: Callable[[str], Any]) -> None:
    pipe = pipes("sd3-img2img")
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=3, refresh_every=2, trace=True))
    fast(**_kwargs("sd3-img2img", pipe, num_inference_steps=20, strength=0.4))
    assert "".join(r.kind[0] for r in fast.last_trace) == "fff" + "pf" * 2 + "p"


def test_steps_run_follow_diffusers_get_timesteps(pipes: Callable[[str], Any]) -> None:
    """diffusers skips int(steps - steps * strength) steps: 12 steps at strength 0.3 run 12 - int(8.4) = 4, not
    int(12 * 0.3) = 3, and t0 counts those 4."""
    pipe = pipes("flux-img2img")
    calls, hook = _count_calls(pipe.transformer)
    try:
        fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=3, trace=True))
        fast(**_kwargs("flux-img2img", pipe, strength=0.3))
    finally:
        hook.remove()
    assert len(calls) == 4 == strength_steps({"strength": 0.3}, 12)
    assert "".join(r.kind[0] for r in fast.last_trace) == "fffp"


@pytest.mark.parametrize("key", ["sd3-img2img", "flux-inpaint"])
def test_a_strength_leaving_t0_steps_or_fewer_is_refused_before_any_step(key: str, pipes: Callable[[str], Any]) -> None:
    pipe = pipes(key)
    calls, hook = _count_calls(pipe.transformer)
    try:
        fast = catrt.accelerate(pipe, CATConfig(t0=8))
        with pytest.raises(ConfigError, match=r"^strength=0.6 runs 8 of the 12 steps, and CATConfig.t0 = 8 needs t0 < the "
                                              r"steps run; raise strength or num_inference_steps, or lower t0$") as caught:
            fast(**_kwargs(key, pipe, strength=0.6))
    finally:
        hook.remove()
    assert caught.value.field == "strength" and calls == []


@pytest.mark.parametrize("strength", [torch.tensor(0.3), numpy.float32(0.3), numpy.array(0.3)], ids=["tensor", "np-float32", "np-0d"])
def test_a_0d_tensor_or_numpy_strength_is_a_number_as_diffusers_takes_it(strength: Any, pipes: Callable[[str], Any]) -> None:
    """diffusers computes with a 0-d tensor or numpy strength as with a float; catrt counts the same steps run."""
    pipe = pipes("flux-img2img")
    calls, hook = _count_calls(pipe.transformer)
    try:
        fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=3, trace=True))
        fast(**_kwargs("flux-img2img", pipe, strength=strength))
    finally:
        hook.remove()
    assert len(calls) == 4 == strength_steps({"strength": strength}, 12)
    assert "".join(r.kind[0] for r in fast.last_trace) == "fffp"


@pytest.mark.parametrize("strength", [torch.tensor([0.5, 0.5]), numpy.array([0.5]), torch.tensor(True), torch.tensor(1.5), numpy.bool_(True)],
                         ids=["tensor-2", "np-1d", "tensor-bool", "tensor-1.5", "np-bool"])
def test_a_strength_tensor_that_is_not_one_real_from_0_to_1_is_refused_by_name(strength: Any) -> None:
    with pytest.raises(ConfigError, match=r"^strength must be a number from 0 to 1, got ") as caught:
        strength_steps({"strength": strength}, 12)
    assert caught.value.field == "strength"


@pytest.mark.parametrize("strength", [1.5, -0.1, "0.5", None, True])
def test_a_strength_that_is_not_a_number_from_0_to_1_is_refused_by_name(strength: Any, pipes: Callable[[str], Any]) -> None:
    pipe = pipes("sd3-img2img")
    fast = catrt.accelerate(pipe, CATConfig(t0=3))
    with pytest.raises(ConfigError, match=r"^strength must be a number from 0 to 1, got ") as caught:
        fast(**_kwargs("sd3-img2img", pipe, strength=strength))
    assert caught.value.field == "strength"


def test_flux_img2img_without_a_size_runs_the_default_size_not_the_images(pipes: Callable[[str], Any]) -> None:
    pipe = pipes("flux-img2img")
    default, pipe.default_sample_size = pipe.default_sample_size, 6  # a small default (tiny-flux's 128 cells are slow): 48 pixels, 3x3 tokens
    try:
        fast = catrt.accelerate(pipe, CATConfig(alpha=0.5, t0=3, trace=True))
        latents = fast(**_kwargs("flux-img2img", pipe, height=None, width=None)).images  # diffusers: height or default
    finally:
        pipe.default_sample_size = default
    tokens = 9
    assert latents.shape[1] == tokens
    assert fast.last_trace[-1].indices.shape == (2, math.ceil(0.5 * tokens))


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_pixart_alpha_at_alpha_one_is_the_plain_pipeline_with_its_120_token_default(
    guidance_scale: float, pipes: Callable[[str], Any]
) -> None:
    pipe = pipes("pixart-alpha")
    texts: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: texts.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        kwargs = lambda: {k: v for k, v in call_kwargs(pipe, guidance_scale=guidance_scale).items() if k != "max_sequence_length"}  # noqa: E731
        expected = pipe(**kwargs()).images
        fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3, trace=True))
        got = fast(**kwargs()).images
    finally:
        hook.remove()
    assert set(texts) == {120}
    assert _relative_error(got, expected) < 1e-4
    assert "".join(r.kind[0] for r in fast.last_trace) == "fff" + "p" * 9


def test_pixart_alpha_pruned_runs_without_binning_where_its_transformer_has_no_bin_table(pipes: Callable[[str], Any]) -> None:
    pipe = PixArtAlphaPipeline(**pipes("pixart-alpha").components)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = catrt.load_pipeline("tiny-pixart").transformer  # its own copy: the fixture's is shared
    pipe.transformer.register_to_config(sample_size=16)  # 128 pixels: no table
    arguments = {"prompt": "a red circle", "num_inference_steps": 6, "height": 64, "width": 96, "output_type": "latent",
                 "max_sequence_length": 16, "clean_caption": False}
    with pytest.raises(ValueError, match="Invalid sample size"):  # diffusers' own default, on tiny-pixart's transformer
        pipe(**arguments)
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=3, trace=True))
    latents = fast(**arguments).images
    assert latents.shape[-2:] == (8, 12) and torch.isfinite(latents).all()
    assert [r.kind for r in fast.last_trace] == ["full"] * 3 + ["pruned"] * 3


def test_pixart_alpha_bins_only_the_sizes_its_own_tables_have(pipes: Callable[[str], Any]) -> None:
    """PixArt-Alpha has no 2048 table (sample size 256), which Sigma has: there binning is turned off for Alpha only."""
    for sample_size, alpha_fix, sigma_fix in ((256, {"use_resolution_binning": False}, {}), (128, {}, {})):
        transformer = SimpleNamespace(config=SimpleNamespace(sample_size=sample_size))
        for cls, fix in ((PixArtAlphaPipeline, alpha_fix), (PixArtSigmaPipeline, sigma_fix)):
            pipe = cls.__new__(cls)  # only its class and transformer are read
            object.__setattr__(pipe, "transformer", transformer)
            assert _default_fixes(pipe) == fix


def test_a_pipeline_spec_strength_argument_must_be_a_name() -> None:
    with pytest.raises(ConfigError, match="strength_argument"):
        PipelineSpec(call_defaults={}, strength_argument=3)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def img2img_folder(pipes: Callable[[str], Any], tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("sd3-img2img")
    pipes("sd3-img2img").save_pretrained(folder)
    return str(folder)


IMAGE_PIPELINE_REFUSED = (r"StableDiffusion3Img2ImgPipeline generates from an image \(its 'strength' argument\), and catrt's CLI, "
                          r"server and build run text-to-image pipelines only; accelerate it from Python with catrt.accelerate\(pipe\)")


@pytest.mark.parametrize("full", [False, True])
def test_the_cli_refuses_an_image_pipeline_folder_by_name(
    full: bool, img2img_folder: str, capfd: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    """A saved img2img folder is accepted by `accelerate` now; the CLI, which has no image to give, refuses it by name
    where diffusers failed on the missing image with a traceback."""
    argv = ["generate", "--model", img2img_folder, "--prompt", "a cat", "--steps", "6", "--height", "32",
            "--width", "32", "--out", str(tmp_path / "out.png")] + (["--full"] if full else ["--t0", "2"])
    assert main(argv) == 2
    err = capfd.readouterr().err
    lines = err.strip().splitlines()  # above it: diffusers' loading bars for a folder
    assert "Traceback" not in err
    assert re.search(f"^catrt generate: error: {re.escape(img2img_folder)}: {IMAGE_PIPELINE_REFUSED}", lines[-1])


def test_the_server_refuses_an_image_pipeline_folder_by_name(img2img_folder: str) -> None:
    from catrt.serve.config import ServeConfig
    from catrt.serve.model import load_served_model

    with pytest.raises(UnsupportedModelError, match=IMAGE_PIPELINE_REFUSED) as caught:
        load_served_model(ServeConfig(model=img2img_folder, height=32, width=32, steps=4, cat=CATConfig(t0=2)))
    assert caught.value.field == "model"


def test_a_build_refuses_an_image_pipeline_folder_by_name(img2img_folder: str, tmp_path: Any) -> None:
    from catrt.build import build_engines
    from catrt.build_config import BuildConfig

    config = BuildConfig(img2img_folder, height=32, width=32, batch=1, steps=4, t0=2, backend="eager")
    with pytest.raises(UnsupportedModelError, match=IMAGE_PIPELINE_REFUSED):
        build_engines(config, out_dir=tmp_path / "engines", export_dir=tmp_path / "export", progress=False)
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


def test_an_sd3_inpainting_transformer_of_33_input_channels_at_alpha_one_is_the_plain_pipeline(
    tiny_pipelines: dict[str, Any]
) -> None:
    """A dedicated inpainting transformer reads the mask and masked image as 17 more input channels (16 out):
    one call per step all the same, with wider input patches."""
    components = tiny_pipelines["tiny-sd3"].components
    torch.manual_seed(0)
    config = {**components["transformer"].config, "in_channels": 33, "out_channels": 16}
    transformer = type(components["transformer"]).from_config(config).eval()
    pipe = StableDiffusion3InpaintPipeline(**{**components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(**_kwargs("sd3-inpaint", pipe)).images
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3, trace=True))
    got = fast(**_kwargs("sd3-inpaint", pipe)).images
    assert _relative_error(got, expected) < 1e-4
    assert "".join(r.kind[0] for r in fast.last_trace) == "fff" + "p" * 6
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=3))
    assert torch.isfinite(fast(**_kwargs("sd3-inpaint", pipe)).images).all()
