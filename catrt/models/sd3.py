"""Adapter for diffusers' `SD3Transformer2DModel`: SD3-medium and SD3.5 (QK-norm, dual attention)."""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from diffusers import (
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.models.activations import GELU
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX
from torch import nn

from catrt.errors import ConfigError, UnsupportedModelError
from catrt.models.attention import (
    attention,
    attention_kwargs_change_nothing,
    joint_attention,
    project_qkv,
    refuse_call_attention_kwargs,
    unfuse_hint,
)
from catrt.models.base import (
    Adapter,
    Context,
    KVStore,
    eager_cpu,
    plain_linear,
    refuse_other_text_width,
    refuse_without_blocks,
)
from catrt.models.modulation import gated_add_, modulate_
from catrt.models.registry import Family, register_family
from catrt.pipeline_spec import LatentChannels, PipelineSpec, guidance_value
from catrt.tokens import Grid

_UNSUPPORTED_CALL_ARGS = ("block_controlnet_hidden_states", "joint_attention_kwargs", "skip_layers")


def _check_out_channels(transformer: nn.Module) -> None:
    """Refuse a prediction of another channel count than the latents the pipelines step: text-to-image and img2img make
    latents of in_channels, inpainting of out_channels (its 33-channel transformer also reads the mask and the masked
    image: in_channels = 2 * out_channels + 1). diffusers builds any, but its scheduler failed adding the prediction
    to the latents after the first step, or broadcast a 1-channel prediction over them silently."""
    config, out = transformer.config, transformer.out_channels
    if out != config.in_channels and config.in_channels != 2 * out + 1:
        raise ConfigError(
            f"SD3Transformer2DModel config out_channels {out} with in_channels {config.in_channels}: the pipeline steps "
            f"latents of in_channels by the prediction's out_channels, so its scheduler fails (or broadcasts a 1-channel "
            f"prediction silently); set out_channels to {config.in_channels} in the transformer's config.json (the "
            f"inpainting layout is in_channels = 2 * out_channels + 1)",
            field="out_channels", value=out,
        )


class SD3Adapter(Adapter):
    """Joint (MMDiT) blocks: text and image tokens attend together; the text stream runs in full.

    K/V slots per block: image K and V of the joint attention, then K and V of the image-only second
    attention on SD3.5's dual-attention blocks.
    """

    transformer_class = SD3Transformer2DModel

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__(transformer)
        self._slot_of_block: list[int] = []
        slot = 0
        for block in transformer.transformer_blocks:
            self._slot_of_block.append(slot)
            slot += 4 if block.use_dual_attention else 2
        self._num_slots = slot
        self._scratch = Scratch()

    def check_layout(self, transformer: nn.Module) -> None:
        refuse_without_blocks(transformer, len(transformer.transformer_blocks), ("num_layers",))
        if transformer.pos_embed.layer_norm:
            raise UnsupportedModelError("SD3 patch embedding with layer_norm=True is not supported")
        refuse_other_text_width(
            transformer, "caption_projection_dim", "SD3Transformer2DModel", "its joint blocks read the projected text"
        )
        _check_out_channels(transformer)
        for index, block in enumerate(transformer.transformer_blocks):
            attentions = [block.attn] + ([block.attn2] if block.use_dual_attention else [])
            for attn in attentions:
                if type(attn.processor) is not JointAttnProcessor2_0:
                    raise UnsupportedModelError(
                        f"block {index} uses attention processor {type(attn.processor).__name__}; catrt prunes "
                        f"only the default JointAttnProcessor2_0 (no IP-adapter, fused or custom processors){unfuse_hint(attn)}"
                    )
            if block._chunk_size is not None:
                raise UnsupportedModelError(f"block {index} uses feed-forward chunking, which catrt does not support")

    @property
    def num_kv_slots(self) -> int:
        return self._num_slots

    def context_inputs(self, call_kwargs: dict[str, Any]) -> Context:
        for name in _UNSUPPORTED_CALL_ARGS:
            value = call_kwargs.get(name)
            if not attention_kwargs_change_nothing(value):  # None, {} or {"scale": 1.0} change nothing (as for FLUX)
                raise UnsupportedModelError(f"SD3 transformer argument {name!r} is not supported by catrt")
        return {
            "encoder_hidden_states": call_kwargs["encoder_hidden_states"],
            "pooled_projections": call_kwargs["pooled_projections"],
        }

    def run_blocks(self, tokens: torch.Tensor, timestep: torch.Tensor, context: Context, store: KVStore) -> torch.Tensor:
        """Diffusers' SD3 forward, op for op, with fewer fresh tensors.

        On a CPU a step's time beyond its matmuls and attention is mostly fresh (B, N, D) tensors
        (each new allocation of this size is mapped from the OS and paged in on first touch), so:
        where diffusers makes a new tensor for an elementwise result that only feeds the next op,
        this updates the tensor in place (the same rounded operations in the same order: the adaLN
        modulations, the gated residual adds, the GELU); the output projections read their rows of
        the joint attention output where they lie (`_linear`, no copy of the split halves); a full
        eager step computes the image K and V straight into the cache (`KVStore.linear`); and an eager
        CPU step (in place, no autograd, not compiled) puts its largest temporaries - the
        concatenated Q/K/V, the feed-forward hidden layer, the linear outputs - in buffers kept
        across blocks and steps (`Scratch`). Same kernels either way, so the same values as the
        functional (export) forward. `tokens` (fresh from the base class) is updated in place.
        """
        model = self.transformer
        temb = model.time_text_embed(timestep, context["pooled_projections"])
        text = model.context_embedder(context["encoder_hidden_states"])
        for index, block in enumerate(model.transformer_blocks):
            slots = 4 if block.use_dual_attention else 2
            text, tokens = store.run_block(self._block, block, self._slot_of_block[index], slots, tokens, text, temb)
        return model.proj_out(_ada_norm_continuous(model.norm_out, tokens, temb))

    def first_block(self, tokens: torch.Tensor, timestep: torch.Tensor, context: Context) -> torch.Tensor:
        model = self.transformer
        temb = model.time_text_embed(timestep, context["pooled_projections"])
        text = model.context_embedder(context["encoder_hidden_states"])
        store = KVStore(None, None, in_place=False)  # fresh K/V kept aside, the cache untouched
        return self._block(model.transformer_blocks[0], store, tokens, text, temb)[1]

    def _block(
        self, block: nn.Module, store: KVStore, x: torch.Tensor, text: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One JointTransformerBlock on the given image tokens (all N, or the k selected); K/V in slots 0-1 (2-3)."""
        scratch = self._scratch if store.in_place and eager_cpu(x) and not torch.is_grad_enabled() else None
        if block.use_dual_attention:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp, nx2, gate_msa2 = _ada_norm_zero(block.norm1, x, temb)
        else:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_norm_zero(block.norm1, x, temb)
        if block.context_pre_only:
            ntext = block.norm1_context(text, temb)
        else:
            ntext, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _ada_norm_zero(block.norm1_context, text, temb)

        attn = block.attn
        query, key, value = project_qkv(attn, nx, store=store, slot=0)
        del nx
        t_query, t_key, t_value = project_qkv(attn, ntext, added=True)
        num_image = query.shape[1]
        joined = None
        if scratch is not None:
            joined = tuple(
                scratch.take(name, (image.shape[0], attn.heads, image.shape[1] + text_part.shape[1], image.shape[2] // attn.heads), image)
                for name, image, text_part in (("query", query, t_query), ("key", key, t_key), ("value", value, t_value))
            )
        joint = joint_attention(
            [query, t_query], [key, t_key], [value, t_value], attn.heads, self.recorder, num_image_keys=key.shape[1], out=joined
        )
        del query, key, value, t_query, t_key, t_value, joined
        x = gated_add_(x, gate_msa, attn.to_out[1](_linear(attn.to_out[0], joint[:, :num_image], scratch)))

        if block.use_dual_attention:
            attn2 = block.attn2
            query2, key2, value2 = project_qkv(attn2, nx2, store=store, slot=2)
            del nx2
            out2 = attention(query2, key2, value2, attn2.heads, recorder=self.recorder, num_image_keys=key2.shape[1])
            del query2, key2, value2
            x = gated_add_(x, gate_msa2, attn2.to_out[1](_linear(attn2.to_out[0], out2, scratch)))
            del out2

        x = gated_add_(x, gate_mlp, _feed_forward(block.ff, modulate_(block.norm2(x), scale_mlp, shift_mlp), scratch))

        if block.context_pre_only:
            return None, x
        text = gated_add_(text, c_gate_msa, _linear(attn.to_add_out, joint[:, num_image:], scratch))
        ntext = modulate_(block.norm2_context(text), c_scale_mlp, c_shift_mlp)
        text = gated_add_(text, c_gate_mlp, _feed_forward(block.ff_context, ntext, scratch))
        return text, x


class Scratch:
    """Buffers for the largest temporaries of eager CPU steps, kept across blocks and steps (one set per thread).

    A fresh CPU tensor of a step's size (tens to hundreds of MB) is mapped from the OS on allocation
    and paged in on first touch, which costs about as much as the elementwise work on it; the
    buffers here are paged in once. Each name holds one flat buffer grown to the largest size asked
    (full and pruned steps, the image and the text stream share it): a use of a name must end before
    the next use of that name begins, and no buffer is returned to the caller of a forward.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict[int, Any]) -> Scratch:
        """A copy starts with no buffers (they are scratch, and a thread-local holds them)."""
        return Scratch()

    def __reduce__(self) -> tuple[type[Scratch], tuple[()]]:
        return Scratch, ()

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A (contiguous) tensor of `shape` with `like`'s dtype and device; its contents are garbage."""
        buffers: dict[str, torch.Tensor] = self._local.__dict__.setdefault("buffers", {})
        numel = math.prod(shape)
        buffer = buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            with torch.inference_mode(False):  # written in place by later steps, under inference_mode or not
                buffer = buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)


def _ada_norm_zero(norm: nn.Module, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`norm(x, emb=temb)` of an AdaLayerNormZero or SD35AdaLayerNormZeroX, modulating in place."""
    if type(norm) is AdaLayerNormZero and norm.emb is None:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm.linear(norm.silu(temb)).chunk(6, dim=1)
        return modulate_(norm.norm(x), scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp
    if type(norm) is SD35AdaLayerNormZeroX:
        emb = norm.linear(norm.silu(temb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = emb.chunk(9, dim=1)
        normed = norm.norm(x)
        first = (normed * (1 + scale_msa[:, None])).add_(shift_msa[:, None])
        return first, gate_msa, shift_mlp, scale_mlp, gate_mlp, modulate_(normed, scale_msa2, shift_msa2), gate_msa2
    return norm(x, emb=temb)


def _ada_norm_continuous(norm: nn.Module, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """`norm(x, temb)` of an AdaLayerNormContinuous (the output norm), modulating in place."""
    if type(norm) is not AdaLayerNormContinuous:
        return norm(x, temb)
    scale, shift = torch.chunk(norm.linear(norm.silu(temb).to(x.dtype)), 2, dim=1)
    return modulate_(norm.norm(x), scale, shift)


def _feed_forward(ff: nn.Module, x: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """A diffusers FeedForward on `x`; with a GELU first layer the activation runs in place on its projection."""
    first, *rest = ff.net
    if type(first) is not GELU:
        return ff(x)
    hidden = torch.ops.aten.gelu_(_linear(first.proj, x, scratch, "hidden"), approximate=first.approximate)
    for module in rest:
        hidden = _linear(module, hidden, scratch) if type(module) is nn.Linear else module(hidden)
    return hidden


def _linear(layer: nn.Module, x: torch.Tensor, scratch: Scratch | None = None, name: str = "linear") -> torch.Tensor:
    """`layer(x)` for an `nn.Linear`, into the scratch buffer `name` when there is one.

    A 3-D float32 `x` whose batches are not adjacent in memory (the image or text rows of the joint
    attention output) is read in place by a batched matmul with the weight broadcast over the batch,
    where `F.linear` would first copy it. Only in float32: in bf16 / fp16 that batched matmul rounds
    otherwise than `F.linear` (a last-bit difference per step that made a bf16 alpha = 1 run drift from
    diffusers'), so there `F.linear` copies. A contiguous `x` goes through the same addmm as `F.linear`.
    Not in an exported graph: there the broadcast weight is a constant expand, which ONNX Runtime
    folds into a batch-sized copy of the weight in every session (a 2x weight per graph at batch 2).
    """
    exporting = torch.compiler.is_exporting() or torch.jit.is_tracing()
    if not plain_linear(layer) or layer.bias is None or x.dim() != 3 or x.stride(-1) != 1 or exporting:
        return layer(x)
    shape = (*x.shape[:-1], layer.out_features)
    out = scratch.take(name, shape, x) if scratch is not None else None
    if not x.is_contiguous():
        if x.dtype != torch.float32:
            return layer(x)
        return torch.baddbmm(layer.bias, x, layer.weight.t().expand(x.shape[0], -1, -1), out=out)
    if out is None:
        return layer(x)
    torch.addmm(layer.bias, x.view(-1, x.shape[-1]), layer.weight.t(), out=out.view(-1, shape[-1]))
    return out


def _check_call(arguments: dict[str, Any], pipeline: str = "StableDiffusion3Pipeline") -> None:
    """Refuse the options of SD3's `pipeline` class that catrt cannot run, by name (the class the user called)."""
    if arguments.get("skip_guidance_layers") is not None:
        raise UnsupportedModelError(
            f"{pipeline} argument 'skip_guidance_layers' (skip-layer guidance) calls the transformer a "
            "second time per step with layers skipped, which catrt does not support; leave it None"
        )
    refuse_call_attention_kwargs(pipeline, arguments)
    _check_prompt_counts(arguments)


def _check_prompt_counts(arguments: dict[str, Any]) -> None:
    """SD3 encodes prompt_2 and prompt_3 (and, under guidance, negative_prompt_2/_3) per prompt and concatenates the
    encoders' outputs; a list of another count (or one string prompt_2/_3 for several prompts) fails deep in a
    torch.cat. Empty values fall back to the prompt, a negative string serves every prompt, as in diffusers."""
    prompt = arguments.get("prompt")
    if arguments.get("prompt_embeds") is not None or not isinstance(prompt, (str, list)):
        return
    count = 1 if isinstance(prompt, str) else len(prompt)
    names = ["prompt_2", "prompt_3"]
    if guidance_value(arguments.get("guidance_scale")) > 1 and arguments.get("negative_prompt_embeds") is None:
        names += ["negative_prompt_2", "negative_prompt_3"]
    for name in names:
        value = arguments.get(name)
        if not value or (isinstance(value, str) and name.startswith("negative")):
            continue
        given = 1 if isinstance(value, str) else len(value) if isinstance(value, list) else None
        if given is not None and given != count:
            raise ConfigError(
                f"{name} has {given} prompt(s) but prompt has {count}: give {name} one entry per prompt "
                f"(or leave it None to reuse {name.rsplit('_', 1)[0]})", field=name, value=given,
            )


def _meta_call(config: dict[str, Any], text_tokens: int, grid: Grid) -> dict[str, Any]:
    """Batch-1 meta tensors shaped like one SD3 denoising step's transformer call."""
    patch = config["patch_size"]
    return {
        "hidden_states": torch.empty(1, config["in_channels"], grid.height * patch, grid.width * patch, device="meta"),
        "timestep": torch.empty(1, device="meta"),
        "encoder_hidden_states": torch.empty(1, text_tokens, config["joint_attention_dim"], device="meta"),
        "pooled_projections": torch.empty(1, config["pooled_projection_dim"], device="meta"),
    }


_TEXT_TO_IMAGE = PipelineSpec(
    call_defaults={}, text_tokenizer="tokenizer_3", text_tokens_before=77, check_call=_check_call,
    latent_channels=LatentChannels(other_layouts="run an inpainting transformer (in_channels = 2 * out_channels + 1) "
                                                 "in StableDiffusion3InpaintPipeline"),
)
#: img2img and inpainting call the transformer once per step as text-to-image does, on the last steps `strength`
#: leaves; inpainting blends its mask into the latents outside the transformer (16-channel transformers; a 33-channel
#: inpainting transformer's mask channels are just wider input patches).
_FROM_IMAGE = replace(_TEXT_TO_IMAGE, strength_argument="strength")

#: The prompt's limit is T5's (tokenizer_3); classifier-free guidance doubles the batch.
FAMILY = register_family(Family(
    "sd3", SD3Adapter,
    {
        StableDiffusion3Pipeline: _TEXT_TO_IMAGE,
        StableDiffusion3Img2ImgPipeline: replace(_FROM_IMAGE, check_call=partial(_check_call, pipeline="StableDiffusion3Img2ImgPipeline")),
        StableDiffusion3InpaintPipeline: replace(
            _FROM_IMAGE, check_call=partial(_check_call, pipeline="StableDiffusion3InpaintPipeline"),
            # diffusers 0.42 runs in_channels 16 (the latents) or 33 (with the mask and the masked image) only
            latent_channels=LatentChannels(mask_input=True, in_channels=(16, 33)),
        ),
    },
    _meta_call,
))
