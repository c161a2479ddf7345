"""A transformer whose channels do not fit the latents its pipeline class makes (from the VAE's latent_channels and the
class's own rule, `PipelineSpec.latent_channels`): diffusers builds the pipeline and failed in the scheduler at the first
step or in the VAE decode after every step; catrt refuses it at `accelerate` (and each call, and `catrt build`) naming
the config key. Combinations diffusers runs are taken."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)

import catrt
from catrt import CATConfig, ConfigError
from catrt.models import PIPELINES
from catrt.pipeline import register_pipeline
from tests.test_bad_configs import CLI_COMMANDS, cli_refusal

#: (tiny model, pipeline class, transformer config changes, VAE latent_channels (None: the model's), key, message).
REFUSED = [
    ("tiny-sd3", StableDiffusion3Pipeline, {"in_channels": 8, "out_channels": 8}, None, "in_channels",
     r"^SD3Transformer2DModel config in_channels 8 does not fit the VAE's latent_channels 16: StableDiffusion3Pipeline "
     r"makes latents of in_channels = 8 channels, which the VAE's decode fails on after every step has run; set "
     r"in_channels \(and out_channels\) to 16 in the transformer's config.json, or use a VAE of latent_channels 8$"),
    ("tiny-flux", FluxPipeline, {"in_channels": 60, "out_channels": 60}, None, "in_channels",
     r"^FluxTransformer2DModel config in_channels 60 does not fit the VAE's latent_channels 16: FluxPipeline makes "
     r"latents of in_channels // 4 = 15 channels, .*; set in_channels \(and out_channels\) to 64 in the transformer's "
     r"config.json, or use a VAE of latent_channels 15$"),
    ("tiny-sd3", StableDiffusion3Pipeline, {"in_channels": 33, "out_channels": 16}, None, "out_channels",
     r"^SD3Transformer2DModel config out_channels 16 with in_channels 33: StableDiffusion3Pipeline makes latents of the "
     r"transformer's input channels and steps them by its prediction, which fails in the scheduler for 16 channels; set "
     r"out_channels to 33 in the transformer's config.json, or run an inpainting transformer \(in_channels = 2 \* "
     r"out_channels \+ 1\) in StableDiffusion3InpaintPipeline$"),
    ("tiny-flux", FluxPipeline, {"in_channels": 384, "out_channels": 64}, None, "out_channels",  # a FLUX Fill layout
     r"^FluxTransformer2DModel config out_channels 64 with in_channels 384: FluxPipeline .*; set out_channels to 384 "
     r"in the transformer's config.json, or run a FLUX Fill or Control transformer in its own pipeline class "
     r"\(catrt.pipeline.register_pipeline\)$"),
    ("tiny-flux", FluxPipeline, {"in_channels": 128, "out_channels": 64}, None, "out_channels",  # a FLUX Control layout
     r"out_channels 64 with in_channels 128"),
    ("tiny-flux", FluxImg2ImgPipeline, {"in_channels": 60, "out_channels": 60}, None, "in_channels",
     r"^FluxTransformer2DModel config in_channels 60 does not fit the VAE's latent_channels 16: FluxImg2ImgPipeline"),
    ("tiny-flux", FluxInpaintPipeline, {"in_channels": 384, "out_channels": 64}, None, "out_channels",
     r"out_channels 64 with in_channels 384: FluxInpaintPipeline"),
    ("tiny-sd3", StableDiffusion3Img2ImgPipeline, {"in_channels": 33, "out_channels": 16}, None, "out_channels",
     r"out_channels 16 with in_channels 33: StableDiffusion3Img2ImgPipeline"),
    ("tiny-sd3", StableDiffusion3InpaintPipeline, {"in_channels": 8, "out_channels": 8}, None, "in_channels",
     r"^SD3Transformer2DModel config in_channels 8 does not fit the VAE's latent_channels 16: "
     r"StableDiffusion3InpaintPipeline feeds the transformer 16 latent channels \(or 33 with the mask and the masked "
     r"image\); set in_channels to 16 or 33 in the transformer's config.json$"),
    ("tiny-sd3", StableDiffusion3InpaintPipeline, {"in_channels": 15, "out_channels": 7}, 15, "out_channels",
     r"^SD3Transformer2DModel config out_channels 7 does not fit the VAE's latent_channels 15: "
     r"StableDiffusion3InpaintPipeline steps latents of 15 channels by the prediction, .*; set out_channels to 15 in "
     r"the transformer's config.json$"),
    # diffusers runs SD3 inpainting transformers of in_channels 16 or 33 only, whatever the VAE: 8 and 17 fit an
    # 8-channel VAE and were taken, then refused by diffusers' ValueError at the call
    ("tiny-sd3", StableDiffusion3InpaintPipeline, {"in_channels": 8, "out_channels": 8}, 8, "in_channels",
     r"^SD3Transformer2DModel config in_channels 8 is not one StableDiffusion3InpaintPipeline runs: it takes a "
     r"transformer of in_channels 16 or 33 only \(diffusers refuses any other at the call, whatever the VAE\); set "
     r"in_channels to 16 or 33 in the transformer's config.json, and the VAE's latent_channels to fit it$"),
    ("tiny-sd3", StableDiffusion3InpaintPipeline, {"in_channels": 17, "out_channels": 8}, 8, "in_channels",
     r"^SD3Transformer2DModel config in_channels 17 is not one StableDiffusion3InpaintPipeline runs"),
    ("tiny-pixart", PixArtSigmaPipeline, {"in_channels": 8, "out_channels": 16}, None, "in_channels",
     r"^PixArtTransformer2DModel config in_channels 8 does not fit the VAE's latent_channels 4: PixArtSigmaPipeline "
     r"makes latents of in_channels = 8 channels"),
    ("tiny-pixart", PixArtAlphaPipeline, {}, 8, "in_channels", r"in_channels 4 does not fit the VAE's latent_channels 8"),
]

#: Combinations diffusers runs: taken, and the accelerated call runs.
TAKEN = [
    ("tiny-sd3", StableDiffusion3Pipeline, {"in_channels": 8, "out_channels": 8}, 8),  # an 8-channel VAE
    ("tiny-flux", FluxPipeline, {"in_channels": 60, "out_channels": 60}, 15),
    ("tiny-flux", FluxPipeline, {"in_channels": 64, "out_channels": None}, None),  # out_channels = in_channels
    ("tiny-pixart", PixArtSigmaPipeline, {"out_channels": 4}, None),  # no learned variance
    ("tiny-pixart", PixArtSigmaPipeline, {"in_channels": 8, "out_channels": 16}, 8),
    ("tiny-sd3", StableDiffusion3InpaintPipeline, {"in_channels": 33, "out_channels": 16}, None),  # inpainting layout
]

#: The tiny models as they are, in each pipeline class catrt supports for them.
TINY = [("tiny-sd3", StableDiffusion3Pipeline), ("tiny-sd3.5", StableDiffusion3Pipeline),
        ("tiny-sd3", StableDiffusion3Img2ImgPipeline), ("tiny-sd3", StableDiffusion3InpaintPipeline),
        ("tiny-pixart", PixArtSigmaPipeline), ("tiny-pixart", PixArtAlphaPipeline), ("tiny-flux", FluxPipeline),
        ("tiny-flux-schnell", FluxPipeline), ("tiny-flux", FluxImg2ImgPipeline), ("tiny-flux", FluxInpaintPipeline)]

CALL = {"prompt": "a red circle", "height": 32, "width": 32, "max_sequence_length": 8, "guidance_scale": 1.0}


def _config(module: Any, changes: dict[str, Any]) -> dict[str, Any]:
    config = {key: value for key, value in module.config.items() if key != "_use_default_values"}  # else it drops keys
    return {**config, **changes}


def _pipeline(tiny_pipelines: dict[str, Any], name: str, cls: type, changes: dict[str, Any], latent: int | None) -> Any:
    """`cls` built from a tiny model's components, its transformer's config changed and its VAE of `latent` channels."""
    components = dict(tiny_pipelines[name].components)
    torch.manual_seed(0)
    if changes:
        transformer = components["transformer"]
        components["transformer"] = type(transformer).from_config(_config(transformer, changes)).eval()
    if latent is not None:
        components["vae"] = AutoencoderKL.from_config(_config(components["vae"], {"latent_channels": latent})).eval()
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe: Any, **overrides: Any) -> dict[str, Any]:
    extra = {"use_resolution_binning": False} if isinstance(pipe, (PixArtSigmaPipeline, PixArtAlphaPipeline)) else {}
    return {**CALL, **extra, "num_inference_steps": 3, "output_type": "pt", **overrides}


@pytest.mark.parametrize(("name", "cls", "changes", "latent", "key", "message"), REFUSED)
def test_a_transformer_its_pipeline_cannot_run_is_refused_at_accelerate_naming_the_key(
    tiny_pipelines: dict[str, Any], name: str, cls: type, changes: dict[str, Any], latent: int | None, key: str,
    message: str,
) -> None:
    pipe = _pipeline(tiny_pipelines, name, cls, changes, latent)
    with pytest.raises(ConfigError, match=message) as refused:
        catrt.accelerate(pipe)
    expected = {**pipe.transformer.config, **changes}
    assert (refused.value.field, refused.value.value) == (key, expected[key])


@pytest.mark.parametrize(("name", "cls", "changes", "latent", "key"),
                         [case[:5] for case in REFUSED if case[1] in (StableDiffusion3Pipeline, FluxPipeline, PixArtSigmaPipeline)])
def test_the_plain_pipeline_fails_on_each_refused_text_to_image_combination(
    tiny_pipelines: dict[str, Any], name: str, cls: type, changes: dict[str, Any], latent: int | None, key: str
) -> None:
    """diffusers builds each and fails: in the scheduler's first step (out_channels) or the VAE decode (in_channels)."""
    pipe = _pipeline(tiny_pipelines, name, cls, changes, latent)
    with torch.no_grad(), pytest.raises(RuntimeError):
        pipe(**_call(pipe, num_inference_steps=1))


@pytest.mark.parametrize(("changes", "latent"), [({"in_channels": 8, "out_channels": 8}, 8),
                                                 ({"in_channels": 17, "out_channels": 8}, 8)])
def test_the_plain_inpainting_pipeline_refuses_each_refused_input_width_at_the_call(
    tiny_pipelines: dict[str, Any], changes: dict[str, Any], latent: int
) -> None:
    """What catrt's rule stands for: diffusers' own ValueError at the call (its accepted widths, 16 and 33)."""
    pipe = _pipeline(tiny_pipelines, "tiny-sd3", StableDiffusion3InpaintPipeline, changes, latent)
    extra = {"image": torch.zeros(1, 3, 32, 32), "mask_image": torch.ones(1, 1, 32, 32), "strength": 1.0}
    with torch.no_grad(), pytest.raises(ValueError, match="should have 16 input channels or 33 input channels"):
        pipe(**_call(pipe, num_inference_steps=1, **extra))


@pytest.mark.parametrize(("name", "cls", "changes", "latent"), TAKEN)
def test_a_combination_diffusers_runs_is_taken(
    tiny_pipelines: dict[str, Any], name: str, cls: type, changes: dict[str, Any], latent: int | None
) -> None:
    pipe = _pipeline(tiny_pipelines, name, cls, changes, latent)
    fast = catrt.accelerate(pipe, CATConfig(t0=2))
    with torch.no_grad():
        images = fast(**_call(pipe, **_image_inputs(cls))).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize(("name", "cls", "changes", "latent"), TAKEN)
def test_the_plain_pipeline_runs_each_taken_combination(
    tiny_pipelines: dict[str, Any], name: str, cls: type, changes: dict[str, Any], latent: int | None
) -> None:
    """The taken combinations are ones diffusers runs through its scheduler and VAE decode: no refusal to miss."""
    pipe = _pipeline(tiny_pipelines, name, cls, changes, latent)
    with torch.no_grad():
        images = pipe(**_call(pipe, num_inference_steps=1, **_image_inputs(cls))).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def _image_inputs(cls: type) -> dict[str, Any]:
    """An inpainting pipeline's image, mask and strength (the others take the prompt alone)."""
    if "Inpaint" not in cls.__name__:
        return {}
    return {"image": torch.zeros(1, 3, 32, 32), "mask_image": torch.ones(1, 1, 32, 32), "strength": 1.0}


@pytest.mark.parametrize(("name", "cls"), TINY)
def test_the_tiny_models_are_taken_in_each_pipeline_class(tiny_pipelines: dict[str, Any], name: str, cls: type) -> None:
    catrt.accelerate(_pipeline(tiny_pipelines, name, cls, {}, None))


def test_the_reference_model_is_taken() -> None:
    catrt.accelerate(catrt.load_pipeline("reference"))


class FillLikePipeline(FluxPipeline):
    """A user's pipeline class of a wider-input FLUX transformer (as FLUX Fill's), registered without a channel rule."""


@pytest.fixture()
def fill_like_registered() -> Any:
    register_pipeline(FillLikePipeline, replace(PIPELINES[FluxPipeline], latent_channels=None))
    yield FillLikePipeline
    del PIPELINES[FillLikePipeline]


def test_a_wider_flux_transformer_is_taken_in_a_registered_class_of_its_own(
    tiny_pipelines: dict[str, Any], fill_like_registered: type
) -> None:
    catrt.accelerate(_pipeline(tiny_pipelines, "tiny-flux", fill_like_registered, {"in_channels": 384, "out_channels": 64}, None))


def test_a_vae_swapped_after_accelerate_is_refused_at_the_call_before_any_step(tiny_pipelines: dict[str, Any]) -> None:
    pipe = _pipeline(tiny_pipelines, "tiny-sd3", StableDiffusion3Pipeline, {"in_channels": 8, "out_channels": 8}, 8)
    fast = catrt.accelerate(pipe, CATConfig(t0=2, trace=True))
    fast.vae = tiny_pipelines["tiny-sd3"].vae  # 16 latent channels
    with pytest.raises(ConfigError, match=r"in_channels 8 does not fit the VAE's latent_channels 16") as refused:
        fast(**_call(pipe))
    assert refused.value.field == "in_channels" and fast.last_trace == []


@pytest.fixture(scope="module")
def mismatched_folder(tiny_pipelines: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd3 saved with an 8-channel transformer beside its 16-channel VAE, as a user's folder."""
    folder = tmp_path_factory.mktemp("latents") / "model"
    _pipeline(tiny_pipelines, "tiny-sd3", StableDiffusion3Pipeline, {"in_channels": 8, "out_channels": 8}, None).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_the_cli_refuses_the_folder_in_one_line(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, mismatched_folder: Path, command: list[str]
) -> None:
    line = cli_refusal(capfd, tmp_path, mismatched_folder, command)
    assert line.startswith(f"catrt {command[0]}: error: SD3Transformer2DModel config in_channels 8 does not fit the "
                           f"VAE's latent_channels 16")


def test_a_spec_channel_rule_of_another_type_is_refused_by_name() -> None:
    from catrt.pipeline_spec import LatentChannels, PipelineSpec

    with pytest.raises(ConfigError, match=r"^PipelineSpec.latent_channels must be None or a LatentChannels, got 4$"):
        PipelineSpec(call_defaults={}, latent_channels=4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^LatentChannels.packing must be a whole number >= 1, got 0$"):
        LatentChannels(packing=0)
    with pytest.raises(ConfigError, match=r"^LatentChannels.learned_variance must be True or False, got 'False'$") as refused:
        LatentChannels(learned_variance="False")  # type: ignore[arg-type]
    assert refused.value.field == "learned_variance"
    with pytest.raises(ConfigError, match=r"^LatentChannels.mask_input must be True or False, got 1$"):
        LatentChannels(mask_input=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^LatentChannels.other_layouts must be a string, got None$"):
        LatentChannels(other_layouts=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^LatentChannels.in_channels must be a tuple of whole numbers >= 1, got \[16, 33\]"):
        LatentChannels(in_channels=[16, 33])  # type: ignore[arg-type]
