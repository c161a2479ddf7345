"""The reference text-to-image pipeline: a small trained SD3 transformer denoising pixels directly.

It is shaped like diffusers' `StableDiffusion3Pipeline` (same argument names, the same
classifier-free-guidance batch layout [uncond, cond], exactly one transformer call per
step, `FlowMatchEulerDiscreteScheduler`) so that anything that hooks or replaces the SD3
transformer call can be measured on it. There is no VAE: the "latents" are the
(B, 3, H, W) pixels in [-1, 1].
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, SD3Transformer2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedTokenizerFast

from catrt.errors import echo
from catrt.pipeline import PipelineSpec, register_pipeline
from catrt.reference.checksums import verify_files
from catrt.reference.text import ReferenceTextEncoder, caption_vocabulary, token_ids, word_tokenizer

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
CONFIG_FILE = "config.json"
TRANSFORMER_FILE = "transformer.safetensors"
TEXT_ENCODER_FILE = "text_encoder.safetensors"

TEXT_WIDTH = 64
TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 32, "patch_size": 2, "in_channels": 3, "out_channels": 3, "num_layers": 4,
    "attention_head_dim": 24, "num_attention_heads": 4, "joint_attention_dim": TEXT_WIDTH,
    "caption_projection_dim": 96, "pooled_projection_dim": TEXT_WIDTH, "pos_embed_max_size": 32,
    "dual_attention_layers": (), "qk_norm": None,
}
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "max_length": 16, "width": TEXT_WIDTH, "num_layers": 2, "num_heads": 4,
    "joint_attention_dim": TEXT_WIDTH, "pooled_projection_dim": TEXT_WIDTH,
}
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
StepEndCallback = Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks


def default_configs() -> dict[str, Any]:
    """The configs `train` builds modules from and writes next to the weights."""
    vocab = caption_vocabulary()
    return {
        "transformer": dict(TRANSFORMER_CONFIG),
        "text_encoder": {**TEXT_ENCODER_CONFIG, "vocab_size": len(vocab)},
        "scheduler": dict(SCHEDULER_CONFIG),
        "vocab": vocab,
    }


def build_modules(configs: dict[str, Any]) -> dict[str, Any]:
    """Untrained pipeline components from a configs dict (see `default_configs`)."""
    transformer_config = {**configs["transformer"]}
    transformer_config["dual_attention_layers"] = tuple(transformer_config["dual_attention_layers"])
    return {
        "transformer": SD3Transformer2DModel(**transformer_config),
        "text_encoder": ReferenceTextEncoder(**configs["text_encoder"]),
        "tokenizer": word_tokenizer(configs["vocab"], configs["text_encoder"]["max_length"]),
        "scheduler": FlowMatchEulerDiscreteScheduler(**configs["scheduler"]),
    }


class ReferencePipeline(DiffusionPipeline):
    """Text-to-image in pixel space with the SD3 denoising loop."""

    model_cpu_offload_seq = "text_encoder->transformer"
    # What a step-end callback may read and replace, by SD3's names (tokens and pooled are the prompt embeddings).
    _callback_tensor_inputs = ["latents", "prompt_embeds", "pooled_prompt_embeds"]

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        text_encoder: ReferenceTextEncoder,
        tokenizer: PreTrainedTokenizerFast,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )
        self.vae_scale_factor = 1  # pixel space: one latent cell per pixel, as diffusers pipelines report it
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._interrupt = False
        self._guidance_scale = 1.0
        self._num_timesteps = 0

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a step-end callback to skip the remaining steps, as in diffusers."""
        return self._interrupt

    @property
    def guidance_scale(self) -> float:
        """The current call's guidance scale; a step-end callback may lower it (`pipe._guidance_scale = 0.0`)."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        """The steps of the current (or last) call, which diffusers' step-end callbacks read."""
        return self._num_timesteps

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> ReferencePipeline:
        """Load a saved folder, then copy its weights (a few MB) out of the safetensors mapping diffusers leaves
        them in: at those addresses BLAS rounds differently, and the folder would not draw the name's image."""
        pipeline = super().from_pretrained(*args, **kwargs)
        for module in (pipeline.transformer, pipeline.text_encoder):
            for tensor in (*module.parameters(), *module.buffers()) if module is not None else ():
                if not tensor.is_meta:
                    tensor.data = tensor.data.clone()
        return pipeline

    def _embed(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ids = token_ids(self.tokenizer, prompts).to(device)
        return self.text_encoder(ids)

    def encode_prompt(
        self,
        prompt: list[str],
        negative_prompt: list[str] | None,
        num_images_per_prompt: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, pooled) per image; with a negative prompt, [uncond; cond] along the batch."""
        tokens, pooled = self._embed(prompt, device)
        if negative_prompt is not None:
            neg_tokens, neg_pooled = self._embed(negative_prompt, device)
            tokens, pooled = torch.cat([neg_tokens, tokens]), torch.cat([neg_pooled, pooled])
        tokens = tokens.repeat_interleave(num_images_per_prompt, dim=0)
        return tokens, pooled.repeat_interleave(num_images_per_prompt, dim=0)

    def check_inputs(self, height: int, width: int, output_type: str, tensor_inputs: Sequence[str] | None = ()) -> None:
        """Reject sizes the patch grid or position table cannot hold, unknown output types and callback tensors."""
        patch = self.transformer.config.patch_size
        largest = self.transformer.config.pos_embed_max_size * patch
        for name, value in (("height", height), ("width", width)):
            if value % patch or not 0 < value <= largest:
                raise ValueError(f"{name} must be a positive multiple of {patch} up to {largest}, got {value}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {echo(output_type)}")
        unknown = [name for name in tensor_inputs or () if name not in self._callback_tensor_inputs]  # None: as SD3, none
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got "
                             f"{echo(unknown)}")

    @staticmethod
    def _prompt_lists(
        prompt: str | list[str], negative_prompt: str | list[str] | None, guided: bool
    ) -> tuple[list[str], list[str] | None]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not guided:
            return prompts, None
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        return prompts, negatives

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int = 32,
        width: int = 32,
        num_inference_steps: int = 28,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        sigmas: Sequence[float] | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None = ("latents",),
    ) -> ImagePipelineOutput | tuple[Any]:
        """Generate images; guidance_scale <= 1 turns classifier-free guidance off.

        `sigmas` (a custom schedule: that many steps, `num_inference_steps` ignored) and `callback_on_step_end`
        (called after each step as `callback(pipe, i, t, {name: tensor})`, its returned tensors replacing those
        named) work as in diffusers' SD3 pipeline, so code written for it runs here.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(height, width, output_type, callback_on_step_end_tensor_inputs)
        self._interrupt, self._guidance_scale = False, guidance_scale
        guided = self.do_classifier_free_guidance
        prompts, negatives = self._prompt_lists(prompt, negative_prompt, guided)
        device = self._execution_device
        tokens, pooled = self.encode_prompt(prompts, negatives, num_images_per_prompt, device)
        shape = (len(prompts) * num_images_per_prompt, self.transformer.config.in_channels, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=tokens.dtype)
        else:
            latents = latents.to(device=device, dtype=tokens.dtype)
        step_end = None if callback_on_step_end is None else (callback_on_step_end, tuple(callback_on_step_end_tensor_inputs))
        latents = self._denoise(latents, tokens, pooled, num_inference_steps, sigmas, step_end)
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _denoise(
        self,
        latents: torch.Tensor,
        tokens: torch.Tensor,
        pooled: torch.Tensor,
        num_inference_steps: int,
        sigmas: Sequence[float] | None = None,
        step_end: tuple[StepEndCallback, tuple[str, ...]] | None = None,
    ) -> torch.Tensor:
        """SD3's loop: one transformer call per step on [uncond; cond], then an Euler step (and the step-end callback)."""
        if sigmas is None:
            self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        else:
            self.scheduler.set_timesteps(sigmas=list(sigmas), device=latents.device)
        self._num_timesteps = len(self.scheduler.timesteps)
        with self.progress_bar(total=self._num_timesteps) as progress_bar:
            for i, t in enumerate(self.scheduler.timesteps):
                if self.interrupt:
                    continue
                guided = self.do_classifier_free_guidance  # read each step: a callback may turn guidance off
                model_input = torch.cat([latents] * 2) if guided else latents
                timestep = t.expand(model_input.shape[0])
                velocity = self.transformer(
                    hidden_states=model_input,
                    encoder_hidden_states=tokens,
                    pooled_projections=pooled,
                    timestep=timestep,
                    return_dict=False,
                )[0]
                if guided:
                    uncond, cond = velocity.chunk(2)
                    velocity = uncond + self._guidance_scale * (cond - uncond)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                if step_end is not None:
                    callback, names = step_end
                    current = {"latents": latents, "prompt_embeds": tokens, "pooled_prompt_embeds": pooled}
                    outputs = callback(self, i, t, {name: current[name] for name in names})
                    latents = outputs.pop("latents", latents)
                    tokens = outputs.pop("prompt_embeds", tokens)
                    pooled = outputs.pop("pooled_prompt_embeds", pooled)
                progress_bar.update()
        return latents



# The reference pipeline brings its own spec: its word tokenizer has a fixed length, no call argument.
register_pipeline(ReferencePipeline, PipelineSpec(call_defaults={}, text_length_argument=None))

def load_reference_pipeline(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, weights_dir: Path | None = None
) -> ReferencePipeline:
    """The shipped trained pipeline (or `weights_dir`'s), built from its configs and safetensors; no network.

    Each file is checked against its recorded digest first (`catrt.reference.checksums`): a missing, damaged or
    edited one is a CorruptBundleError naming it."""
    weights_dir = WEIGHTS_DIR if weights_dir is None else Path(weights_dir)
    verify_files(weights_dir, (CONFIG_FILE, TRANSFORMER_FILE, TEXT_ENCODER_FILE))
    configs = json.loads((weights_dir / CONFIG_FILE).read_text())
    modules = build_modules(configs)
    for name, file in (("transformer", TRANSFORMER_FILE), ("text_encoder", TEXT_ENCODER_FILE)):
        modules[name].load_state_dict(load_file(weights_dir / file))
        # nn.Module.to, not ModelMixin.to: diffusers 0.42 warns on every dtype cast even with no fp32 modules.
        nn.Module.to(modules[name].eval(), device=device, dtype=dtype)
    logger.info("loaded reference pipeline from %s", weights_dir)
    return ReferencePipeline(**modules)
