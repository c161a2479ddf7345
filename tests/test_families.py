"""Model families as registered data: FLUX's declared guidance and refusals, and a new family in one registration."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import (
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.models.attention_processor import AttnProcessor

import catrt
from catrt import CATConfig, ConfigError, UnsupportedModelError
from catrt.macs import meta_inputs
from catrt.model_cards import MODEL_CARDS
from catrt.models import ADAPTERS, FAMILIES, PIPELINES, Adapter, Family, make_adapter, register_family
from catrt.models.base import PackedTokensAdapter, attention
from catrt.models.sd3 import SD3Adapter
from catrt.pipeline import pipeline_spec, register_pipeline
from catrt.pipeline_spec import PipelineSpec
from catrt.runtime import CATRuntime
from catrt.tokens import Grid
from tests.conftest import call_kwargs
from tests.test_adapters import _context, _inputs


def test_guidance_is_declared_per_pipeline(tiny_pipelines: dict[str, Any]) -> None:
    sd3, flux = pipeline_spec(tiny_pipelines["tiny-sd3"]), pipeline_spec(tiny_pipelines["tiny-flux"])
    assert sd3.guidance == "cfg" and sd3.doubles_batch({"guidance_scale": 7.0})
    assert not sd3.doubles_batch({"guidance_scale": 1.0})
    assert flux.guidance == "distilled" and not flux.doubles_batch({"guidance_scale": 7.0})


@pytest.mark.parametrize("scale", [None, "7", [7.0, 7.0]])
def test_a_guidance_scale_that_is_not_a_number_is_refused_by_name(scale: Any, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, CATConfig(t0=3))
    with pytest.raises(ConfigError, match=re.escape(f"guidance_scale must be a number, got {scale!r}")) as caught:
        fast(**call_kwargs(pipe, guidance_scale=scale))
    assert caught.value.field == "guidance_scale"


@torch.no_grad()
def test_flux_guidance_embedding_is_an_input_of_one_row_per_image(tiny_pipelines: dict[str, Any]) -> None:
    dev, schnell = (make_adapter(tiny_pipelines[name].transformer) for name in ("tiny-flux", "tiny-flux-schnell"))
    latents, timestep, kwargs = _inputs(dev.transformer)
    context = _context(dev, kwargs, latents)
    assert context["guidance"].shape == (2,)
    assert context["rotary_cos"].shape == (9 + 24, dev.transformer.config.attention_head_dim)
    other = {**kwargs, "guidance": torch.full((2,), 7.0)}
    cache = torch.empty(dev.num_kv_slots, 2, 24, dev.hidden_dim)
    assert not torch.equal(dev.full_forward(latents, timestep, context, cache),
                           dev.full_forward(latents, timestep, _context(dev, other, latents), cache))
    with pytest.raises(ConfigError, match="embeds guidance .*needs guidance"):
        dev.context_inputs({**kwargs, "guidance": None})
    with pytest.raises(ConfigError, match="no guidance embedding .*pass guidance=None"):
        schnell.context_inputs(kwargs)


def test_packed_latents_take_their_token_grid_from_the_call(tiny_pipelines: dict[str, Any]) -> None:
    adapter = make_adapter(tiny_pipelines["tiny-flux"].transformer)
    latents, timestep, kwargs = _inputs(adapter.transformer)  # 24 packed tokens
    with pytest.raises(ConfigError, match="FluxAdapter latents do not carry their token grid"):
        CATRuntime(adapter, CATConfig(t0=2), steps=4, guidance=False)(latents, timestep, kwargs)
    with pytest.raises(ConfigError, match="the latents have 24 tokens, the grid 4x5 has 20"):
        CATRuntime(adapter, CATConfig(t0=2), steps=4, guidance=False, grid=Grid(4, 5))(latents, timestep, kwargs)
    spec = pipeline_spec(tiny_pipelines["tiny-flux"])
    assert spec.token_grid(tiny_pipelines["tiny-flux"], {"height": 64, "width": 96}) == Grid(4, 6)  # 16 pixels a token


def test_flux_layouts_catrt_cannot_prune_are_refused_by_name(tiny_pipelines: dict[str, Any]) -> None:
    transformer = tiny_pipelines["tiny-flux"].transformer
    adapter = make_adapter(transformer)
    _, _, kwargs = _inputs(transformer)
    for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
        with pytest.raises(UnsupportedModelError, match=f"argument '{name}' is not supported"):
            adapter.context_inputs({**kwargs, name: [torch.zeros(1)]})
    with pytest.raises(UnsupportedModelError, match=r"joint_attention_kwargs \['ip_adapter_image_embeds'\]"):
        adapter.context_inputs({**kwargs, "joint_attention_kwargs": {"ip_adapter_image_embeds": [torch.zeros(1)]}})
    custom = type(transformer).from_config(transformer.config)
    custom.single_transformer_blocks[1].attn.set_processor(AttnProcessor())
    with pytest.raises(UnsupportedModelError, match="FLUX single block 1 uses attention processor AttnProcessor"):
        make_adapter(custom)
    fused = type(transformer).from_config(transformer.config)
    fused.fuse_qkv_projections()
    with pytest.raises(UnsupportedModelError, match=r"FLUX double block 0 has fused QKV projections; unfuse them \(unfuse_qkv_projections\)"):
        make_adapter(fused)
    fused.unfuse_qkv_projections()
    make_adapter(fused)  # unfused, the same layout is accepted again


def test_flux_pipeline_options_catrt_cannot_run_are_refused_by_name(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-flux"]
    fast = catrt.accelerate(pipe, CATConfig(t0=3))
    with pytest.raises(UnsupportedModelError, match="true_cfg_scale > 1 with a negative prompt"):
        fast(**call_kwargs(pipe, true_cfg_scale=4.0, negative_prompt="blurry"))
    with pytest.raises(UnsupportedModelError, match="argument 'ip_adapter_image_embeds' \\(IP-adapter\\)"):
        fast(**call_kwargs(pipe, ip_adapter_image_embeds=[torch.zeros(1)]))


def test_the_cli_refuses_a_negative_prompt_a_distilled_guidance_model_would_not_read(
    tiny_pipelines: dict[str, Any], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """FLUX reads a negative prompt only for true CFG (refused): `catrt generate --negative-prompt` was ignored silently.
    The Python API still takes what diffusers takes."""
    from catrt.cli import main

    flux, sd3 = pipeline_spec(tiny_pipelines["tiny-flux"]), pipeline_spec(tiny_pipelines["tiny-sd3"])
    with pytest.raises(ConfigError, match=r"^negative_prompt is unused by this model: its guidance is distilled") as caught:
        flux.refuse_unread_negative_prompt("blurry", "negative_prompt")
    assert caught.value.field == "negative_prompt"
    for negative in (None, "", " \t"):  # what clients send unset
        flux.refuse_unread_negative_prompt(negative, "negative_prompt")
    sd3.refuse_unread_negative_prompt("blurry", "negative_prompt")  # classifier-free guidance reads it
    code = main(["generate", "--model", "tiny-flux", "--prompt", "red", "--negative-prompt", "blurry", "--steps", "4",
                 "--t0", "2", "--height", "32", "--width", "32", "--out", str(tmp_path / "a.png")])
    err = capfd.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1] == (
        "catrt generate: error: --negative-prompt is unused by this model: its guidance is distilled (an input of the "
        "transformer, with no pass over a negative prompt), so it would change nothing; drop --negative-prompt")
    assert not (tmp_path / "a.png").exists()


_REFUSED_CALLS = {  # a family's model, then an argument its pipelines take that catrt refuses, by name
    "tiny-flux": ("ip_adapter_image_embeds", [torch.zeros(1)]),
    "tiny-sd3": ("joint_attention_kwargs", {"ip_adapter_masks": torch.zeros(1)}),
}


@pytest.mark.parametrize(("model", "pipeline_class"), [
    *(("tiny-flux", c) for c in (FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline)),
    *(("tiny-sd3", c) for c in (StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline)),
])
def test_a_refusal_names_the_pipeline_class_called(model: str, pipeline_class: type, tiny_pipelines: dict[str, Any]) -> None:
    pipe = pipeline_class(**tiny_pipelines[model].components)
    fast = catrt.accelerate(pipe, CATConfig(t0=3))
    argument, value = _REFUSED_CALLS[model]
    with pytest.raises(UnsupportedModelError, match=f"^{pipeline_class.__name__} argument '{argument}'"):
        fast(**call_kwargs(pipe, **{argument: value}))


# -- a new family: one adapter class and one registration --------------------------------------


class FakeTransformer(SD3Transformer2DModel):
    """A transformer class no built-in family serves."""


class FakePipeline(StableDiffusion3Pipeline):
    """Its pipeline class."""


class FakeAdapter(SD3Adapter):
    transformer_class = FakeTransformer


@pytest.fixture()
def fake_family() -> Iterator[Family]:
    family = register_family(Family("fake", FakeAdapter, {FakePipeline: PipelineSpec(call_defaults={}, text_tokenizer="tokenizer_3")}))
    yield family
    del FAMILIES["fake"], ADAPTERS[FakeTransformer], PIPELINES[FakePipeline]


def test_a_new_family_is_one_adapter_class_and_one_registration(fake_family: Family, tiny_pipelines: dict[str, Any]) -> None:
    tiny = tiny_pipelines["tiny-sd3"]
    transformer = FakeTransformer.from_config(tiny.transformer.config)
    transformer.load_state_dict(tiny.transformer.state_dict())
    pipe = FakePipeline(**{**tiny.components, "transformer": transformer.eval()})
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(**call_kwargs(pipe)).images
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3, trace=True))
    got = fast(**call_kwargs(pipe)).images
    assert isinstance(fast.adapter, FakeAdapter) and fast.last_trace[-1].kind == "pruned"
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4


def test_a_registered_familys_own_transformer_class_is_a_bundles_weightless_stand_in(
    fake_family: Family, tiny_pipelines: dict[str, Any], tmp_path: Path
) -> None:
    """An onnxruntime or TensorRT bundle loads its model folder without the transformer's weights and makes a stand-in
    of the transformer class the folder names: that class was looked up in diffusers alone, so the bundle of a family
    whose transformer class is its own (registered with register_family) built, then failed to load ("could not load
    the model folder ... (AttributeError: module diffusers has no attribute FakeTransformer)")."""
    from catrt.loading import load_pipeline

    tiny = tiny_pipelines["tiny-sd3"]
    FakePipeline(**{**tiny.components, "transformer": FakeTransformer.from_config(tiny.transformer.config)}).save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path), transformer_weights=False)
    assert type(loaded) is FakePipeline and type(loaded.transformer) is FakeTransformer
    assert {parameter.device.type for parameter in loaded.transformer.parameters()} == {"meta"}
    assert isinstance(make_adapter(loaded.transformer), FakeAdapter)


#: A family's own subclass that keeps diffusers' class name (type() records this module as its __module__).
SameNameTransformer = type("SD3Transformer2DModel", (SD3Transformer2DModel,), {"__doc__": "A subclass named as diffusers'."})


class SameNamePipeline(StableDiffusion3Pipeline):
    """Its pipeline class."""


class SameNameAdapter(SD3Adapter):
    transformer_class = SameNameTransformer


def test_a_familys_transformer_class_named_as_diffusers_one_is_its_weightless_stand_in(
    tiny_pipelines: dict[str, Any], tmp_path: Path
) -> None:
    """model_index.json names a transformer as [module, class]: a family's subclass called SD3Transformer2DModel was
    looked up in diffusers by its name alone, so a bundle's weightless stand-in was diffusers' class with SD3's adapter
    while the weighted load (eager) had the family's class and adapter."""
    from catrt.loading import load_pipeline

    register_family(Family("same-name", SameNameAdapter, {SameNamePipeline: PipelineSpec(call_defaults={}, text_tokenizer="tokenizer_3")}))
    try:
        tiny = tiny_pipelines["tiny-sd3"]
        SameNamePipeline(**{**tiny.components, "transformer": SameNameTransformer.from_config(tiny.transformer.config)}).save_pretrained(tmp_path)
        loaded = load_pipeline(str(tmp_path), transformer_weights=False)
        assert type(loaded.transformer) is SameNameTransformer and isinstance(make_adapter(loaded.transformer), SameNameAdapter)
    finally:
        del FAMILIES["same-name"], ADAPTERS[SameNameTransformer], PIPELINES[SameNamePipeline]


def test_a_transformer_class_neither_diffusers_nor_a_family_has_is_named_with_the_fix(
    tiny_pipelines: dict[str, Any], tmp_path: Path
) -> None:
    """A folder of an unregistered family's transformer, loaded weightless (a bundle's stand-in), said only "module
    diffusers has no attribute ...": the line names the class and that its family must be registered first."""
    from catrt.loading import load_pipeline

    tiny_pipelines["tiny-sd3"].save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "transformer": ["their_package.models", "TheirTransformer"]}))
    with pytest.raises(ConfigError, match=re.escape(
        "transformer class 'TheirTransformer' is neither diffusers' nor a registered catrt family's; register its family "
        "(catrt.models.register_family) before loading")):
        load_pipeline(str(tmp_path), transformer_weights=False)


def test_an_unregistered_pipeline_is_refused(tiny_pipelines: dict[str, Any]) -> None:
    tiny = tiny_pipelines["tiny-sd3"]
    with pytest.raises(UnsupportedModelError, match="catrt cannot accelerate FakePipeline"):
        catrt.accelerate(FakePipeline(**tiny.components))


def test_a_pipeline_class_handed_to_accelerate_is_refused_naming_the_class_and_the_fix(fake_family: Family) -> None:
    """`catrt.accelerate(FluxPipeline)` (the class, as the issue writes it) was refused as "catrt cannot accelerate type;
    supported pipelines: FluxPipeline, ...": the class it names as supported is the one the user passed."""
    for cls in (FluxPipeline, FakePipeline):  # a built-in family's class and a registered one's
        with pytest.raises(UnsupportedModelError, match=re.escape(
            f"catrt cannot accelerate the class {cls.__name__} itself: pass a loaded pipeline ({cls.__name__}.from_pretrained(...)"
        )) as caught:
            catrt.accelerate(cls)
        assert (caught.value.field, caught.value.value) == ("pipe", cls.__name__)
    with pytest.raises(UnsupportedModelError, match="^catrt cannot accelerate StableDiffusion3Img2ImgPipelineSubclass; supported"):
        catrt.accelerate(type("StableDiffusion3Img2ImgPipelineSubclass", (StableDiffusion3Img2ImgPipeline,), {}))


class HalfAdapter(Adapter):
    """An adapter that names its transformer class and implements nothing else."""

    transformer_class = FakeTransformer


class NoClassAdapter(SD3Adapter):
    transformer_class = None  # type: ignore[assignment]


def _spec() -> PipelineSpec:
    return PipelineSpec(call_defaults={}, text_tokenizer="tokenizer_3")


@pytest.mark.parametrize(
    ("family", "message"),
    [
        (lambda: Family("fake", HalfAdapter, {FakePipeline: _spec()}),
         "family 'fake': HalfAdapter does not implement check_layout, context_inputs, first_block, num_kv_slots, run_blocks"),
        (lambda: Family("fake", NoClassAdapter, {FakePipeline: _spec()}),
         "NoClassAdapter.transformer_class must be the diffusers transformer class it serves"),
        (lambda: Family("fake", object, {FakePipeline: _spec()}), "Family.adapter must be a subclass of catrt's Adapter"),
        (lambda: Family("fake", FakeAdapter, [FakePipeline]), "Family.pipelines must be a non-empty dict"),
        (lambda: Family("fake", FakeAdapter, {FakePipeline: {"guidance": "cfg"}}), "maps pipeline classes to PipelineSpec"),
        (lambda: Family("", FakeAdapter, {FakePipeline: _spec()}), "Family.name must be a non-empty string"),
        (lambda: Family("sd3", FakeAdapter, {FakePipeline: _spec()}), "family named 'sd3' is built in and already registered"),
        (lambda: Family("fake", SD3Adapter, {FakePipeline: _spec()}), "SD3Transformer2DModel is already served by family 'sd3'"),
        (lambda: Family("fake", FakeAdapter, {StableDiffusion3Pipeline: _spec()}),
         "pipeline class StableDiffusion3Pipeline is already registered by family 'sd3'"),
    ],
)
def test_a_half_filled_or_clashing_family_is_refused_by_name_and_registers_nothing(family: Any, message: str) -> None:
    before = (dict(FAMILIES), dict(ADAPTERS), dict(PIPELINES))
    with pytest.raises(ConfigError, match=re.escape(message)):
        register_family(family())
    assert (FAMILIES, ADAPTERS, PIPELINES) == before  # the built-in families are untouched
    assert FAMILIES["sd3"].adapter is SD3Adapter


def test_registering_the_same_family_twice_changes_nothing(fake_family: Family) -> None:
    assert register_family(fake_family) is fake_family and FAMILIES["fake"] is fake_family


def test_a_user_family_registered_again_under_its_name_replaces_the_earlier_one(fake_family: Family) -> None:
    class OtherTransformer(SD3Transformer2DModel):
        pass

    class OtherPipeline(StableDiffusion3Pipeline):
        pass

    class OtherAdapter(SD3Adapter):
        transformer_class = OtherTransformer

    again = register_family(Family("fake", OtherAdapter, {OtherPipeline: _spec()}))
    try:
        assert FAMILIES["fake"] is again and ADAPTERS[OtherTransformer] is OtherAdapter and OtherPipeline in PIPELINES
        assert FakeTransformer not in ADAPTERS and FakePipeline not in PIPELINES  # the earlier one is gone, not half left
    finally:
        register_family(fake_family)  # the fixture's teardown removes its own entries
        assert OtherTransformer not in ADAPTERS and OtherPipeline not in PIPELINES


def test_a_pipeline_spec_with_an_unknown_guidance_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="PipelineSpec.guidance must be one of cfg, distilled, got 'CFG'"):
        PipelineSpec(call_defaults={}, guidance="CFG")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="PipelineSpec.token_grid must be None or a function"):
        PipelineSpec(call_defaults={}, token_grid=Grid(4, 6))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="register_pipeline takes a pipeline class and a catrt PipelineSpec"):
        register_pipeline(FakePipeline, {"guidance": "cfg"})  # type: ignore[arg-type]


# -- a family from scratch: not a diffusers transformer, packed tokens, a learned position table ------------


class ToyTransformer(torch.nn.Module):
    """Two attention blocks over packed (B, N, 4) tokens and the text, with a learned position table."""

    def __init__(self, channels: int = 4, width: int = 16, heads: int = 2, max_tokens: int = 64) -> None:
        super().__init__()
        self.config = SimpleNamespace(patch_size=1, in_channels=channels)  # what the Adapter base reads
        self.out_channels, self.inner_dim, self.heads = channels, width, heads
        self.embed, self.time, self.text = torch.nn.Linear(channels, width), torch.nn.Linear(1, width), torch.nn.Linear(8, width)
        self.positions = torch.nn.Parameter(torch.randn(max_tokens, width) * 0.1)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, 3 * width) for _ in range(2))
        self.proj_out = torch.nn.Linear(width, channels)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, return_dict: bool = True) -> Any:
        tokens = self.embed(hidden_states) + self.positions[: hidden_states.shape[1]]
        for block in self.blocks:
            tokens = _toy_block(self, block, tokens, timestep, encoder_hidden_states, None)
        return (self.proj_out(tokens),)


def _toy_block(model: ToyTransformer, block: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, store: Any) -> torch.Tensor:
    x = x + model.time(timestep.float()[:, None])[:, None]
    query, key, value = block(x).chunk(3, -1)
    if store is not None:  # the image K/V through the cache
        key, value = store.exchange(0, key), store.exchange(1, value)
    _, text_key, text_value = block(model.text(text)).chunk(3, -1)
    return x + attention(query, torch.cat([key, text_key], 1), torch.cat([value, text_value], 1), model.heads)


class ToyPipeline:
    """A pipeline of its own (no diffusers): a few Euler-like steps over packed latents."""

    def __init__(self, transformer: ToyTransformer) -> None:
        self.transformer = transformer

    def __call__(self, prompt_embeds: torch.Tensor, height: int = 4, width: int = 6, num_inference_steps: int = 6, seed: int = 0) -> Any:
        latents = torch.randn(prompt_embeds.shape[0], height * width, 4, generator=torch.Generator().manual_seed(seed))
        for step in range(num_inference_steps):
            timestep = torch.full((latents.shape[0],), 1.0 - step / num_inference_steps)
            latents = latents - 0.1 * self.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        return SimpleNamespace(images=latents)


class ToyAdapter(PackedTokensAdapter):
    """The whole adapter of the toy family: packed tokens (the layout FLUX uses too), K/V slots, the blocks."""

    transformer_class = ToyTransformer

    def check_layout(self, transformer: torch.nn.Module) -> None:
        pass

    @property
    def num_kv_slots(self) -> int:
        return 2 * len(self.transformer.blocks)

    def embed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed(hidden_states) + self.transformer.positions[: hidden_states.shape[1]]

    def embed_patches(self, patches: torch.Tensor, indices: torch.Tensor, context: dict) -> torch.Tensor:
        return self.transformer.embed(patches) + self.transformer.positions[indices]

    def context_inputs(self, call_kwargs: dict[str, Any]) -> dict:
        return {"encoder_hidden_states": call_kwargs["encoder_hidden_states"]}

    def prepare_context(self, inputs: dict, latent_shape: tuple[int, ...]) -> dict:
        return dict(inputs)

    def run_blocks(self, tokens: torch.Tensor, timestep: torch.Tensor, context: dict, store: Any) -> torch.Tensor:
        model, text = self.transformer, context["encoder_hidden_states"]
        for index, block in enumerate(model.blocks):
            tokens = store.run_block(lambda b, s, x: _toy_block(model, b, x, timestep, text, s), block, 2 * index, 2, tokens)
        return model.proj_out(tokens)

    def first_block(self, tokens: torch.Tensor, timestep: torch.Tensor, context: dict) -> torch.Tensor:
        return _toy_block(self.transformer, self.transformer.blocks[0], tokens, timestep, context["encoder_hidden_states"], None)


@pytest.fixture()
def toy_family() -> Iterator[Family]:
    grid = lambda pipe, arguments: Grid(arguments["height"], arguments["width"])  # noqa: E731
    family = register_family(Family("toy", ToyAdapter, {ToyPipeline: PipelineSpec(call_defaults={}, token_grid=grid)}))
    yield family
    del FAMILIES["toy"], ADAPTERS[ToyTransformer], PIPELINES[ToyPipeline]


@torch.no_grad()
def test_a_family_from_scratch_is_one_adapter_class_and_one_registration(toy_family: Family) -> None:
    torch.manual_seed(0)
    pipe, prompts = ToyPipeline(ToyTransformer().eval()), torch.randn(2, 5, 8)
    expected = pipe(prompts).images
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=2, trace=True))
    assert float((fast(prompts).images - expected).abs().max()) < 1e-5  # alpha = 1 is the plain pipeline
    assert [record.kind for record in fast.last_trace] == ["full"] * 2 + ["pruned"] * 4
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.5, t0=2, n_clusters=4, trace=True))
    pruned = fast(prompts, height=3, width=8).images
    assert pruned.shape == (2, 24, 4) and torch.isfinite(pruned).all()
    for record in fast.last_trace[2:]:
        assert record.indices.shape == (2, 12) and all(len(set(row.tolist())) == 12 for row in record.indices)


def test_a_transformer_without_what_the_adapter_base_reads_is_refused_by_name(toy_family: Family) -> None:
    transformer = ToyTransformer()
    del transformer.config.patch_size
    with pytest.raises(UnsupportedModelError, match=r"ToyAdapter: the Adapter base reads transformer.config.patch_size, which ToyTransformer does not have"):
        catrt.accelerate(ToyPipeline(transformer))


def test_mac_counting_of_a_family_without_a_meta_call_is_refused_by_name(fake_family: Family) -> None:
    card = replace(MODEL_CARDS["sd3"], name="fake-medium", hub_id=None, family="fake")
    with pytest.raises(UnsupportedModelError, match="model fake-medium: family 'fake' registers no meta_call, which MAC counting needs"):
        meta_inputs(card, Grid(4, 4))


# -- what a family declares about image sizes ------------------------------------------------------


class SmallTableTransformer(SD3Transformer2DModel):
    """A transformer whose positions cover fewer tokens a side than its config's pos_embed_max_size says."""


class SmallTablePipeline(StableDiffusion3Pipeline):
    pass


class SmallTableAdapter(SD3Adapter):
    transformer_class = SmallTableTransformer

    @property
    def max_grid_side(self) -> int:
        return 4


@pytest.fixture()
def small_table_family() -> Iterator[Family]:
    family = register_family(Family("small-table", SmallTableAdapter, {SmallTablePipeline: _spec()}))
    yield family
    del FAMILIES["small-table"], ADAPTERS[SmallTableTransformer], PIPELINES[SmallTablePipeline]


def test_a_familys_own_grid_limit_bounds_the_sizes_catrt_accepts(small_table_family: Family, tiny_pipelines: dict[str, Any]) -> None:
    """The size check asks the adapter (`max_grid_side`); it read `pos_embed_max_size` as SD3's table side for every
    family, so a family whose table is laid out otherwise (AuraFlow's) was let through to an IndexError in diffusers."""
    from catrt.generation import check_pipeline_size, pipeline_size_limits

    tiny = tiny_pipelines["tiny-sd3"]
    pipe = SmallTablePipeline(**{**tiny.components, "transformer": SmallTableTransformer.from_config(tiny.transformer.config)})
    assert pipeline_size_limits(pipe) == (16, 64) and pipeline_size_limits(tiny) == (16, 96 * 16)
    check_pipeline_size(pipe, 64, 48, "small")
    with pytest.raises(ConfigError, match="width 80 does not fit model small, which takes multiples of 16 up to 64 pixels; try width 64"):
        check_pipeline_size(pipe, 64, 80, "small")


class LargeDefaultPipeline(StableDiffusion3Pipeline):
    """A pipeline whose own call defaults to a fixed size (as AuraFlow's 1024), not to its sample size."""

    def __call__(self, *args: Any, height: int = 2048, width: int = 2048, **kwargs: Any) -> Any:
        return super().__call__(*args, height=height, width=width, **kwargs)


def test_a_call_without_a_size_is_checked_at_the_size_the_pipeline_then_runs(tiny_pipelines: dict[str, Any]) -> None:
    """`catrt generate` without --height runs the pipeline's own default: that size is checked (it was not checked at all,
    and build and serve took the sample size where the pipeline itself would run another)."""
    from catrt.generation import check_pipeline_size
    from catrt.pipeline import default_image_size

    tiny = tiny_pipelines["tiny-sd3"]
    pipe = LargeDefaultPipeline(**tiny.components)
    assert default_image_size(pipe) == 2048 and default_image_size(tiny) == 256
    with pytest.raises(ConfigError, match="width 2048 does not fit model large, which takes multiples of 16 up to 1536 pixels"):
        check_pipeline_size(pipe, None, None, "large")
    check_pipeline_size(tiny, None, None, "tiny-sd3")


def test_every_model_cards_size_limit_is_its_adapters() -> None:
    """The CLI checks a published model's size from its card before loading; the loaded pipeline's check asks the adapter."""
    from catrt.model_cards import size_limits

    for card in MODEL_CARDS.values():
        with torch.device("meta"):
            transformer = FAMILIES[card.family].adapter.transformer_class.from_config(card.transformer_config)
        side = make_adapter(transformer).max_grid_side
        multiple, largest = size_limits(card)
        assert largest == (None if side is None else side * multiple), card.name
    sd3 = replace(MODEL_CARDS["sd3"], max_grid_side=64)
    assert size_limits(sd3) == (16, 1024) and size_limits(MODEL_CARDS["sd3"]) == (16, 192 * 16)
