"""Adapters per layout (SD3, SD3.5, PixArt-Sigma, FLUX dev / schnell): equal diffusers' forward; pruned with k = N equals full."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

import catrt
from catrt import CATConfig, ConfigError, UnsupportedModelError
from catrt.models import make_adapter
from catrt.runtime import CATRuntime
from catrt.tiny import build_tiny_pipeline
from catrt.tokens import Grid
from tests.conftest import TINY_NAMES, call_kwargs
from tests.test_selection import NoHostSync


GRID = Grid(4, 6)  # 24 image tokens: an 8x12 latent in 2x2 patches, or 24 packed FLUX tokens


def _inputs(transformer: Any, batch: int = 2, height: int = 8, width: int = 12) -> tuple[torch.Tensor, torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(0)
    config = transformer.config
    timestep = torch.tensor([700.0, 300.0][:batch])
    if hasattr(config, "axes_dims_rope"):  # FLUX: packed latents, position ids, timestep in [0, 1]
        rows, cols = height // 2, width // 2
        ids = torch.zeros(rows, cols, 3)
        ids[..., 1] += torch.arange(rows)[:, None]
        ids[..., 2] += torch.arange(cols)[None, :]
        kwargs = {
            "encoder_hidden_states": torch.randn(batch, 9, config.joint_attention_dim, generator=gen),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=gen),
            "txt_ids": torch.zeros(9, 3),
            "img_ids": ids.reshape(-1, 3),
            "guidance": torch.full((batch,), 3.5) if config.guidance_embeds else None,
            "joint_attention_kwargs": {},
        }
        return torch.randn(batch, rows * cols, config.in_channels, generator=gen), timestep / 1000, kwargs
    latents = torch.randn(batch, config.in_channels, height, width, generator=gen)
    if hasattr(config, "joint_attention_dim"):
        kwargs = {
            "encoder_hidden_states": torch.randn(batch, 9, config.joint_attention_dim, generator=gen),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=gen),
        }
    else:
        mask = torch.ones(batch, 9)
        mask[0, 6:] = 0
        kwargs = {
            "encoder_hidden_states": torch.randn(batch, 9, config.caption_channels, generator=gen),
            "encoder_attention_mask": mask,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    return latents, timestep, kwargs


@pytest.fixture(params=TINY_NAMES)
def transformer(request: pytest.FixtureRequest, tiny_pipelines: dict[str, Any]) -> Any:
    return tiny_pipelines[request.param].transformer


def _context(adapter: Any, kwargs: dict, latents: torch.Tensor) -> dict:
    return adapter.prepare_context(adapter.context_inputs(kwargs), tuple(latents.shape))


def _empty_cache(adapter: Any, batch: int = 2, num: int = 24) -> torch.Tensor:
    return torch.full((adapter.num_kv_slots, batch, num, adapter.hidden_dim), float("nan"))


@torch.no_grad()
def test_full_forward_equals_diffusers(transformer: Any) -> None:
    adapter = make_adapter(transformer)
    latents, timestep, kwargs = _inputs(transformer)
    expected = transformer(hidden_states=latents, timestep=timestep, return_dict=False, **kwargs)[0]
    context = _context(adapter, kwargs, latents)
    cache = _empty_cache(adapter)
    tokens = adapter.full_forward(latents, timestep, context, cache)
    got = adapter.prediction_of(tokens, GRID)
    assert (got - expected).abs().max() < 1e-4
    assert not cache.isnan().any()  # every slot, every row written in place
    exported_tokens, kv = adapter.export_full(latents, timestep, context)
    assert torch.equal(exported_tokens, tokens)
    assert torch.equal(kv, cache)


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-flux", "tiny-flux-schnell"])
def test_fp32_flux_full_forward_equals_diffusers_exactly(name: str, tiny_pipelines: dict[str, Any]) -> None:
    """FLUX's full step is diffusers' forward bit for bit in float32 too: its attention runs over [text, image] keys,
    diffusers' order (image keys first, in both block kinds, summed the float32 softmax otherwise: some 5e-7 off)."""
    transformer = tiny_pipelines[name].transformer
    adapter = make_adapter(transformer)
    latents, timestep, kwargs = _inputs(transformer)
    expected = transformer(hidden_states=latents, timestep=timestep, return_dict=False, **kwargs)[0]
    tokens = adapter.full_forward(latents, timestep, _context(adapter, kwargs, latents), _empty_cache(adapter))
    assert torch.equal(adapter.prediction_of(tokens, GRID), expected)


@torch.no_grad()
def test_pruned_step_with_all_tokens_equals_full_step(transformer: Any) -> None:
    adapter = make_adapter(transformer)
    latents, timestep, kwargs = _inputs(transformer)
    context = _context(adapter, kwargs, latents)
    tokens, kv = adapter.export_full(latents, timestep, context)
    gen = torch.Generator().manual_seed(1)
    indices = torch.stack([torch.randperm(24, generator=gen) for _ in range(2)])  # k = N, shuffled
    patches = adapter.tokens_of(latents)
    patches = patches.gather(1, indices.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    stale_cache = torch.randn(kv.shape, generator=gen)  # every row is overwritten when k = N
    out, rows = adapter.export_pruned(patches, indices, timestep, context, stale_cache.clone())
    expected = tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    assert (out - expected).abs().max() < 1e-4
    expected_rows = kv.gather(2, indices.view(1, 2, 24, 1).expand(kv.shape[0], -1, -1, kv.shape[-1]))
    assert (rows - expected_rows).abs().max() < 1e-4
    in_place = adapter.pruned_forward(patches, indices, timestep, context, stale_cache)
    assert (in_place - expected).abs().max() < 1e-4
    assert (stale_cache - kv).abs().max() < 1e-4  # the cache itself now holds the fresh rows


@torch.no_grad()
def test_pruned_step_writes_only_the_selected_rows_in_place(transformer: Any) -> None:
    adapter = make_adapter(transformer)
    latents, timestep, kwargs = _inputs(transformer)
    context = _context(adapter, kwargs, latents)
    _, kv = adapter.export_full(latents, timestep, context)
    indices = torch.tensor([[3, 0, 17, 9, 22, 5, 11, 14], [1, 2, 23, 8, 7, 20, 16, 4]])
    patches = adapter.tokens_of(latents + 0.5)
    patches = patches.gather(1, indices.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    cache = kv.clone()
    address = cache.data_ptr()
    out = adapter.pruned_forward(patches, indices, timestep, context, cache)
    expected_out, rows = adapter.export_pruned(patches, indices, timestep, context, kv)
    assert cache.data_ptr() == address
    assert torch.allclose(out, expected_out, atol=1e-6)
    selected = torch.zeros(2, 24, dtype=torch.bool).scatter(1, indices, True)
    assert torch.equal(cache[:, ~selected], kv[:, ~selected])  # untouched rows are the old cache
    index = indices.view(1, 2, 8, 1).expand(kv.shape[0], -1, -1, kv.shape[-1])
    assert torch.allclose(cache.gather(2, index), rows, atol=1e-6)


@torch.no_grad()
def test_unselected_tokens_keep_their_cached_output(transformer: Any) -> None:
    adapter = make_adapter(transformer)
    latents, _, kwargs = _inputs(transformer)
    runtime = CATRuntime(adapter, CATConfig(alpha=0.3, t0=2, trace=True), steps=5, guidance=False, grid=GRID)
    previous = None
    for step in range(1, 6):
        timestep = torch.full((2,), 1000.0 - 150 * step)
        with NoHostSync():  # the whole runtime step, selection included, stays on the device
            out = runtime(latents + 0.1 * step, timestep, kwargs)
        tokens = patchify_output(out, adapter.patch_size) if out.ndim == 4 else out.clone()  # the buffer is reused
        record = runtime.trace[-1]
        if record.kind == "pruned":
            assert record.indices.shape == (2, 8)
            unselected = torch.ones(2, 24, dtype=torch.bool).scatter(1, record.indices, False)
            assert torch.equal(tokens[unselected], previous[unselected])
            assert not torch.equal(tokens[~unselected], previous[~unselected])
        previous = tokens
    assert [r.kind for r in runtime.trace] == ["full", "full", "pruned", "pruned", "pruned"]


def patchify_output(sample: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C) in diffusers' output token order (inverse of unpatchify)."""
    b, c, h, w = sample.shape
    p = patch_size
    return sample.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)


def test_custom_attention_processor_is_refused(tiny_pipelines: dict[str, Any]) -> None:
    transformer = type(tiny_pipelines["tiny-pixart"].transformer).from_config(
        tiny_pipelines["tiny-pixart"].transformer.config
    )
    transformer.set_attn_processor(AttnProcessor())
    with pytest.raises(UnsupportedModelError, match="attention processor AttnProcessor"):
        make_adapter(transformer)


def test_unknown_transformer_class_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="no catrt adapter for transformer class Linear"):
        make_adapter(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", TINY_NAMES)
def test_a_torch_compiled_transformer_is_refused_with_the_fix(tiny_pipelines: dict[str, Any], name: str) -> None:
    """`pipe.transformer = torch.compile(pipe.transformer)` is how many users speed up diffusers; catrt never
    calls that wrapper, so the refusal says how to unwrap it and which backend compiles catrt's steps."""
    compiled = torch.compile(tiny_pipelines[name].transformer)
    with pytest.raises(UnsupportedModelError, match=r"torch\.compile wrapper of .*_orig_mod.*backend=\"compile\""):
        make_adapter(compiled)
    with pytest.raises(UnsupportedModelError, match="no catrt adapter for transformer class OptimizedModule"):
        make_adapter(torch.compile(torch.nn.Linear(2, 2)))


def test_resolution_the_patch_grid_cannot_take(tiny_pipelines: dict[str, Any]) -> None:
    adapter = make_adapter(tiny_pipelines["tiny-sd3"].transformer)
    with pytest.raises(ConfigError, match=r"latent size 9x12 is not divisible by the patch size 2"):
        adapter.grid(9, 12)


@torch.no_grad()
def test_attention_recorder_sums_the_mass_image_keys_receive(tiny_pipelines: dict[str, Any]) -> None:
    from catrt.models.base import AttentionRecorder

    transformer = tiny_pipelines["tiny-pixart"].transformer
    adapter = make_adapter(transformer)
    latents, timestep, kwargs = _inputs(transformer)
    context = _context(adapter, kwargs, latents)
    adapter.recorder = AttentionRecorder()
    try:
        adapter.full_forward(latents, timestep, context, _empty_cache(adapter))
        importance = adapter.recorder.importance
    finally:
        adapter.recorder = None
    # Self-attention only: every query row's probabilities sum to 1 over the 24 image keys.
    blocks, num_heads = len(transformer.transformer_blocks), transformer.config.num_attention_heads
    assert importance.shape == (2, 24)
    assert torch.allclose(importance.sum(-1), torch.full((2,), float(blocks * num_heads * 24)), rtol=1e-5)


@torch.no_grad()
def test_flux_attention_recorder_sums_what_diffusers_image_keys_receive(
    tiny_pipelines: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLUX attends over [text, image] keys (diffusers' order) and records the mass its image keys receive, which
    diffusers' own attention gives them: the sum over heads and queries of softmax(Q K^T / sqrt(d)) over the image
    key columns (the last N of diffusers' keys) of every double and single block."""
    import diffusers.models.transformers.transformer_flux as flux_module

    from catrt.models.base import AttentionRecorder

    transformer = tiny_pipelines["tiny-flux"].transformer
    adapter = make_adapter(transformer)
    latents, timestep, kwargs = _inputs(transformer)
    num_image = latents.shape[1]
    expected = torch.zeros(latents.shape[0], num_image)
    dispatch = flux_module.dispatch_attention_fn

    def observed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **options: Any) -> torch.Tensor:
        nonlocal expected  # (B, L, H, d), text rows first
        scores = query.transpose(1, 2) @ key.transpose(1, 2).transpose(-1, -2) / query.shape[-1] ** 0.5
        expected = expected + scores.softmax(-1)[..., -num_image:].sum(dim=(1, 2))
        return dispatch(query, key, value, **options)

    monkeypatch.setattr(flux_module, "dispatch_attention_fn", observed)
    transformer(hidden_states=latents, timestep=timestep, return_dict=False, **kwargs)
    adapter.recorder = AttentionRecorder()
    try:
        adapter.full_forward(latents, timestep, _context(adapter, kwargs, latents), _empty_cache(adapter))
        importance = adapter.recorder.importance
    finally:
        adapter.recorder = None
    assert torch.allclose(importance, expected, rtol=1e-5, atol=1e-5)


def test_attention_rule_needs_the_eager_backend(tiny_pipelines: dict[str, Any]) -> None:
    adapter = make_adapter(tiny_pipelines["tiny-sd3"].transformer)

    class OtherBackend:
        full_forward = adapter.full_forward
        pruned_forward = adapter.pruned_forward

    with pytest.raises(ConfigError, match="attention rule needs attention maps"):
        CATRuntime(adapter, CATConfig(rule="attention"), steps=10, guidance=False, functions=OtherBackend())


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd3.5", "tiny-pixart"])
def test_fused_qkv_projections_are_refused_with_the_way_to_unfuse(name: str) -> None:
    """`transformer.fuse_qkv_projections()` swaps in diffusers' fused processors; the refusal says how to undo it, and
    once unfused the transformer is accepted again."""
    from catrt.loading import load_pipeline

    transformer = load_pipeline(name).transformer
    transformer.fuse_qkv_projections()
    with pytest.raises(UnsupportedModelError, match=r"uses attention processor Fused.*; unfuse it with "
                                                    r"pipe\.transformer\.unfuse_qkv_projections\(\)$"):
        make_adapter(transformer)
    transformer.unfuse_qkv_projections()
    make_adapter(transformer)
    transformer.set_attn_processor(AttnProcessor())
    with pytest.raises(UnsupportedModelError, match="attention processor AttnProcessor") as refused:
        make_adapter(transformer)
    assert "unfuse" not in str(refused.value)


@pytest.mark.parametrize(("name", "layers", "message"), [
    ("tiny-sd3", {"num_layers": 0}, "SD3Transformer2DModel with num_layers 0 has"),
    ("tiny-pixart", {"num_layers": 0}, "PixArtTransformer2DModel with num_layers 0 has"),
    ("tiny-flux", {"num_layers": 0, "num_single_layers": 0}, "FluxTransformer2DModel with num_layers 0 and num_single_layers 0 has"),
])
def test_a_transformer_without_blocks_is_refused_naming_its_layer_counts(
    name: str, layers: dict[str, int], message: str, tiny_pipelines: dict[str, Any]
) -> None:
    """A config with no blocks has no attention to prune; its export and MAC count failed in torch.stack on an empty
    list (PixArt's context already at the first step). FLUX with one kind of block only is a layout catrt runs."""
    config = tiny_pipelines[name].transformer.config
    with torch.device("meta"):
        transformer = type(tiny_pipelines[name].transformer).from_config({**config, **layers})
    with pytest.raises(UnsupportedModelError, match=f"^{message} no transformer blocks: .*nothing to prune") as refused:
        make_adapter(transformer)
    assert (refused.value.field, refused.value.value) == ("num_layers", 0)
    if name == "tiny-flux":
        for only in ({"num_layers": 0}, {"num_single_layers": 0}):
            with torch.device("meta"):
                assert make_adapter(type(transformer).from_config({**config, **only})).num_kv_slots == 4


def _pixart_alpha_1024_layout(tiny_pipelines: dict[str, Any]) -> Any:
    """tiny-pixart at PixArt-Alpha 1024's layout: sample_size 128 turns on diffusers' resolution and aspect-ratio
    embedding (use_additional_conditions unset), whose three size embeddings need a width divisible by 3."""
    torch.manual_seed(0)
    config = {**tiny_pipelines["tiny-pixart"].transformer.config, "sample_size": 128, "use_additional_conditions": None,
              "num_attention_heads": 3, "cross_attention_dim": 24}
    return type(tiny_pipelines["tiny-pixart"].transformer).from_config(config).eval()


@torch.no_grad()
def test_pixart_alpha_1024_embeds_the_size_it_is_given_and_refuses_a_call_without_it(tiny_pipelines: dict[str, Any]) -> None:
    """The resolution and aspect ratio enter every step's modulation: alpha = 1 is diffusers' forward with them. A call
    without them (PixArtSigmaPipeline never passes them) is refused naming them, where it failed on None in diffusers."""
    transformer = _pixart_alpha_1024_layout(tiny_pipelines)
    assert transformer.use_additional_conditions
    adapter = make_adapter(transformer)
    latents, timestep, kwargs = _inputs(transformer)
    sized = {**kwargs, "added_cond_kwargs": {"resolution": torch.tensor([[64.0, 96.0]] * 2),
                                             "aspect_ratio": torch.tensor([[64 / 96]] * 2)}}
    expected = transformer(hidden_states=latents, timestep=timestep, return_dict=False, **sized)[0]
    unsized = transformer(hidden_states=latents, timestep=timestep, return_dict=False, **{
        **sized, "added_cond_kwargs": {"resolution": torch.tensor([[1024.0, 1024.0]] * 2), "aspect_ratio": torch.ones(2, 1)}})[0]
    assert (expected - unsized).abs().max() > 1e-3  # the size is an input that matters
    tokens = adapter.full_forward(latents, timestep, _context(adapter, sized, latents), _empty_cache(adapter, num=24))
    assert (adapter.prediction_of(tokens, GRID) - expected).abs().max() < 1e-4
    for missing in ("resolution", "aspect_ratio"):
        call = {**sized, "added_cond_kwargs": {**sized["added_cond_kwargs"], missing: None}}
        with pytest.raises(ConfigError, match=f"use_additional_conditions.*the call needs added_cond_kwargs '{missing}'") as refused:
            adapter.context_inputs(call)
        assert refused.value.field == "added_cond_kwargs"


def test_a_size_past_the_positional_table_is_refused_naming_the_side(tiny_pipelines: dict[str, Any]) -> None:
    """A Python caller's size is checked by nothing before the first step: one token past pos_embed_max_size failed in
    diffusers' positional embedding (an IndexError in torch for AuraFlow's table); the limit itself is taken."""
    config = {**tiny_pipelines["tiny-sd3"].transformer.config, "pos_embed_max_size": 6}
    with torch.device("meta"):
        adapter = make_adapter(type(tiny_pipelines["tiny-sd3"].transformer).from_config(config))
    assert adapter.grid(12, 8) == Grid(6, 4) and adapter.grid(4, 12) == Grid(2, 6)
    with pytest.raises(ConfigError, match=r"^latent size 14x8 is 7x4 tokens, but this SD3Transformer2DModel's positions "
                                          r"cover at most 6 tokens a side \(pos_embed_max_size\); choose an image size "
                                          r"whose latent is at most 12 a side$") as refused:
        adapter.grid(14, 8)
    assert (refused.value.field, refused.value.value) == ("height", (14, 8))
    with pytest.raises(ConfigError, match="is 2x7 tokens") as refused:
        adapter.grid(4, 14)
    assert refused.value.field == "width"


@pytest.mark.parametrize(("key", "message"), [
    ("cross_attention_dim", r"PixArt block 0: .*; this one has no cross-attention \(its config's cross_attention_dim is None\)$"),
    ("caption_channels", r"^PixArt transformer without caption projection is not supported \(its config's caption_channels is None"),
])
def test_a_pixart_config_without_text_conditioning_is_refused_naming_its_key(
    key: str, message: str, tiny_pipelines: dict[str, Any]
) -> None:
    """diffusers builds and runs both (without cross-attention the text is read by nothing); the refusals said what
    catrt does not take but not which config key made it so."""
    config = {**tiny_pipelines["tiny-pixart"].transformer.config, key: None}
    with torch.device("meta"):
        transformer = type(tiny_pipelines["tiny-pixart"].transformer).from_config(config)
    with pytest.raises(UnsupportedModelError, match=message) as refused:
        make_adapter(transformer)
    assert refused.value.field == key


class _UnfusedLoraConv(torch.nn.Module):
    """What PEFT makes of a LoRA on a Conv2d: the layer's forward adds the low-rank update, `weight` is the base's."""

    def __init__(self, base: torch.nn.Conv2d) -> None:
        super().__init__()
        self.base_layer, self.merged, self.disable_adapters = base, False, False
        self.lora = torch.nn.Conv2d(base.in_channels, base.out_channels, base.kernel_size, base.stride, bias=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (0 if self.merged or self.disable_adapters else self.lora(x))


def test_an_unfused_lora_on_the_patch_embedding_is_refused_and_a_fused_one_runs(tiny_pipelines: dict[str, Any]) -> None:
    """A pruned step embeds its patches with pos_embed.proj.weight: with an unfused LoRA there (checked with PEFT 0.21),
    pruned steps silently lost the LoRA's share of the embedding that full steps had (1.07 off at k = N)."""
    torch.manual_seed(0)
    transformer = type(tiny_pipelines["tiny-sd3"].transformer).from_config(tiny_pipelines["tiny-sd3"].transformer.config)
    transformer.pos_embed.proj = _UnfusedLoraConv(transformer.pos_embed.proj)
    with pytest.raises(UnsupportedModelError, match=r"^SD3Adapter: the patch embedding transformer\.pos_embed\.proj is a "
                                                    r"\S*_UnfusedLoraConv, not a plain nn\.Conv2d .*"
                                                    r"fuse the LoRA first") as refused:
        make_adapter(transformer)
    assert refused.value.field == "pos_embed.proj"
    transformer.pos_embed.proj.merged = True  # fuse_lora: the update is in the base weight, the wrapper stays
    make_adapter(transformer)
    hooked = type(transformer).from_config(transformer.config)
    hooked.pos_embed.proj.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(UnsupportedModelError, match=r"pos_embed\.proj is a torch\.nn\.modules\.conv\.Conv2d, not a plain .*a hook"):
        make_adapter(hooked)

    # A LoRA loaded after accelerate is refused at the next call, before any step.
    pipe = type(tiny_pipelines["tiny-sd3"])(**{**tiny_pipelines["tiny-sd3"].components, "transformer": transformer})
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=2))
    transformer.pos_embed.proj.merged = False
    with pytest.raises(UnsupportedModelError, match="pos_embed.proj is a .*fuse the LoRA first"):
        fast(**call_kwargs(pipe, num_inference_steps=4))


@torch.no_grad()
def test_sd3_runs_linear_layers_whose_forward_is_hooked_through_their_forward(tiny_pipelines: dict[str, Any]) -> None:
    """SD3's fast paths multiply by a Linear's weight directly; a layer whose forward is hooked is called instead.
    diffusers' `enable_layerwise_casting` keeps weights in float8 and casts them in the forward it replaces (catrt
    failed in a baddbmm on float8); a torch forward hook changes the output (catrt left it out, silently)."""
    source = tiny_pipelines["tiny-sd3.5"].transformer
    transformer = type(source).from_config(source.config).eval()
    transformer.load_state_dict(source.state_dict())
    latents, timestep, kwargs = _inputs(transformer)
    transformer.transformer_blocks[0].attn.to_out[0].register_forward_hook(lambda module, args, out: out * 2)
    adapter = make_adapter(transformer)
    expected = transformer(hidden_states=latents, timestep=timestep, return_dict=False, **kwargs)[0]
    tokens = adapter.full_forward(latents, timestep, _context(adapter, kwargs, latents), _empty_cache(adapter))
    assert (adapter.prediction_of(tokens, GRID) - expected).abs().max() < 1e-4

    transformer.to(torch.bfloat16).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert transformer.transformer_blocks[0].attn.to_out[0].weight.dtype == torch.float8_e4m3fn
    half = {name: value.to(torch.bfloat16) for name, value in kwargs.items()}
    expected = transformer(hidden_states=latents.bfloat16(), timestep=timestep, return_dict=False, **half)[0].float()
    context = _context(adapter, half, latents)
    tokens = adapter.full_forward(latents.bfloat16(), timestep, context, _empty_cache(adapter).bfloat16())
    got = adapter.prediction_of(tokens, GRID).float()
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2  # bf16 rounding in another op order


class _DequantizedInLinear(torch.nn.Parameter):
    """A stand-in for a quantized weight (torchao's Int8Tensor, diffusers' GGUFParameter): a Parameter subclass whose
    stored data is not the weight (here weight / scale) and whose `F.linear` computes with the real weight, as those
    subclasses' kernels do. Every other op runs on the stored data, so a path reading it directly (`weight.t()` in an
    addmm) computes silently wrong, where torchao's Int8Tensor raised NotImplementedError on aten.t."""

    scale = 4.0

    def __new__(cls, weight: torch.Tensor) -> _DequantizedInLinear:
        return torch.Tensor._make_subclass(cls, weight.detach() / cls.scale, False)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.nn.functional.linear:
            x, weight, *rest = args
            return func(x, weight.as_subclass(torch.Tensor) * cls.scale, *rest, **(kwargs or {}))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-sd3.5", "tiny-pixart", "tiny-flux"])
def test_linear_layers_of_quantized_weights_run_through_their_forward(name: str, tiny_pipelines: dict[str, Any]) -> None:
    """torchao's `quantize_(transformer, Int8WeightOnlyConfig())` keeps every nn.Linear but makes its weight a tensor
    subclass computed in `F.linear`: SD3's fast paths (`_linear`'s baddbmm / addmm, the K/V addmm into the cache)
    multiplied by `weight.t()` directly and crashed in torchao (or, for a subclass storing other data, read it silently).
    Such layers are called instead: full and all-token pruned steps equal the quantized transformer's own forward."""
    source = tiny_pipelines[name].transformer
    transformer = type(source).from_config(source.config).eval()
    transformer.load_state_dict(source.state_dict())
    for module in transformer.modules():
        if type(module) is torch.nn.Linear:
            module.weight = _DequantizedInLinear(module.weight)
    latents, timestep, kwargs = _inputs(transformer)
    expected = transformer(hidden_states=latents, timestep=timestep, return_dict=False, **kwargs)[0]
    adapter = make_adapter(transformer)
    context = _context(adapter, kwargs, latents)
    cache = _empty_cache(adapter)
    full = adapter.prediction_of(adapter.full_forward(latents, timestep, context, cache), GRID)
    assert (full - expected).abs().max() < 1e-4
    tokens = adapter.tokens_of(latents)
    indices = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    pruned = adapter.prediction_of(adapter.pruned_forward(tokens, indices, timestep, context, cache), GRID)
    assert (pruned - expected).abs().max() < 1e-4


def test_a_quantized_patch_embedding_is_refused_by_name(tiny_pipelines: dict[str, Any]) -> None:
    """SD3's and PixArt's pruned steps multiply the selected patches by `pos_embed.proj.weight` directly: a quantized
    weight there (the stand-in subclass above, as a quantization reaching the conv would leave it) was read as its stored
    data, silently, on pruned steps only. It is refused at accelerate, naming the layer and the fix."""
    source = tiny_pipelines["tiny-sd3"].transformer
    transformer = type(source).from_config(source.config).eval()
    transformer.pos_embed.proj.weight = _DequantizedInLinear(transformer.pos_embed.proj.weight)
    with pytest.raises(UnsupportedModelError, match=r"pos_embed\.proj has a quantized weight \(a (tests\.)?test_adapters\."
                                                    r"_DequantizedInLinear\).*leave the patch embedding unquantized") as refused:
        make_adapter(transformer)
    assert refused.value.field == "pos_embed.proj"


class _Uint8Linear(torch.nn.Linear):
    """A stand-in for diffusers' GGUFLinear (gguf is not a test dependency): the weight is stored as uint8 codes and
    dequantized to `compute_dtype` in the forward, so the stored weight's dtype is not the one the layer computes in."""

    step = 1e-2

    def __init__(self, layer: torch.nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__(layer.in_features, layer.out_features, layer.bias is not None)
        codes = (layer.weight.detach() / self.step + 128).round().clamp(0, 255).to(torch.uint8)
        self.weight = torch.nn.Parameter(codes, requires_grad=False)
        if layer.bias is not None:
            self.bias = torch.nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = ((self.weight.float() - 128) * self.step).to(self.compute_dtype)
        return torch.nn.functional.linear(x, weight, self.bias)


class _Int8Linear(_Uint8Linear):
    """A stand-in for bitsandbytes' Linear8bitLt: int8 codes and no `compute_dtype` (it computes in the input's dtype)."""

    def __init__(self, layer: torch.nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__(layer, compute_dtype)
        self.weight = torch.nn.Parameter((self.weight.to(torch.int16) - 128).to(torch.int8), requires_grad=False)
        del self.compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, (self.weight.float() * self.step).to(x.dtype), self.bias)


def _quantize_linears(module: torch.nn.Module, compute_dtype: torch.dtype, kind: type[_Uint8Linear] = _Uint8Linear) -> None:
    for name, child in module.named_children():
        if type(child) is torch.nn.Linear:
            setattr(module, name, kind(child, compute_dtype))
        else:
            _quantize_linears(child, compute_dtype, kind)


@torch.no_grad()
@pytest.mark.parametrize(("name", "kind"), [("tiny-sd3.5", _Uint8Linear), ("tiny-flux", _Uint8Linear), ("tiny-sd3", _Int8Linear)])
def test_a_transformer_of_uint8_linear_weights_runs_in_their_compute_dtype(
    name: str, kind: type[_Uint8Linear], tiny_pipelines: dict[str, Any]
) -> None:
    """diffusers' GGUF checkpoints (`GGUFQuantizationConfig`) load every Linear as a GGUFLinear whose weight is uint8
    blocks dequantized to its `compute_dtype` in the forward (bitsandbytes' Linear4bit alike; its Linear8bitLt stores
    int8 and has no `compute_dtype`): the adapter took uint8 / int8 from `proj_out.weight` as the dtype the transformer
    runs, and refused every call's float latents as the wrong dtype. alpha = 1 now equals the quantized pipeline and
    alpha 0.3 is finite."""
    tiny = tiny_pipelines[name]
    transformer = type(tiny.transformer).from_config(tiny.transformer.config).eval()
    transformer.load_state_dict(tiny.transformer.state_dict())
    _quantize_linears(transformer, torch.float32, kind)
    assert not transformer.proj_out.weight.is_floating_point()
    assert make_adapter(transformer).dtype == torch.float32
    pipe = type(tiny)(**{**tiny.components, "transformer": transformer})
    expected = pipe(**call_kwargs(pipe, num_inference_steps=4)).images
    got = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=2))(**call_kwargs(pipe, num_inference_steps=4)).images
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4
    pruned = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=2))(**call_kwargs(pipe, num_inference_steps=4)).images
    assert torch.isfinite(pruned).all()


class _Nf4Linear(_Uint8Linear):
    """A stand-in for bitsandbytes' Linear4bit: uint8 codes and a `compute_dtype` that is its matmul's alone (float32,
    BitsAndBytesConfig's default, under a bf16 transformer): it casts its input to it and its output back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = ((self.weight.float() - 128) * self.step).to(self.compute_dtype)
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return torch.nn.functional.linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)


@torch.no_grad()
def test_a_bf16_transformer_of_float32_compute_linears_runs_in_bf16(tiny_pipelines: dict[str, Any]) -> None:
    """bitsandbytes' 4-bit layers (BitsAndBytesConfig's bnb_4bit_compute_dtype defaults to float32) under a bf16
    transformer run in bf16: the adapter took the output layer's compute_dtype, float32, as the transformer's dtype and
    refused every call's bf16 latents, where the plain pipeline ran. alpha = 1 now matches the quantized pipeline up to
    bf16 rounding."""
    pipe = copy.deepcopy(tiny_pipelines["tiny-sd3"]).to(torch.bfloat16)  # the shared pipeline stays float32
    _quantize_linears(pipe.transformer, torch.float32, _Nf4Linear)
    assert make_adapter(pipe.transformer).dtype == torch.bfloat16
    expected = pipe(**call_kwargs(pipe, num_inference_steps=4)).images
    got = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=2))(**call_kwargs(pipe, num_inference_steps=4)).images
    assert got.dtype == torch.bfloat16
    assert ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item() < 3e-2


def test_the_dtype_of_a_quantized_output_layer_skips_the_modules_kept_in_float32(tiny_pipelines: dict[str, Any]) -> None:
    """diffusers' ModelMixin.dtype skips `_keep_in_fp32_modules` (mixed-precision norms and embeddings kept in float32
    under a bf16 transformer); the adapter's fallback for an output layer storing no float weight does the same."""
    tiny = tiny_pipelines["tiny-sd3"]
    transformer = type(tiny.transformer).from_config(tiny.transformer.config).eval().to(torch.bfloat16)
    first = next(name for name, _ in transformer.named_parameters()).split(".")[0]
    getattr(transformer, first).float()
    transformer.proj_out = _Int8Linear(transformer.proj_out, torch.bfloat16)
    assert make_adapter(transformer).dtype == torch.float32  # diffusers' rule without the kept modules
    transformer._keep_in_fp32_modules = [first]
    assert make_adapter(transformer).dtype == transformer.dtype == torch.bfloat16


def test_diffusers_hooks_the_steps_would_bypass_are_refused_by_name(tiny_pipelines: dict[str, Any]) -> None:
    """diffusers' caches and group offloading hook forwards catrt's steps never call: with a First-Block cache on, alpha = 1
    silently ran every block (0.66% off the plain pipeline's cached result), and offloaded weights would never load. A
    hook added after accelerate is refused at the next call; layerwise casting runs (its casts are the layers' own)."""
    from diffusers import FirstBlockCacheConfig

    tiny = tiny_pipelines["tiny-flux"]
    transformer = type(tiny.transformer).from_config(tiny.transformer.config).eval()
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(UnsupportedModelError, match=r"^module 'transformer_blocks\.0' of the transformer has diffusers hooks "
                                                    r"\['fbc_leader_block_hook'\] .*pipe\.transformer\.disable_cache\(\)") as refused:
        make_adapter(transformer)
    assert refused.value.field == "transformer"
    transformer.disable_cache()
    pipe = type(tiny)(**{**tiny.components, "transformer": transformer})
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=2))
    transformer.enable_group_offload(torch.device("cpu"), torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(UnsupportedModelError, match=r"^the transformer has diffusers hooks \['group_offloading'\]"):
        fast(**call_kwargs(pipe, num_inference_steps=4))


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_layerwise_casting_of_the_output_layer_keeps_the_compute_dtype(name: str, tiny_pipelines: dict[str, Any]) -> None:
    """`enable_layerwise_casting` without diffusers' default skip of `proj_out` stores that layer in float8: the
    adapter read its dtype from that weight and refused the pipeline's bf16 latents as the wrong dtype."""
    from catrt.models.inputs import check_transformer_inputs

    source = tiny_pipelines[name].transformer
    transformer = type(source).from_config(source.config).eval().to(torch.bfloat16)
    transformer.enable_layerwise_casting(torch.float8_e4m3fn, torch.bfloat16, skip_modules_pattern=("norm",))
    assert transformer.proj_out.weight.dtype == torch.float8_e4m3fn
    adapter = make_adapter(transformer)
    assert adapter.dtype == torch.bfloat16
    latents, timestep, kwargs = _inputs(transformer)
    half = {key: value.bfloat16() if key in ("encoder_hidden_states", "pooled_projections") else value for key, value in kwargs.items()}
    check_transformer_inputs(adapter, {"hidden_states": latents.bfloat16(), "timestep": timestep, **half}, GRID)


@torch.no_grad()
def test_accelerate_hooks_once_removed_leave_the_transformer_running_as_loaded(tiny_pipelines: dict[str, Any]) -> None:
    """accelerate's `remove_hook_from_module` (diffusers' `remove_all_hooks`, the way out of CPU offloading before
    `pipe.to(device)`) puts each module's own forward back as an instance attribute: the patch projection was then
    refused as an unfused LoRA and SD3's direct-weight paths were dropped. While the hooks are on (sequential offload),
    `accelerate` names them at the call with their own fix, not with fuse_lora."""
    hooks = pytest.importorskip("accelerate.hooks")
    tiny = tiny_pipelines["tiny-sd3"]
    transformer = type(tiny.transformer).from_config(tiny.transformer.config).eval()
    transformer.load_state_dict(tiny.transformer.state_dict())
    pipe = type(tiny)(**{**tiny.components, "transformer": transformer})
    for module in transformer.modules():  # as enable_sequential_cpu_offload hooks them
        if not list(module.children()):
            hooks.add_hook_to_module(module, hooks.AlignDevicesHook("cpu"))
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=2))
    with pytest.raises(UnsupportedModelError, match=r"^module '.*' of the transformer has an accelerate hook \(AlignDevicesHook"):
        fast(**call_kwargs(pipe, num_inference_steps=4))

    hooks.remove_hook_from_module(transformer, recurse=True)
    assert "forward" in vars(transformer.pos_embed.proj)  # accelerate's leftover, the module's own forward
    adapter = make_adapter(transformer)
    linear = transformer.transformer_blocks[0].attn.to_q
    assert catrt.models.base.plain_linear(linear)
    latents, timestep, kwargs = _inputs(transformer)
    expected = transformer(hidden_states=latents, timestep=timestep, return_dict=False, **kwargs)[0]
    tokens = adapter.full_forward(latents, timestep, _context(adapter, kwargs, latents), _empty_cache(adapter))
    assert (adapter.prediction_of(tokens, GRID) - expected).abs().max() < 1e-4
    linear.forward = torch.nn.Linear(linear.in_features, linear.out_features).forward  # another module's forward
    assert not catrt.models.base.plain_linear(linear)


@torch.no_grad()
def test_a_patch_projection_computing_its_weights_conv_runs(tiny_pipelines: dict[str, Any]) -> None:
    """A parametrized or torch.compiled nn.Conv2d computes the conv of the `weight` catrt reads (before the unfused-LoRA
    check it ran, and pruned steps embedded as full ones); a subclass with a forward of its own is still refused."""
    from torch.nn.utils import parametrize

    class Scale(torch.nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight * 1.5

    class Shifted(torch.nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1

    tiny = tiny_pipelines["tiny-sd3"]
    transformer = type(tiny.transformer).from_config(tiny.transformer.config).eval()
    latents = torch.randn(2, transformer.config.in_channels, 8, 12, generator=torch.Generator().manual_seed(0))
    parametrized = parametrize.register_parametrization(transformer.pos_embed.proj, "weight", Scale())
    adapter = make_adapter(transformer)
    context = adapter.prepare_context({}, tuple(latents.shape))
    indices = torch.arange(GRID.height * GRID.width).expand(2, -1)
    embedded = adapter.embed_patches(adapter.tokens_of(latents), indices, context)
    assert (embedded - transformer.pos_embed(latents)).abs().max() < 1e-5
    transformer.pos_embed.proj = torch.compile(parametrized)  # its `weight` is the parametrized module's (not run here)
    assert make_adapter(transformer).transformer.pos_embed.proj.weight.equal(parametrized.weight)
    transformer.pos_embed.proj = Shifted(4, transformer.inner_dim, 2, 2)
    with pytest.raises(UnsupportedModelError, match=r"pos_embed\.proj is a \S*Shifted, not a plain nn\.Conv2d"):
        make_adapter(transformer)


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-pixart"])
@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_a_norm_parametrized_patch_projection_embeds_pruned_patches_as_its_conv(
    tiny_pipelines: dict[str, Any], name: str, norm: str
) -> None:
    """The positional table is the patch embedding of a zero latent through a zero projection: zeroing a weight- or
    spectral-norm parametrization's own parameters made its weight 0 / 0, and every pruned token NaN."""
    from torch.nn.utils import parametrizations

    tiny = tiny_pipelines[name]
    transformer = type(tiny.transformer).from_config(tiny.transformer.config).eval()
    getattr(parametrizations, norm)(transformer.pos_embed.proj)
    latents = torch.randn(2, transformer.config.in_channels, 8, 12, generator=torch.Generator().manual_seed(0))
    adapter = make_adapter(transformer)
    context = {"positional_table": adapter.positional_table(tuple(latents.shape))}  # what prepare_context adds
    assert context["positional_table"].dtype == torch.float32 and context["positional_table"].isfinite().all()
    indices = torch.arange(GRID.height * GRID.width).expand(2, -1)
    embedded = adapter.embed_patches(adapter.tokens_of(latents), indices, context)
    assert (embedded - transformer.pos_embed(latents)).abs().max() < 1e-5


@torch.no_grad()
def test_a_disabled_lora_on_the_patch_embedding_runs_and_is_refused_once_enabled(tiny_pipelines: dict[str, Any]) -> None:
    """`pipe.disable_lora()` (PEFT's `disable_adapters`, checked with PEFT 0.21.2) leaves the wrapped projection running its
    base conv alone, whose weight catrt reads: it ran before the unfused-LoRA check, which then refused it with the
    fuse_lora fix. Enabled again after accelerate, the next call is refused."""
    tiny = tiny_pipelines["tiny-sd3"]
    transformer = type(tiny.transformer).from_config(tiny.transformer.config).eval()
    transformer.pos_embed.proj = _UnfusedLoraConv(transformer.pos_embed.proj)
    transformer.pos_embed.proj.disable_adapters = True
    adapter = make_adapter(transformer)
    latents = torch.randn(2, transformer.config.in_channels, 8, 12, generator=torch.Generator().manual_seed(0))
    context = adapter.prepare_context({}, tuple(latents.shape))
    indices = torch.arange(GRID.height * GRID.width).expand(2, -1)
    embedded = adapter.embed_patches(adapter.tokens_of(latents), indices, context)
    assert (embedded - transformer.pos_embed(latents)).abs().max() < 1e-5

    pipe = type(tiny)(**{**tiny.components, "transformer": transformer})
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=2))
    transformer.pos_embed.proj.disable_adapters = False  # pipe.enable_lora()
    with pytest.raises(UnsupportedModelError, match="pos_embed.proj is a .*fuse the LoRA first"):
        fast(**call_kwargs(pipe, num_inference_steps=4))


def test_a_transformer_compiled_in_place_is_refused_with_the_fix(tiny_pipelines: dict[str, Any]) -> None:
    """`pipe.transformer.compile()` makes every call of the transformer a compiled one, which traced the forward catrt sets
    for a generation (its whole runtime): 24 graphs and a recompile per alpha with the tiny SD3, warm calls 8x slower. Its
    blocks compiled in place run as before (catrt calls their functions, not their compiled calls)."""
    tiny = tiny_pipelines["tiny-sd3"]
    transformer = type(tiny.transformer).from_config(tiny.transformer.config).eval()
    pipe = type(tiny)(**{**tiny.components, "transformer": transformer})
    transformer.transformer_blocks[0].compile()
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=2))
    transformer.compile()
    with pytest.raises(UnsupportedModelError, match="is compiled in place"):
        make_adapter(transformer)
    with pytest.raises(UnsupportedModelError, match=r"^the transformer \(SD3Transformer2DModel\) is compiled in place .*"
                                                    r"_compiled_call_impl = None\) and pass backend=\"compile\"") as refused:
        fast(**call_kwargs(pipe, num_inference_steps=4))
    assert refused.value.field == "transformer"
    transformer._compiled_call_impl = None
    assert fast(**call_kwargs(pipe, num_inference_steps=4)).images.isfinite().all()


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd3.5"])
def test_bf16_full_steps_equal_diffusers_forward_exactly(name: str) -> None:
    """In bf16 the full steps (before t0) hand the scheduler diffusers' own prediction, bit for bit: SD3's output
    projections of the joint attention's image / text rows once read them by a batched matmul with the weight
    broadcast, which rounds otherwise than `F.linear` in bf16 (a last-bit difference from the first step on)."""
    pipe = build_tiny_pipeline(name, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    outputs: dict[str, list[torch.Tensor]] = {"plain": [], "catrt": []}
    step = pipe.scheduler.step
    for kind, run in (("plain", pipe), ("catrt", catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=3)))):
        def keep(model_output: torch.Tensor, *args: Any, kind: str = kind, **kwargs: Any) -> Any:
            outputs[kind].append(model_output.clone())
            return step(model_output, *args, **kwargs)

        pipe.scheduler.step = keep
        try:
            run(**call_kwargs(pipe, num_inference_steps=5))
        finally:
            del pipe.scheduler.step
    for index in range(3):  # the t0 full steps
        assert outputs["catrt"][index].dtype == torch.bfloat16
        assert torch.equal(outputs["catrt"][index], outputs["plain"][index]), index


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd3.5", "tiny-pixart", "reference", "tiny-flux", "tiny-flux-schnell"])
def test_bf16_alpha_one_equals_the_plain_bf16_pipeline_exactly(name: str) -> None:
    """At alpha = 1 every pruned step recomputes every token, and in bf16 too it makes diffusers' numbers bit for bit:
    a pruned token is embedded as `(patches @ W.T + bias) + position`, the conv's sum in its order (a positional
    table holding the bias rounded bias + position once, 1 bf16 step off diffusers' tokens from the first pruned step).
    tiny-pixart at 64x96, not its own size: PixArt then makes its positions in float32, added before one rounding.
    FLUX's double blocks hand their output projections contiguous rows, as diffusers does (a strided slice made
    `F.linear` add the bias apart, rounding twice: 0.4% off from the first full step)."""
    if name == "reference":
        pipe = catrt.load_pipeline(name, dtype=torch.bfloat16)

        def arguments() -> dict[str, Any]:
            return {"prompt": "a small red circle in the top left on a blue background", "num_inference_steps": 6,
                    "output_type": "latent", "generator": torch.Generator().manual_seed(0)}
    else:
        pipe = build_tiny_pipeline(name, dtype=torch.bfloat16)

        def arguments() -> dict[str, Any]:
            return call_kwargs(pipe, num_inference_steps=6)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(**arguments()).images
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=3, trace=True))
    exact = fast(**arguments()).images
    assert [record.kind for record in fast.last_trace] == ["full"] * 3 + ["pruned"] * 3
    assert exact.dtype == torch.bfloat16 and torch.equal(exact, plain)


def test_bf16_flux_attends_over_text_then_image_keys_as_diffusers_does() -> None:
    """FLUX's attention runs over [text, image] keys, diffusers' order: with more keys than one block of SDPA's blocked
    softmax (512 on the CPU) the keys' order changes the sums, so image-first keys left bf16 alpha = 1 0.6% off the
    plain pipeline at 256x512 (512 image + 16 text keys) from the first full step."""
    pipe = build_tiny_pipeline("tiny-flux", dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    arguments = {"prompt": "a red circle", "num_inference_steps": 3, "height": 256, "width": 512,
                 "output_type": "latent", "max_sequence_length": 16}
    plain = pipe(**arguments, generator=torch.Generator().manual_seed(0)).images
    fast = catrt.accelerate(pipe, CATConfig(alpha=1.0, t0=2, trace=True))
    exact = fast(**arguments, generator=torch.Generator().manual_seed(0)).images
    assert [record.kind for record in fast.last_trace] == ["full"] * 2 + ["pruned"]
    assert exact.dtype == torch.bfloat16 and torch.equal(exact, plain)
