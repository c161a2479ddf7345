"""`PipelineSpec`: what catrt must know about a diffusers pipeline class, declared as data once.

Each adapter module registers the spec of the pipeline classes its family runs (`PIPELINES` there),
so a new family's pipeline facts live next to its adapter. Whether a call doubles the batch for
guidance is one of these facts: nothing else in catrt reads `guidance_scale` to decide it.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from catrt.checks import require
from catrt.errors import ConfigError, echo
from catrt.tokens import Grid

#: "cfg": classifier-free guidance stacks [uncond, cond] rows when guidance_scale > 1 (SD3, PixArt);
#: "distilled": guidance is an input of the transformer (FLUX-dev's embedding; none on schnell), one row per image.
Guidance = Literal["cfg", "distilled"]
GUIDANCE_KINDS: tuple[str, ...] = get_args(Guidance)


@dataclass(frozen=True)
class LatentChannels:
    """How a pipeline class makes its latents' channels from its transformer's and its VAE's config, so a transformer
    of another layout (diffusers loads any) is refused before a step instead of failing in the scheduler or the VAE
    decode after all of them. A latent token has `packing` * the VAE's latent_channels channels; the transformer reads
    those (or, with `mask_input`, also the mask and the masked image's latents: 2 * that + 1, SD3's inpainting layout)
    and predicts those (or, with `learned_variance`, twice that: PixArt's variance, whose first half steps the
    latents). `in_channels`, where the pipeline class names the values it runs whatever the VAE (SD3 inpainting: 16 or
    33, as diffusers checks at the call), limits the transformer's input to them."""

    packing: int = 1
    mask_input: bool = False
    learned_variance: bool = False
    # The fix for a transformer of another pipeline's layout (its input wider than its prediction), named in the refusal.
    other_layouts: str = ""
    # The only transformer in_channels the pipeline class runs (its own check at the call); empty: any that fits.
    in_channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        packing = self.packing
        require("LatentChannels", "packing", packing, isinstance(packing, int) and not isinstance(packing, bool) and packing >= 1,
                "a whole number >= 1")
        for name in ("mask_input", "learned_variance"):  # a string "False" would read as true: a rule other than given
            require("LatentChannels", name, getattr(self, name), isinstance(getattr(self, name), bool), "True or False")
        require("LatentChannels", "other_layouts", self.other_layouts, isinstance(self.other_layouts, str), "a string")
        values = self.in_channels
        require("LatentChannels", "in_channels", values, isinstance(values, tuple) and all(
            isinstance(value, int) and not isinstance(value, bool) and value >= 1 for value in values),
                "a tuple of whole numbers >= 1")


@dataclass(frozen=True)
class PipelineSpec:
    """Per pipeline class: the extra call arguments catrt's own callers (CLI, server) pass, which
    tokenizer limits a prompt's length (so callers can refuse a long prompt instead of letting the
    pipeline truncate it), how guidance reaches the transformer, and for packed latents the token grid
    of a call."""

    call_defaults: dict[str, Any]
    # The pipeline attribute holding the tokenizer whose length is the prompt's limit (SD3: T5's).
    text_tokenizer: str = "tokenizer"
    # The call argument that sets that length; None where the tokenizer's own max_length fixes it.
    text_length_argument: str | None = "max_sequence_length"
    # Text tokens the transformer sees before the `text_length_argument` ones (SD3: CLIP's 77; PixArt, FLUX: 0, T5
    # alone). A bundle's text length is checked against its graphs with it; None (not declared): only as at most theirs.
    text_tokens_before: int | None = None
    guidance: Guidance = "cfg"
    # (pipe, call arguments) -> the token grid, where the transformer's latents do not carry it (packed).
    token_grid: Callable[[Any, dict[str, Any]], Grid] | None = field(default=None, compare=False)
    # (call arguments) -> raises a catrt error naming an argument catrt cannot run (e.g. two calls per step).
    check_call: Callable[[dict[str, Any]], None] | None = field(default=None, compare=False)
    # (pipe) -> values for arguments whose own default this pipeline cannot run with (PixArt's resolution binning on
    # a transformer without a bin table, such as a 128-pixel one); `accelerate` uses them only where a call omits them.
    default_fixes: Callable[[Any], dict[str, Any]] | None = field(default=None, compare=False)
    # The call argument with which the pipeline runs only the last steps of its schedule (img2img and inpainting's
    # `strength`, see `strength_steps`); None where every call runs all of them. catrt's t0 counts the steps run.
    strength_argument: str | None = None
    # How the pipeline's latents' channels follow from its transformer's and VAE's config; None: not checked (a
    # registered class whose rule catrt does not know, such as FLUX Fill's 384 -> 64 channels).
    latent_channels: LatentChannels | None = None

    @property
    def reads_negative_prompt(self) -> bool:
        """Whether a run reads a negative prompt: only classifier-free guidance has an unconditional pass (FLUX reads
        one only for true CFG, which catrt refuses)."""
        return self.guidance != "distilled"

    def refuse_unread_negative_prompt(self, negative: str | None, name: str) -> None:
        """catrt's CLI and server refuse a non-blank negative prompt a pipeline would not read (`reads_negative_prompt`),
        which diffusers ignores silently. The Python API takes what diffusers takes."""
        if not self.reads_negative_prompt and negative is not None and negative.strip():
            raise ConfigError(
                f"{name} is unused by this model: its guidance is distilled (an input of the transformer, with no pass "
                f"over a negative prompt), so it would change nothing; drop {name}",
                field="negative_prompt",
            )

    def __post_init__(self) -> None:
        # A misspelt guidance kind would silently score a CFG pipeline's uncond rows as prompts of their own.
        require("PipelineSpec", "guidance", self.guidance, self.guidance in GUIDANCE_KINDS, f"one of {', '.join(GUIDANCE_KINDS)}")
        before = self.text_tokens_before
        require("PipelineSpec", "text_tokens_before", before,
                before is None or (isinstance(before, int) and not isinstance(before, bool) and before >= 0),
                "None or a whole number >= 0")
        strength = self.strength_argument
        require("PipelineSpec", "strength_argument", strength, strength is None or (isinstance(strength, str) and strength != ""),
                "None or an argument name")
        channels = self.latent_channels
        require("PipelineSpec", "latent_channels", channels, channels is None or isinstance(channels, LatentChannels),
                "None or a LatentChannels")
        for name in ("token_grid", "check_call", "default_fixes"):
            value = getattr(self, name)
            require("PipelineSpec", name, value, value is None or callable(value), "None or a function")

    @property
    def takes_image(self) -> bool:
        """Whether a call needs an input image (img2img, inpainting: the pipelines with a `strength`), which catrt's
        text-only callers (CLI, server, build) cannot give; the Python API runs them."""
        return self.strength_argument is not None

    def doubles_batch(self, arguments: dict[str, Any]) -> bool:
        """Whether the transformer sees [uncond, cond] rows for this call.

        Classifier-free guidance pipelines double the batch exactly when guidance_scale > 1
        (diffusers' `do_classifier_free_guidance`); a distilled guidance embedding never does.
        """
        return self.guidance == "cfg" and guidance_value(arguments.get("guidance_scale", 1.0)) > 1.0


def guidance_value(scale: Any) -> float:
    """A call's guidance_scale as a float; anything but a real number (None, a string) is refused by name."""
    try:
        if isinstance(scale, (str, bytes)):
            raise TypeError
        return float(scale)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        raise ConfigError(f"guidance_scale must be a number, got {echo(scale)}", field="guidance_scale", value=repr(scale)) from None


def call_default(pipe: Any, name: str) -> Any:
    """The default of argument `name` in the pipeline's own `__call__` (what a call that omits it gets)."""
    return inspect.signature(pipe.__call__).parameters[name].default


def custom_schedule(arguments: dict[str, Any]) -> tuple[str, int] | None:
    """The name and length of a call's custom `sigmas` or `timesteps`, None without one (diffusers'
    `retrieve_timesteps` then runs that many steps and ignores `num_inference_steps`)."""
    for name in ("sigmas", "timesteps"):
        schedule = arguments.get(name)
        if schedule is not None:
            return name, len(schedule)
    return None


def denoising_steps(arguments: dict[str, Any]) -> Any:
    """How many steps (transformer calls) a diffusers call runs: the length of its custom schedule where
    given, else `num_inference_steps` (a Python int for any integer type diffusers takes, such as numpy's)."""
    schedule = custom_schedule(arguments)
    if schedule is not None:
        return schedule[1]
    steps = arguments.get("num_inference_steps")
    return int(steps) if isinstance(steps, numbers.Integral) and not isinstance(steps, bool) else steps


def real_scalar(value: Any) -> float | None:
    """`value` as a float where diffusers computes with it as one real number: a Python or numpy real, or a 0-d real
    tensor or array; None for anything else (a bool, a string, several values, a complex number)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        try:
            item = value.item()
        except (RuntimeError, ValueError, NotImplementedError):  # a meta tensor has no value to read
            return None
        if isinstance(item, numbers.Real) and not isinstance(item, bool):
            return float(item)
    return None


def strength_steps(arguments: dict[str, Any], steps: int, name: str = "strength") -> int:
    """How many of a `steps`-step schedule an img2img call runs (transformer calls): diffusers' `get_timesteps`, which
    skips int(steps - steps * strength) steps (12 steps at strength 0.3 run 12 - int(8.4) = 4, not int(3.6) = 3).
    A strength that is not a number from 0 to 1 is refused by name, as diffusers' `check_inputs` does later, where
    it would fail in catrt's count first; a 0-d tensor or numpy scalar is a number, as it is to diffusers (the count
    computes with the value as given, so it rounds as diffusers' does)."""
    strength = arguments.get(name)
    value = real_scalar(strength)
    if value is None or not 0 <= value <= 1:
        raise ConfigError(f"{name} must be a number from 0 to 1, got {echo(strength)}", field=name, value=repr(strength))
    start = int(max(steps - min(steps * strength, steps), 0))
    return steps - start
