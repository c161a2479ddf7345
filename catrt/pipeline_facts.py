"""Facts of a registered pipeline class, looked up by the class name a bundle's manifest records.

A bundle is checked without loading its pipeline, so its facts are read from the `PipelineSpec` registered for
`model.pipeline_class`: the graph rows per image and the text tokens before `max_sequence_length`. A loaded
pipeline's latent channels are checked against its transformer's with its class's `LatentChannels`.
"""

from __future__ import annotations

import importlib
from typing import Any

from catrt.errors import ConfigError
from catrt.pipeline_spec import LatentChannels, PipelineSpec


def text_tokens_before(pipeline_class: str) -> int | None:
    """The text tokens a registered pipeline class (by name) puts before its `max_sequence_length` ones, as its
    `PipelineSpec.text_tokens_before` declares; None for a class not registered or that does not declare it."""
    spec = _registered_spec(pipeline_class)
    return None if spec is None else spec.text_tokens_before


def rows_per_image(pipeline_class: str) -> int | None:
    """The graph rows per image of a build of a registered pipeline class (by name): 2 under classifier-free
    guidance ([uncond, cond]; engines always run it), 1 under distilled guidance; None for a class not registered."""
    spec = _registered_spec(pipeline_class)
    if spec is None:
        return None
    return 2 if spec.guidance == "cfg" else 1


def _registered_spec(pipeline_class: str) -> PipelineSpec | None:
    """The PipelineSpec registered for a pipeline class by name, whichever module registered it: the families'
    modules and `catrt.loading`'s models (the reference pipeline), imported here, where graphs are read, so a
    bundle is judged the same whether or not its pipeline was imported before."""
    importlib.import_module("catrt.loading")  # registers the reference pipeline's spec
    from catrt.models import PIPELINES, pipeline_named

    cls = pipeline_named(pipeline_class)
    return None if cls is None else PIPELINES[cls]


def check_latent_channels(pipe: Any, spec: PipelineSpec) -> None:
    """Refuse, before any step, a transformer whose channels do not fit the latents its pipeline class makes (the
    spec's `LatentChannels`, from the transformer's and the VAE's config): diffusers loads any, and failed in the
    scheduler at the first step, or in the VAE decode after every step had run. A ConfigError names the config key,
    its value and the fix; a class with no declared rule, or a pipeline without a VAE config, is not checked there."""
    rule = spec.latent_channels
    transformer = getattr(pipe, "transformer", None)
    if rule is None or transformer is None:
        return
    inputs, outputs = transformer.config.in_channels, transformer.out_channels
    latent = _vae_latent_channels(pipe)
    name, pipeline = type(transformer).__name__, type(pipe).__name__
    if rule.mask_input:
        if latent is not None:
            _check_mask_input(rule, name, pipeline, inputs, outputs, latent)
        _check_accepted_inputs(rule, name, pipeline, inputs)
        return
    if outputs not in _predictions(rule, inputs):
        fix = f"set out_channels to {inputs} in the transformer's config.json"
        raise ConfigError(
            f"{name} config out_channels {outputs} with in_channels {inputs}: {pipeline} makes latents of the "
            f"transformer's input channels and steps them by its prediction, which fails in the scheduler for "
            f"{outputs} channels; {fix}" + (f", or {rule.other_layouts}" if rule.other_layouts else ""),
            field="out_channels", value=outputs,
        )
    if latent is not None and inputs != latent * rule.packing:
        made = f"in_channels // {rule.packing} = {inputs // rule.packing}" if rule.packing > 1 else f"in_channels = {inputs}"
        raise ConfigError(
            f"{name} config in_channels {inputs} does not fit the VAE's latent_channels {latent}: {pipeline} makes "
            f"latents of {made} channels, which the VAE's decode fails on after every step has run; set in_channels "
            f"(and out_channels) to {latent * rule.packing} in the transformer's config.json, or use a VAE of "
            f"latent_channels {inputs // rule.packing}",
            field="in_channels", value=inputs,
        )


def _check_mask_input(rule: LatentChannels, name: str, pipeline: str, inputs: int, outputs: int, latent: int) -> None:
    """An inpainting pipeline's latents are the VAE's: the transformer reads them (or them, the masked image's and the
    mask: 2 * channels + 1) and predicts them."""
    channels = latent * rule.packing
    if inputs not in (channels, 2 * channels + 1):
        raise ConfigError(
            f"{name} config in_channels {inputs} does not fit the VAE's latent_channels {latent}: {pipeline} feeds the "
            f"transformer {channels} latent channels (or {2 * channels + 1} with the mask and the masked image); set "
            f"in_channels to {channels} or {2 * channels + 1} in the transformer's config.json",
            field="in_channels", value=inputs,
        )
    if outputs not in _predictions(rule, channels):
        raise ConfigError(
            f"{name} config out_channels {outputs} does not fit the VAE's latent_channels {latent}: {pipeline} steps "
            f"latents of {channels} channels by the prediction, which fails in the scheduler for {outputs} channels; set "
            f"out_channels to {channels} in the transformer's config.json",
            field="out_channels", value=outputs,
        )


def _check_accepted_inputs(rule: LatentChannels, name: str, pipeline: str, inputs: int) -> None:
    """A pipeline class that runs only the transformer inputs it names (SD3 inpainting: 16 or 33) refuses any other at
    the call with diffusers' ValueError, even one that fits its VAE (in_channels 8 with an 8-channel VAE)."""
    if rule.in_channels and inputs not in rule.in_channels:
        accepted = " or ".join(str(value) for value in rule.in_channels)
        raise ConfigError(
            f"{name} config in_channels {inputs} is not one {pipeline} runs: it takes a transformer of in_channels "
            f"{accepted} only (diffusers refuses any other at the call, whatever the VAE); set in_channels to "
            f"{accepted} in the transformer's config.json, and the VAE's latent_channels to fit it",
            field="in_channels", value=inputs,
        )


def _predictions(rule: LatentChannels, channels: int) -> tuple[int, ...]:
    """The prediction channels a pipeline steps latents of `channels` by: those, or twice them with a learned variance."""
    return (channels, 2 * channels) if rule.learned_variance else (channels,)


def _vae_latent_channels(pipe: Any) -> int | None:
    """The latent channels of the pipeline's VAE config; None for a pipeline without one (no decode to fail)."""
    config = getattr(getattr(pipe, "vae", None), "config", None)
    latent = getattr(config, "latent_channels", None) if config is not None else None
    return latent if isinstance(latent, int) and not isinstance(latent, bool) else None
