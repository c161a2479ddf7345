"""Transformer configs diffusers builds but whose forward (or its pipeline's scheduler step) fails or computes garbage:
refused by the family's layout check before any step, as a ConfigError naming the config key, its value and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from catrt import ConfigError
from catrt.cli import main
from catrt.models import make_adapter

#: (tiny pipeline, config changes, the key named, the refusal's message).
REFUSED = [
    ("tiny-sd3", {"caption_projection_dim": 16}, "caption_projection_dim",
     r"^SD3Transformer2DModel config caption_projection_dim 16 is not the transformer's width num_attention_heads \* "
     r"attention_head_dim = 4 \* 8 = 32: .*; set caption_projection_dim to 32 in the transformer's config.json"),
    ("tiny-sd3.5", {"attention_head_dim": 7}, "caption_projection_dim",
     r"caption_projection_dim 32 is not the transformer's width num_attention_heads \* attention_head_dim = 4 \* 7 = 28"),
    ("tiny-pixart", {"cross_attention_dim": 16}, "cross_attention_dim",
     r"^PixArtTransformer2DModel config cross_attention_dim 16 is not the transformer's width num_attention_heads \* "
     r"attention_head_dim = 4 \* 8 = 32: .*; set cross_attention_dim to 32 in the transformer's config.json"),
    ("tiny-flux", {"axes_dims_rope": (2, 2, 2)}, "axes_dims_rope",
     r"^FluxTransformer2DModel config axes_dims_rope \[2, 2, 2\] does not split attention_head_dim 8 into 3 even parts "
     r".*; give 3 even numbers summing to 8 in the transformer's config.json"),
    ("tiny-flux", {"axes_dims_rope": (3, 3, 2)}, "axes_dims_rope", r"axes_dims_rope \[3, 3, 2\] does not split"),  # odd
    ("tiny-flux-schnell", {"axes_dims_rope": (4, 4)}, "axes_dims_rope", r"axes_dims_rope \[4, 4\] does not split"),
    ("tiny-sd3", {"out_channels": 8}, "out_channels",
     r"^SD3Transformer2DModel config out_channels 8 with in_channels 16: .*; set out_channels to 16 in the "
     r"transformer's config.json \(the inpainting layout is in_channels = 2 \* out_channels \+ 1\)$"),
    ("tiny-sd3", {"out_channels": 1}, "out_channels", r"out_channels 1 with in_channels 16"),  # broadcast silently
    ("tiny-pixart", {"out_channels": 9}, "out_channels",
     r"^PixArtTransformer2DModel config out_channels 9 with in_channels 4: .*; set out_channels to 4 or 8 in the "
     r"transformer's config.json$"),
    ("tiny-pixart", {"out_channels": 1}, "out_channels", r"out_channels 1 with in_channels 4"),
    ("tiny-pixart", {"out_channels": None}, "out_channels",
     r"^PixArtTransformer2DModel config out_channels is null: .*; set out_channels to 4 \(or 8 for a learned variance\)"),
    ("tiny-flux", {"in_channels": 63}, "in_channels",
     r"^FluxTransformer2DModel config in_channels 63 is not a multiple of 4: the pipeline packs 2x2 latent cells of "
     r"in_channels // 4 channels into tokens of 60, .*; set in_channels to 4 times the VAE's latent_channels"),
]

#: Refused configs whose transformer runs but whose pipeline fails (the silent ones, out_channels 1, broadcast).
PIPELINE_FAILS = [("tiny-sd3", {"out_channels": 8}), ("tiny-pixart", {"out_channels": 9}),
                  ("tiny-pixart", {"out_channels": None}), ("tiny-flux", {"in_channels": 63})]

#: Configs of the same relations that diffusers runs: taken.
TAKEN = [
    ("tiny-sd3", {"num_attention_heads": 2, "attention_head_dim": 16}),  # width 32 = caption_projection_dim
    ("tiny-sd3", {"in_channels": 33}),  # the inpainting layout: 16 latent + 16 masked-image + 1 mask channels
    ("tiny-sd3", {"out_channels": None}),  # out_channels = in_channels
    ("tiny-pixart", {"num_attention_heads": 2, "attention_head_dim": 16}),
    ("tiny-pixart", {"out_channels": 4}),  # no learned variance
    ("tiny-flux", {"axes_dims_rope": (0, 4, 4)}),  # an axis of no channels
    ("tiny-flux", {"axes_dims_rope": (2, 2, 4, 6)}),  # diffusers reads the first 3 (the ids' columns)
    ("tiny-flux", {"attention_head_dim": 6, "axes_dims_rope": (2, 2, 2)}),
    ("tiny-sd3.5", {"dual_attention_layers": (0, 5)}),  # diffusers makes block 0 dual and ignores the index past 2
]


def _transformer(tiny_pipelines: dict[str, Any], name: str, changes: dict[str, Any], device: str = "meta") -> Any:
    transformer = tiny_pipelines[name].transformer
    with torch.device(device):
        config = {key: value for key, value in transformer.config.items() if key != "_use_default_values"}  # else it drops keys
        return type(transformer).from_config({**config, **changes}).eval()


@pytest.mark.parametrize(("name", "changes", "key", "message"), REFUSED)
def test_a_config_diffusers_cannot_run_is_refused_naming_its_key(
    tiny_pipelines: dict[str, Any], name: str, changes: dict[str, Any], key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        make_adapter(_transformer(tiny_pipelines, name, changes))
    assert refused.value.field == key
    config = tiny_pipelines[name].transformer.config
    assert refused.value.value == (list(changes[key]) if key == "axes_dims_rope" else changes.get(key, config.get(key)))


@pytest.mark.parametrize(("name", "changes"), TAKEN)
def test_a_config_diffusers_runs_is_taken(tiny_pipelines: dict[str, Any], name: str, changes: dict[str, Any]) -> None:
    make_adapter(_transformer(tiny_pipelines, name, changes))


def _forward(transformer: Any, name: str) -> torch.Tensor:
    """One diffusers forward of `transformer` on random inputs of the widths its config declares."""
    config = transformer.config
    gen = torch.Generator().manual_seed(0)
    if name.startswith("tiny-flux"):
        ids = torch.zeros(4, 3)
        ids[:, 1:] = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
        guidance = torch.tensor([3.5]) if config.guidance_embeds else None
        return transformer(torch.randn(1, 4, config.in_channels, generator=gen), torch.randn(1, 3, config.joint_attention_dim),
                           torch.randn(1, config.pooled_projection_dim), torch.tensor([0.5]), torch.zeros(3, 3), ids,
                           guidance=guidance, return_dict=False)[0]
    latents = torch.randn(1, config.in_channels, 4, 4, generator=gen)
    if name == "tiny-pixart":
        return transformer(latents, torch.randn(1, 3, config.caption_channels), timestep=torch.tensor([500]),
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    return transformer(latents, torch.randn(1, 3, config.joint_attention_dim), torch.randn(1, config.pooled_projection_dim),
                       torch.tensor([500.0]), return_dict=False)[0]


@pytest.mark.parametrize(("name", "changes", "key"), [case[:3] for case in REFUSED if case[2] not in ("out_channels", "in_channels")])
def test_diffusers_forward_fails_on_each_refused_width(
    tiny_pipelines: dict[str, Any], name: str, changes: dict[str, Any], key: str
) -> None:
    """The refusals are of configs diffusers cannot run (the out_channels ones fail in the scheduler, not the forward)."""
    with torch.no_grad(), pytest.raises((RuntimeError, AssertionError, IndexError)):
        _forward(_transformer(tiny_pipelines, name, changes, device="cpu"), name)


@pytest.mark.parametrize(("name", "changes"), PIPELINE_FAILS)
def test_the_plain_pipeline_fails_on_each_refused_channel_count(
    tiny_pipelines: dict[str, Any], name: str, changes: dict[str, Any]
) -> None:
    """The channel refusals are of transformers whose own forward runs but whose pipeline fails in its first step."""
    pipe = tiny_pipelines[name]
    call = {"prompt": "a red circle", "num_inference_steps": 1, "height": 32, "width": 32, "max_sequence_length": 8,
            "output_type": "latent", **({"use_resolution_binning": False} if name == "tiny-pixart" else {})}
    pipe(**call)  # the call itself runs with the transformer as built
    pipe = type(pipe)(**{**pipe.components, "transformer": _transformer(tiny_pipelines, name, changes, device="cpu")})
    with pytest.raises((RuntimeError, TypeError)):
        pipe(**call)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd3.5", "tiny-pixart", "tiny-flux"])
def test_diffusers_forward_runs_the_taken_configs(tiny_pipelines: dict[str, Any], name: str) -> None:
    for changes in (changes for taken, changes in TAKEN if taken == name):
        with torch.no_grad():
            out = _forward(_transformer(tiny_pipelines, name, changes, device="cpu"), name)
        assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def mismatched_folder(tiny_pipelines: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd3 saved with a transformer of caption_projection_dim 16 (width 32), as a user's folder."""
    pipe = tiny_pipelines["tiny-sd3"]
    transformer = _transformer(tiny_pipelines, "tiny-sd3", {"caption_projection_dim": 16}, device="cpu")
    folder = tmp_path_factory.mktemp("bad") / "model"
    type(pipe)(**{**pipe.components, "transformer": transformer}).save_pretrained(folder)
    return folder


#: `generate` and `build` of a model folder at a small size: each must refuse a folder it cannot run in one line.
CLI_COMMANDS = [
    ["generate", "--prompt", "a red circle", "--height", "32", "--width", "32"],
    ["build", "--backend", "onnxruntime", "--height", "32", "--width", "32"],
]


def cli_refusal(capfd: pytest.CaptureFixture[str], tmp_path: Path, folder: Path, command: list[str]) -> str:
    """The one error line of `command` run on `folder` (exit 2, no traceback, nothing written under `tmp_path`)."""
    argv = [*command, "--model", str(folder), "--steps", "4", "--t0", "2"]
    argv += ["--out", str(tmp_path / ("image.png" if command[0] == "generate" else "engines"))]
    if command[0] == "build":
        argv += ["--export-dir", str(tmp_path / "export")]
    assert main(argv) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.strip().splitlines() if ": error: " in line]  # build's progress bar comes before
    assert "Traceback" not in err and len(lines) == 1 and err.strip().endswith(lines[0]), err
    assert sorted(path.name for path in tmp_path.iterdir()) == []
    return lines[0]


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_the_cli_refuses_the_folder_in_one_line(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, mismatched_folder: Path, command: list[str]
) -> None:
    line = cli_refusal(capfd, tmp_path, mismatched_folder, command)
    assert line.startswith(f"catrt {command[0]}: error: SD3Transformer2DModel config caption_projection_dim 16 is not")


def test_accelerate_refuses_the_pipeline_before_any_step(tiny_pipelines: dict[str, Any]) -> None:
    """The Python API refuses at `catrt.accelerate`, where diffusers' own call failed in the first block."""
    import catrt

    pipe = tiny_pipelines["tiny-pixart"]
    transformer = _transformer(tiny_pipelines, "tiny-pixart", {"cross_attention_dim": 16}, device="cpu")
    pipe = type(pipe)(**{**pipe.components, "transformer": transformer})
    with pytest.raises(ConfigError, match=r"^PixArtTransformer2DModel config cross_attention_dim 16 is not") as refused:
        catrt.accelerate(pipe)
    assert (refused.value.field, refused.value.value) == ("cross_attention_dim", 16)


@pytest.mark.parametrize(("name", "changes", "message"), [
    ("tiny-sd3", {"joint_attention_dim": 40},
     r"'encoder_hidden_states' has shape \(1, 85, 48\), but this SD3Transformer2DModel takes \(B, 85, 40\) .*passed to the "
     r"call; 40 is the transformer config's joint_attention_dim, so a model whose text encoders give 48 needs "
     r"joint_attention_dim 48 in its transformer/config.json$"),
    ("tiny-sd3", {"pooled_projection_dim": 40}, r"'pooled_projections' .*; 40 is the transformer config's pooled_projection_dim, "
                                                r"so a model whose text encoders give 64 needs pooled_projection_dim 64"),
    ("tiny-pixart", {"caption_channels": 40}, r"; 40 is the transformer config's caption_channels, so a model whose text "
                                              r"encoders give 48 needs caption_channels 48"),
    ("tiny-flux", {"pooled_projection_dim": 20}, r"; 20 is the transformer config's pooled_projection_dim, so a model whose "
                                                 r"text encoders give 24 needs pooled_projection_dim 24"),
])
def test_a_transformer_of_another_text_width_than_its_encoders_is_refused_naming_the_key(
    tiny_pipelines: dict[str, Any], name: str, changes: dict[str, Any], message: str
) -> None:
    """diffusers builds the transformer and its pipeline, and failed in the first step's text projection; catrt names the
    input before the step, and now the config key that set the width it takes (no tensor was passed by the user)."""
    import catrt

    pipe = tiny_pipelines[name]
    pipe = type(pipe)(**{**pipe.components, "transformer": _transformer(tiny_pipelines, name, changes, device="cpu")})
    fast = catrt.accelerate(pipe, catrt.CATConfig(t0=2))
    with pytest.raises(ConfigError, match=message) as refused:
        fast("a red circle", num_inference_steps=3, height=32, width=32, max_sequence_length=8, guidance_scale=1.0,
             output_type="latent", **({"use_resolution_binning": False} if name == "tiny-pixart" else {}))
    assert refused.value.field == ("pooled_projections" if "pooled_projection_dim" in changes else "encoder_hidden_states")
    assert fast.last_trace == []


def test_a_passed_embedding_of_the_right_width_names_no_config_key(tiny_pipelines: dict[str, Any]) -> None:
    """Only a width is the config's: a prompt embedding of another rank or batch is not about a config key."""
    import catrt

    fast = catrt.accelerate(tiny_pipelines["tiny-sd3"], catrt.CATConfig(t0=2))
    call = {"num_inference_steps": 3, "height": 32, "width": 32, "guidance_scale": 1.0, "output_type": "latent"}
    with pytest.raises(ConfigError, match=r"takes 3-D tensors: check the latents, prompt embeddings and other tensors "
                                          r"passed to the call$"):
        fast(prompt_embeds=torch.zeros(1, 5, 2, 48), pooled_prompt_embeds=torch.zeros(1, 64), **call)
    with pytest.raises(ConfigError, match=r"'pooled_projections' has shape \(2, 64\), but .* takes \(B, 64\) here \(B = 3, "
                                          r"the latents' batch\): check the latents, prompt embeddings and other tensors "
                                          r"passed to the call$"):
        fast(prompt_embeds=torch.zeros(3, 5, 48), pooled_prompt_embeds=torch.zeros(2, 64), **call)


def test_a_meta_call_refusing_a_changed_key_its_own_way_leaves_the_hint_to_the_key_that_moves_the_width() -> None:
    """The hint asks the family's meta call which key moves a width; a registered family's meta call that refuses one
    changed key by an assertion of its own made the refusal itself fail with that AssertionError."""
    from catrt.models.inputs import _width_key

    def meta_call(config: dict[str, Any], text_tokens: int, grid: Any) -> dict[str, Any]:
        assert config["num_attention_heads"] == 4, "this family has 4 heads"
        return {"encoder_hidden_states": torch.empty(1, text_tokens, config["joint_attention_dim"], device="meta")}

    config = {"num_attention_heads": 4, "joint_attention_dim": 4, "num_layers": 2}
    assert _width_key(meta_call, config, "encoder_hidden_states") == "joint_attention_dim"
