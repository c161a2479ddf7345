"""A family catrt does not ship, added as README's "Adding a model family" says: diffusers' AuraFlow.

One adapter class (joint MMDiT blocks, then single DiT blocks over [register + text, image] tokens; a linear patch
projection and a learned position table of `pos_embed_max_size` positions in all) and one registration. It holds
the contract to what a newcomer meets: the base's default token layout with a linear patch projection, a family's own
grid limit, the pipeline's own default size, and its declared text layout.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.models.attention_processor import AuraFlowAttnProcessor2_0
from PIL import Image
from torch import nn
from transformers import UMT5Config, UMT5EncoderModel

import catrt
from catrt import CATConfig, ConfigError, UnsupportedModelError
from catrt.build import build_engines
from catrt.build_config import BuildConfig
from catrt.generation import check_pipeline_size
from catrt.macs import step_macs
from catrt.model_cards import MODEL_CARDS, ModelCard
from catrt.models import ADAPTERS, FAMILIES, PIPELINES, Adapter, Family, register_family
from catrt.models.base import Context, KVStore, attention, joint_attention
from catrt.pipeline_spec import PipelineSpec
from catrt.tiny import SDXL_VAE_SCALE, T5_WIDTH, _t5_tokenizer, _vae
from catrt.tokens import Grid


class AuraFlowAdapter(Adapter):
    """K/V slots: image K and V of each joint block's attention, then of each single block's."""

    transformer_class = AuraFlowTransformer2DModel

    def check_layout(self, transformer: nn.Module) -> None:
        for block in (*transformer.joint_transformer_blocks, *transformer.single_transformer_blocks):
            if type(block.attn.processor) is not AuraFlowAttnProcessor2_0:
                raise UnsupportedModelError(f"AuraFlow attention processor {type(block.attn.processor).__name__} is not supported")

    @property
    def num_kv_slots(self) -> int:
        return 2 * (len(self.transformer.joint_transformer_blocks) + len(self.transformer.single_transformer_blocks))

    @property
    def max_grid_side(self) -> int:
        return math.isqrt(self.transformer.config.pos_embed_max_size)  # a square table of that many positions

    def context_inputs(self, call_kwargs: dict[str, Any]) -> Context:
        if call_kwargs.get("attention_kwargs"):
            raise UnsupportedModelError("AuraFlow attention_kwargs are not supported by catrt")
        return {"encoder_hidden_states": call_kwargs["encoder_hidden_states"]}

    def run_blocks(self, tokens: torch.Tensor, timestep: torch.Tensor, context: Context, store: KVStore) -> torch.Tensor:
        model = self.transformer
        temb, text = self._conditioning(tokens.dtype, timestep, context)
        for index, block in enumerate(model.joint_transformer_blocks):
            text, tokens = store.run_block(self._joint_block, block, 2 * index, 2, tokens, text, temb)
        joined, first = torch.cat([text, tokens], dim=1), 2 * len(model.joint_transformer_blocks)
        for index, block in enumerate(model.single_transformer_blocks):
            joined = store.run_block(self._single_block, block, first + 2 * index, 2, joined, temb, text.shape[1])
        return model.proj_out(model.norm_out(joined[:, text.shape[1]:], temb))

    def first_block(self, tokens: torch.Tensor, timestep: torch.Tensor, context: Context) -> torch.Tensor:
        temb, text = self._conditioning(tokens.dtype, timestep, context)
        block = self.transformer.joint_transformer_blocks[0]
        return self._joint_block(block, KVStore(None, None, in_place=False), tokens, text, temb)[1]

    def _conditioning(self, dtype: torch.dtype, timestep: torch.Tensor, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.transformer
        temb = model.time_step_proj(model.time_step_embed(timestep).to(dtype))
        text = model.context_embedder(context["encoder_hidden_states"])
        return temb, torch.cat([model.register_tokens.to(text.dtype).repeat(text.shape[0], 1, 1), text], dim=1)

    def _joint_block(self, block: nn.Module, store: KVStore, x: torch.Tensor, text: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nx, gate, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
        ntext, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(text, emb=temb)
        attn = block.attn
        query, key, value = _qkv(attn, nx)
        key, value = store.exchange(0, key), store.exchange(1, value)
        t_query, t_key, t_value = _qkv(attn, ntext, added=True)
        joint = joint_attention([query, t_query], [key, t_key], [value, t_value], attn.heads, self.recorder, num_image_keys=key.shape[1])
        image_out, text_out = attn.to_out[0](joint[:, : query.shape[1]]), attn.to_add_out(joint[:, query.shape[1]:])
        hidden = block.norm2(x + gate.unsqueeze(1) * image_out) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        text_hidden = block.norm2_context(text + c_gate.unsqueeze(1) * text_out) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        return text + c_gate_mlp.unsqueeze(1) * block.ff_context(text_hidden), x + gate_mlp.unsqueeze(1) * block.ff(hidden)

    def _single_block(self, block: nn.Module, store: KVStore, joined: torch.Tensor, temb: torch.Tensor, num_text: int) -> torch.Tensor:
        normed, gate, shift_mlp, scale_mlp, gate_mlp = block.norm1(joined, emb=temb)
        query, key, value = _qkv(block.attn, normed)
        image_key, image_value = store.exchange(0, key[:, num_text:]), store.exchange(1, value[:, num_text:])
        out = attention(query, torch.cat([image_key, key[:, :num_text]], 1), torch.cat([image_value, value[:, :num_text]], 1),
                        block.attn.heads, recorder=self.recorder, num_image_keys=image_key.shape[1])
        hidden = block.norm2(joined + gate.unsqueeze(1) * block.attn.to_out[0](out)) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return joined + gate_mlp.unsqueeze(1) * block.ff(hidden)


def _qkv(attn: nn.Module, x: torch.Tensor, added: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V (B, L, H*d), the per-head QK layer norm applied as AuraFlowAttnProcessor2_0 does."""
    to_q, to_k, to_v = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if added else (attn.to_q, attn.to_k, attn.to_v)
    norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
    return norm_q(to_q(x).unflatten(-1, (attn.heads, -1))).flatten(2), norm_k(to_k(x).unflatten(-1, (attn.heads, -1))).flatten(2), to_v(x)


def _meta_call(config: dict[str, Any], text_tokens: int, grid: Grid) -> dict[str, Any]:
    patch = config["patch_size"]
    return {
        "hidden_states": torch.empty(1, config["in_channels"], grid.height * patch, grid.width * patch, device="meta"),
        "timestep": torch.empty(1, device="meta"),
        "encoder_hidden_states": torch.empty(1, text_tokens, config["joint_attention_dim"], device="meta"),
    }


@pytest.fixture(scope="module")
def auraflow() -> Iterator[AuraFlowPipeline]:
    family = register_family(Family("auraflow", AuraFlowAdapter, {AuraFlowPipeline: PipelineSpec(call_defaults={}, text_tokens_before=0)}, _meta_call))
    tokenizer = _t5_tokenizer()
    torch.manual_seed(0)
    pipe = AuraFlowPipeline(
        tokenizer=tokenizer,
        text_encoder=UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=2 * T5_WIDTH, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)).eval(),
        vae=_vae(4, None, SDXL_VAE_SCALE),
        transformer=AuraFlowTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=T5_WIDTH, caption_projection_dim=32, out_channels=4, pos_embed_max_size=64,
        ).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73),
    )
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    del FAMILIES[family.name], ADAPTERS[AuraFlowTransformer2DModel], PIPELINES[AuraFlowPipeline]


def _call(pipe: Any, **overrides: Any) -> dict[str, Any]:
    kwargs = {"prompt": ["a red cat", "a dog on a beach"], "num_inference_steps": 8, "height": 64, "width": 96, "guidance_scale": 3.5,
              "output_type": "latent", "max_sequence_length": 16, "generator": torch.Generator().manual_seed(0)}
    return {**kwargs, **overrides}


@torch.no_grad()
@pytest.mark.parametrize("guidance_scale", [3.5, 1.0])
def test_a_new_diffusers_family_at_alpha_1_is_the_plain_pipeline(auraflow: AuraFlowPipeline, guidance_scale: float) -> None:
    expected = auraflow(**_call(auraflow, guidance_scale=guidance_scale)).images
    fast = catrt.accelerate(auraflow, CATConfig(alpha=1.0, t0=3, trace=True))
    got = fast(**_call(auraflow, guidance_scale=guidance_scale)).images
    assert [record.kind for record in fast.last_trace] == ["full"] * 3 + ["pruned"] * 5  # pruned steps embed through pos_embed.proj
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4
    pruned = catrt.accelerate(auraflow, CATConfig(alpha=0.3, t0=3))(**_call(auraflow, guidance_scale=guidance_scale)).images
    assert torch.isfinite(pruned).all() and not torch.equal(pruned, got)


def test_a_new_familys_sizes_are_checked_against_its_own_grid_and_default(auraflow: AuraFlowPipeline) -> None:
    check_pipeline_size(auraflow, 128, 64, "auraflow")  # 8x8 tokens of 16 pixels: the whole table
    with pytest.raises(ConfigError, match="height 144 does not fit model auraflow, which takes multiples of 16 up to 128 pixels"):
        check_pipeline_size(auraflow, 144, 64, "auraflow")
    with pytest.raises(ConfigError, match="width 1024 does not fit model auraflow"):  # the pipeline's own default size
        check_pipeline_size(auraflow, None, None, "auraflow")


def test_a_new_family_counts_its_macs_on_the_meta_device(auraflow: AuraFlowPipeline) -> None:
    config = dict(auraflow.transformer.config)
    with torch.device("meta"):
        transformer = AuraFlowTransformer2DModel.from_config(config).eval()
    kwargs = _meta_call(config, 16, Grid(4, 6))
    counts = step_macs(transformer, kwargs.pop("hidden_states"), kwargs.pop("timestep"), kwargs, CATConfig(alpha=0.5))
    assert (counts.num_tokens, counts.k) == (24, 12) and 0 < counts.pruned < counts.full
    assert counts.context == 24 * (4 * 2 * 2) * 32  # the positional table: the patch projection of a zero latent, N x C·p·p x D


# -- every path after the one registration: builds, catrt.load, the server's model, catrt macs ---------------------


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_a_new_familys_saved_model_builds_loads_and_serves(auraflow: AuraFlowPipeline, backend: str, tmp_path: Path) -> None:
    """The registration is all a build needs: a saved folder of the new family exports through the step-graph contract,
    is verified, loads with `catrt.load` (its weightless stand-in made from the folder's transformer class) and runs as
    its eager runtime; the server's model serves it, one PNG of the build's size per row."""
    from catrt.serve.model import BatchOptions, Row, load_engines

    folder = tmp_path / "auraflow"
    auraflow.save_pretrained(folder)
    build = BuildConfig(str(folder), height=32, width=48, batch=2, steps=4, t0=2, max_sequence_length=8, backend=backend)
    bundle = build_engines(build, out_dir=tmp_path / "engines", export_dir=tmp_path / "export", progress=False)
    fast = catrt.load(bundle)
    fast.set_progress_bar_config(disable=True)
    sized = {"num_inference_steps": 4, "height": 32, "width": 48, "max_sequence_length": 8}
    got = fast(**_call(auraflow, **sized)).images
    expected = catrt.accelerate(auraflow, CATConfig(alpha=0.3, t0=2))(**_call(auraflow, **sized)).images
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()))
    served = load_engines(bundle, None)
    images = served.generate([Row("a red cat", 1)], BatchOptions(guidance_scale=3.5, negative_prompt=None)).images
    assert len(images) == 1 and Image.open(io.BytesIO(base64.b64decode(images[0]))).size == (48, 32)


def test_a_new_familys_published_card_counts_its_macs_from_the_cli(
    auraflow: AuraFlowPipeline, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A card for the new family (as a script adds one) is all `catrt macs` needs: the family's meta call shapes the step."""
    from catrt.cli import main
    from catrt.macs import model_macs

    card = ModelCard("auraflow-tiny", "nobody/auraflow-tiny", "auraflow", dict(auraflow.transformer.config), 16, max_grid_side=8)
    monkeypatch.setitem(MODEL_CARDS, card.name, card)
    assert main(["macs", "--model", card.name, "--height", "64", "--width", "64", "--steps", "8", "--t0", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "model auraflow-tiny at 64x64: N = 16 image tokens, k = 5"  # 4x4 tokens of 16 pixels, ceil(0.3 x 16)
    report = model_macs(card.name, 64, 64, CATConfig(t0=2), 8)
    assert 0 < report.schedule_ratio < 1 and lines[-1] == f"schedule MAC ratio: {report.schedule_ratio:.3f}"
