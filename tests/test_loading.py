"""Tiny pipelines and `load_pipeline`: they build offline, deterministically, and generate."""

from __future__ import annotations

import json
import logging
import os
import re
import threading

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported: nothing here may download

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, PixArtSigmaPipeline

from catrt.errors import ConfigError, UnknownModelError
from catrt.loading import LOADERS, load_pipeline
from catrt.model_cards import MODEL_CARDS, TINY_MODELS
from catrt import tiny
from catrt.tiny import TINY_PIPELINES, build_tiny_pipeline

PROMPT = "a photo of a cat sitting on a red chair, highly detailed"
NAMES = sorted(TINY_PIPELINES)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the hub unreachable even if another module imported huggingface_hub first."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module", params=NAMES)
def pipeline(request: pytest.FixtureRequest) -> DiffusionPipeline:
    """Each tiny pipeline, built once for the module."""
    built = build_tiny_pipeline(request.param)
    built.set_progress_bar_config(disable=True)
    return built


def _generate(pipeline: DiffusionPipeline, prompt: str = PROMPT, **kwargs: Any) -> Any:
    """Run a seeded 4-step generation with the kwargs the tiny pipelines need.

    PixArt's resolution binning knows only its published sizes, and caption cleaning needs
    optional packages, so both are off for it.
    """
    if isinstance(pipeline, PixArtSigmaPipeline):
        kwargs = {"use_resolution_binning": False, "clean_caption": False, **kwargs}
    kwargs = {"height": 64, "width": 64, "guidance_scale": 4.0, "output_type": "latent", **kwargs}
    return pipeline(
        prompt, num_inference_steps=4, max_sequence_length=16,
        generator=torch.Generator().manual_seed(0), **kwargs,
    ).images


def _state(pipeline: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every weight of every torch component, keyed by component and parameter name."""
    return {
        f"{name}.{key}": value
        for name, component in pipeline.components.items()
        if isinstance(component, torch.nn.Module)
        for key, value in component.state_dict().items()
    }


def _same_weights(a: DiffusionPipeline, b: DiffusionPipeline) -> bool:
    """Whether two pipelines hold bit-identical weights."""
    state_a, state_b = _state(a), _state(b)
    same_keys = state_a.keys() == state_b.keys()
    return same_keys and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_every_tiny_name_is_loadable() -> None:
    assert set(TINY_PIPELINES) == {"tiny-sd3", "tiny-sd3.5", "tiny-pixart", "tiny-flux", "tiny-flux-schnell"}
    assert set(TINY_PIPELINES) | set(MODEL_CARDS) <= set(LOADERS)


def test_sd35_layout_features_are_present() -> None:
    transformer = build_tiny_pipeline("tiny-sd3.5").transformer
    assert transformer.config.qk_norm == "rms_norm"
    assert transformer.transformer_blocks[0].use_dual_attention
    assert transformer.transformer_blocks[-1].context_pre_only
    plain = build_tiny_pipeline("tiny-sd3").transformer
    assert plain.config.qk_norm is None and not plain.transformer_blocks[0].use_dual_attention


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_weights_other_seed_other_weights(name: str) -> None:
    first = build_tiny_pipeline(name, seed=3)
    assert _same_weights(first, build_tiny_pipeline(name, seed=3))
    assert not _same_weights(first, build_tiny_pipeline(name, seed=4))


class _NotingLock:
    """tiny's build lock, noting in `waiting` when a build has to wait for it."""

    def __init__(self, waiting: threading.Event) -> None:
        self._lock, self._waiting = threading.Lock(), waiting

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self._waiting.set()
            self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


def test_builds_in_two_threads_each_get_their_seeds_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads loading tiny models at once (two `catrt.load`s of a tiny bundle): each build's weights are its
    seed's. The first build, seeded, draws only once the second has seeded (without turns: it then drew from the
    second's seed) or waits for its turn (with turns): no pause that assumes the second got there meanwhile."""
    together, first_seeded, second_went_on, first_drew = (threading.Event() for _ in range(4))

    def build(seed: int) -> torch.Tensor:
        def draw() -> torch.Tensor:
            if together.is_set() and seed == 1:
                first_seeded.set()
                assert second_went_on.wait(timeout=600)  # a bound for a hang only
                weights = torch.rand(4)
                first_drew.set()
                return weights
            if together.is_set():
                second_went_on.set()
                assert first_drew.wait(timeout=600)
            return torch.rand(4)
        return tiny._seeded(seed, 0, draw)

    monkeypatch.setitem(TINY_PIPELINES, "tiny-test", build)
    expected = {seed: build_tiny_pipeline("tiny-test", seed=seed) for seed in (1, 2)}  # each alone
    monkeypatch.setattr(tiny, "_BUILDING", _NotingLock(second_went_on))
    together.set()
    built: dict[int, torch.Tensor] = {}
    first = threading.Thread(target=lambda: built.__setitem__(1, build_tiny_pipeline("tiny-test", seed=1)))
    first.start()
    second = threading.Thread(target=lambda: built.__setitem__(2, build_tiny_pipeline("tiny-test", seed=2)))
    assert first_seeded.wait(timeout=600)
    second.start()
    first.join()
    second.join()
    assert torch.equal(built[1], expected[1]) and torch.equal(built[2], expected[2])


def test_building_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline("tiny-pixart")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("height", "width"), [(64, 64), (64, 128), (128, 64)])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_generates_latents_of_the_requested_size(
    pipeline: DiffusionPipeline, height: int, width: int, guidance_scale: float
) -> None:
    latents = _generate(pipeline, height=height, width=width, guidance_scale=guidance_scale)
    channels = pipeline.vae.config.latent_channels
    if isinstance(pipeline, FluxPipeline):  # packed: one row of 2x2 latent cells per token
        assert latents.shape == (1, (height // 16) * (width // 16), 4 * channels)
    else:
        assert latents.shape == (1, channels, height // 8, width // 8)
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize(("height", "width"), [(64, 64), (64, 128)])
def test_generates_pil_images_of_the_requested_size(
    pipeline: DiffusionPipeline, height: int, width: int
) -> None:
    (image,) = _generate(pipeline, height=height, width=width, output_type="pil")
    assert image.size == (width, height)
    assert np.asarray(image).std() > 0


def test_prompt_changes_the_output(pipeline: DiffusionPipeline) -> None:
    assert not torch.allclose(_generate(pipeline, "a dog in the snow"), _generate(pipeline))


def test_save_then_load_generates_the_same_latents(pipeline: DiffusionPipeline, tmp_path: Path) -> None:
    pipeline.save_pretrained(tmp_path)
    reloaded = load_pipeline(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is type(pipeline)
    torch.testing.assert_close(_generate(reloaded), _generate(pipeline), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_load_by_name_is_the_seed_zero_build(name: str) -> None:
    assert _same_weights(load_pipeline(name), build_tiny_pipeline(name, seed=0))


def test_load_casts_to_the_requested_dtype() -> None:
    pipeline = load_pipeline("tiny-sd3", device="cpu", dtype=torch.bfloat16)
    assert pipeline.transformer.dtype == torch.bfloat16
    assert pipeline.text_encoder_3.dtype == torch.bfloat16


@pytest.mark.parametrize("name", NAMES)
def test_a_tiny_pipeline_in_bf16_is_cast_without_diffusers_warning(name: str) -> None:
    """`catrt generate --precision bf16` on a tiny model printed diffusers' "should be kept in float32: []" cast
    warning twice (ModelMixin.to warns on every dtype cast in diffusers 0.42, even with no fp32 modules)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    diffusers_logger = logging.getLogger("diffusers")  # diffusers' own loggers do not propagate to the root
    diffusers_logger.addHandler(handler)
    try:
        pipeline = load_pipeline(name, dtype=torch.bfloat16)
    finally:
        diffusers_logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == []
    modules = [c for c in pipeline.components.values() if isinstance(c, torch.nn.Module)]
    assert modules and all(p.dtype == torch.bfloat16 for m in modules for p in m.parameters())


def test_unknown_name_raises_and_lists_the_known_names() -> None:
    with pytest.raises(UnknownModelError, match="no-such-model") as caught:
        load_pipeline("no-such-model")
    assert "tiny-sd3" in str(caught.value) and "sd3.5-large" in str(caught.value)
    assert "diffusers folder" in str(caught.value)


def test_the_light_name_list_is_what_loads() -> None:
    """The CLI and the server check names against model_cards (no torch): exactly the names load_pipeline loads."""
    assert set(TINY_MODELS) == set(TINY_PIPELINES)
    assert set(LOADERS) == set(MODEL_CARDS) | set(TINY_MODELS)


def test_folder_without_model_index_is_unknown(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match=re.escape(str(tmp_path))):
        load_pipeline(tmp_path)


def test_unknown_tiny_name_raises() -> None:
    with pytest.raises(UnknownModelError, match="tiny-sdxl"):
        build_tiny_pipeline("tiny-sdxl")


@pytest.mark.parametrize(
    ("arguments", "field", "message"),
    [
        ({"device": "nonsense"}, "device", "device 'nonsense' is not a torch device; use cpu, cuda or cuda:N"),
        ({"dtype": "float16"}, "dtype", "dtype must be a floating-point torch.dtype .* got 'float16'"),
        ({"dtype": torch.int64}, "dtype", "dtype must be a floating-point torch.dtype .* got torch.int64"),
        pytest.param({"device": "cuda"}, "device", "device 'cuda': this machine has no usable CUDA GPU",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    ],
)
def test_a_device_or_dtype_that_cannot_load_is_refused_by_name(arguments: dict, field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_pipeline("tiny-sd3", **arguments)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("index", "reason"),
    [
        ({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}, "OSError: "),
        ({"_class_name": "NoSuchPipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}, "NoSuchPipeline"),
    ],
)
def test_a_folder_diffusers_cannot_load_is_refused_naming_the_folder(tmp_path: Path, index: dict, reason: str) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps(index))  # a component's files missing, or an unknown class
    with pytest.raises(ConfigError, match=f"could not load the model folder {re.escape(repr(str(tmp_path)))} as a diffusers pipeline") as caught:
        load_pipeline(tmp_path)
    assert reason in str(caught.value) and "save_pretrained" in str(caught.value)
    assert caught.value.field == "model"


def test_a_model_card_a_script_adds_loads_by_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A published model a script adds to MODEL_CARDS (beside registering its family) loads by name, from its hub
    id (here a local folder, which from_pretrained takes as a hub id), with or without the transformer's weights."""
    from catrt.build import model_reference
    from catrt.model_cards import ModelCard

    built = build_tiny_pipeline("tiny-sd3")
    built.save_pretrained(tmp_path)
    card = ModelCard(name="my-sd3", hub_id=str(tmp_path), family="sd3",
                     transformer_config=dict(built.transformer.config), text_tokens=93)
    monkeypatch.setitem(MODEL_CARDS, "my-sd3", card)
    assert _same_weights(load_pipeline("my-sd3"), built)
    assert load_pipeline("my-sd3", transformer_weights=False).transformer.pos_embed.proj.weight.is_meta
    assert model_reference("my-sd3") == "my-sd3"  # a bundle names it as a name, not as a folder


@pytest.mark.parametrize("weights", [True, False])
def test_a_published_model_without_hub_access_is_one_catrt_error_from_python(weights: bool) -> None:
    """`load_pipeline("sd3")` (and `catrt.load` of a bundle naming it) offline raised diffusers' OSError; it says
    what to do, as the CLI does."""
    from catrt.errors import CatrtError

    with pytest.raises(CatrtError, match=r"model sd3 \(stabilityai/stable-diffusion-3-medium-diffusers\) could not be "
                                         r"loaded: .*huggingface-cli login.*save_pretrained") as refused:
        load_pipeline("sd3", transformer_weights=weights)
    assert refused.value.field == "model" and isinstance(refused.value.__cause__, OSError)
