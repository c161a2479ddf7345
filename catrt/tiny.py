"""Small random-weight diffusers pipelines, built from configs in code.

They keep the layouts of the published models (SD3 medium, SD3.5, PixArt-Sigma, FLUX.1) at toy sizes, so
tests and benchmarks exercise the real diffusers code paths with no download and in milliseconds.
Every dimension that is distinct in the published models is distinct here too (T5 width, CLIP
widths, transformer width), so code that confuses them fails on the tiny models as well.
Weights are a pure function of the seed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from catrt.errors import UnknownModelError, echo

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=torch.nn.Module)

CLIP_MAX_LENGTH = 77  # as in the published CLIP encoders, so code relying on 77 sees the same
T5_WIDTH = 48  # joint_attention_dim / caption_channels: wider than both CLIPs together, as in SD3
HEADS, HEAD_DIM = 4, 8  # transformer width 32, distinct from T5_WIDTH
CLIP_PROJECTION = 32  # each CLIP's pooled width; SD3's pooled_projection_dim is twice this
SD3_VAE_SHIFT, SD3_VAE_SCALE = 0.0609, 1.5305  # the published SD3 VAE's latent normalisation
SDXL_VAE_SCALE = 0.13025  # PixArt-Sigma uses the SDXL VAE
FLUX_VAE_SHIFT, FLUX_VAE_SCALE = 0.1159, 0.3611  # the published FLUX.1 VAE's latent normalisation
FLUX_CLIP_WIDTH = 24  # FLUX pools CLIP-L's hidden state (no projection): pooled_projection_dim

# Whole-word tokens so ordinary prompts stay short; any other word falls back to characters.
_WORDS = """
a an the of and with in on at by to from for is are photo photograph picture painting drawing
portrait landscape close up view high quality detailed realistic style art digital oil watercolor
sketch cinematic lighting light dark bright night day sunset sunrise sky cloud clouds sun moon star
stars rain snow fog water sea ocean lake river beach sand mountain mountains hill forest tree trees
flower flowers grass garden field road street city town house building castle bridge room window
door table chair car bus train boat ship plane bicycle cat cats dog dogs bird birds horse cow fish
lion tiger bear fox wolf rabbit man woman men women person people child boy girl face eyes hair
hat red orange yellow green blue purple pink brown black white gray grey gold silver big small
large tiny old new young beautiful cute happy sad sitting standing running walking flying wearing
holding riding playing eating under over next near astronaut robot dragon space planet food apple
cake coffee cup book very highly
""".split()


def _byte_alphabet() -> list[str]:
    """The 256 byte-level symbols, so any text can be spelled out without an unknown token."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Left-to-right BPE merges that assemble each word into one `word</w>` token."""
    merges: dict[tuple[str, str], None] = {}
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        piece = symbols[0]
        for symbol in symbols[1:]:
            merges[(piece, symbol)] = None
            piece += symbol
    return list(merges)


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer with the special tokens at the end, as in the real one."""
    symbols = _byte_alphabet()
    merges = _word_merges(_WORDS)
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer: whole words score above single characters, so words win."""
    chars = [chr(code) for code in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + word, -5.0) for word in _WORDS]
    pieces += [(char, -10.0) for char in chars] + [("▁" + char, -10.0) for char in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_config(tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int) -> CLIPTextConfig:
    """A two-layer CLIP text config whose special-token ids match `tokenizer`'s.

    The pooled vector is read at the eos position, so a mismatched eos id would pool garbage.
    """
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _clip_encoder(
    tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int
) -> CLIPTextModelWithProjection:
    """A two-layer CLIP text encoder with a projection (SD3's pooled inputs)."""
    return CLIPTextModelWithProjection(_clip_config(tokenizer, hidden_size, projection_dim)).eval()


def _t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    """A two-layer T5 encoder of width T5_WIDTH."""
    config = T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=2 * T5_WIDTH, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, shift_factor: float | None, scaling_factor: float) -> AutoencoderKL:
    """A four-level VAE (8 pixels per latent cell) with eight channels per level."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    ).eval()


#: Held while a tiny pipeline is built: its weights come from the global torch RNG, seeded per component, so two
#: builds at once (two threads loading a tiny bundle) would draw from each other's seeds.
_BUILDING = threading.Lock()


def _seeded(seed: int, index: int, build: Callable[[], M]) -> M:
    """Build one component from its own seed, so its weights depend on the seed alone."""
    torch.manual_seed(seed * 1000 + index)
    return build()


def _sd3_pipeline(seed: int, layout: dict[str, object]) -> StableDiffusion3Pipeline:
    """An SD3-family pipeline; `layout` holds the transformer options that differ across versions.

    CLIP widths 16 + 24 < T5 width 48, so the CLIP features are zero-padded as in SD3.
    """
    clip, clip_2, t5 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=_seeded(seed, 0, lambda: SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=T5_WIDTH,
            caption_projection_dim=HEADS * HEAD_DIM, pooled_projection_dim=2 * CLIP_PROJECTION,
            pos_embed_max_size=96, **layout,
        ).eval()),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_seeded(seed, 1, lambda: _vae(16, SD3_VAE_SHIFT, SD3_VAE_SCALE)),
        text_encoder=_seeded(seed, 2, lambda: _clip_encoder(clip, 16, CLIP_PROJECTION)),
        tokenizer=clip,
        text_encoder_2=_seeded(seed, 3, lambda: _clip_encoder(clip_2, 24, CLIP_PROJECTION)),
        tokenizer_2=clip_2,
        text_encoder_3=_seeded(seed, 4, lambda: _t5_encoder(t5)),
        tokenizer_3=t5,
    )


def _tiny_sd3(seed: int) -> StableDiffusion3Pipeline:
    """SD3-medium layout: plain joint blocks, no q/k norm."""
    return _sd3_pipeline(seed, {})


def _tiny_sd35(seed: int) -> StableDiffusion3Pipeline:
    """SD3.5-medium layout: RMS q/k norm and a dual-attention first block."""
    return _sd3_pipeline(seed, {"qk_norm": "rms_norm", "dual_attention_layers": (0,)})


def _tiny_pixart(seed: int) -> PixArtSigmaPipeline:
    """PixArt-Sigma layout: adaLN-single blocks with cross-attention to T5, learned sigma.

    Sample size 32 (256 x 256 pixels, 16 x 16 tokens) is the smallest diffusers has a resolution-bin table for, so the
    pipeline's own default call (`use_resolution_binning=True`) runs, as PixArt-Sigma's does.
    """
    t5 = _t5_tokenizer()
    return PixArtSigmaPipeline(
        transformer=_seeded(seed, 0, lambda: PixArtTransformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
            attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
            cross_attention_dim=HEADS * HEAD_DIM, caption_channels=T5_WIDTH,
            activation_fn="gelu-approximate", attention_bias=True, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
            interpolation_scale=2, use_additional_conditions=False,
        ).eval()),
        scheduler=DPMSolverMultistepScheduler(
            beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000,
            prediction_type="epsilon",
        ),
        vae=_seeded(seed, 1, lambda: _vae(4, None, SDXL_VAE_SCALE)),
        text_encoder=_seeded(seed, 4, lambda: _t5_encoder(t5)),
        tokenizer=t5,
    )


def _flux_pipeline(seed: int, guidance_embeds: bool) -> FluxPipeline:
    """A FLUX.1 pipeline: double and single stream blocks, packed 2x2 latents (16 channels -> 64), rotary axes.

    CLIP-L's pooled hidden state (width 24) and T5 (width 48) are distinct, as 768 and 4096 are.
    """
    clip, t5 = _clip_tokenizer(), _t5_tokenizer()
    return FluxPipeline(
        transformer=_seeded(seed, 0, lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=T5_WIDTH, pooled_projection_dim=FLUX_CLIP_WIDTH,
            guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
        ).eval()),
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_seeded(seed, 1, lambda: _vae(16, FLUX_VAE_SHIFT, FLUX_VAE_SCALE)),
        text_encoder=_seeded(seed, 2, lambda: CLIPTextModel(_clip_config(clip, FLUX_CLIP_WIDTH, CLIP_PROJECTION)).eval()),
        tokenizer=clip,
        text_encoder_2=_seeded(seed, 4, lambda: _t5_encoder(t5)),
        tokenizer_2=t5,
    )


def _tiny_flux(seed: int) -> FluxPipeline:
    """FLUX.1-dev layout: the guidance scale enters as a distilled embedding."""
    return _flux_pipeline(seed, guidance_embeds=True)


def _tiny_flux_schnell(seed: int) -> FluxPipeline:
    """FLUX.1-schnell layout: no guidance embedding."""
    return _flux_pipeline(seed, guidance_embeds=False)


TINY_PIPELINES: dict[str, Callable[[int], DiffusionPipeline]] = {
    "tiny-sd3": _tiny_sd3,
    "tiny-sd3.5": _tiny_sd35,
    "tiny-pixart": _tiny_pixart,
    "tiny-flux": _tiny_flux,
    "tiny-flux-schnell": _tiny_flux_schnell,
}


def build_tiny_pipeline(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Build the tiny pipeline `name` on the CPU; the same seed always gives the same weights.

    The global torch RNG is restored afterwards so building does not disturb the caller's
    random stream; builds in several threads take turns, so each gets its seed's weights.
    """
    if name not in TINY_PIPELINES:
        raise UnknownModelError(
            f"unknown tiny pipeline {echo(name)}; known: {', '.join(sorted(TINY_PIPELINES))}",
            field="name", value=name,
        )
    with _BUILDING, torch.random.fork_rng(devices=[]):
        pipeline = TINY_PIPELINES[name](seed)
    logger.debug("built %s (seed %d, %s)", name, seed, dtype)
    if dtype != torch.float32:  # components are built in float32
        # nn.Module.to, not ModelMixin.to: diffusers 0.42 warns on every dtype cast even with no fp32 modules.
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                torch.nn.Module.to(component, dtype=dtype)
    return pipeline
