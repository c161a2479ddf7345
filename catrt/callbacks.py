"""diffusers' CFG-cutoff callbacks, refused before any step where they would change the batch mid-generation.

`SD3CFGCutoffCallback` (and the SD/SDXL ones) turn guidance off after their cutoff step and keep only the last prompt
embedding (`[-1:]`), so every later step runs a batch of one; catrt makes its caches for one batch per generation, so
the runtime would refuse the next step, after the steps before it ran. Checked at the call instead, from the
callback's own config, naming the argument.
"""

from __future__ import annotations

from typing import Any

from catrt.errors import ConfigError


def check_cfg_cutoff(callback: Any, batch: int, steps: int) -> None:
    """Raise a ConfigError if `callback` (or one of a MultiPipelineCallbacks) is a CFG cutoff that fires before the
    last of `steps` transformer calls whose `batch` (images, doubled under guidance) is more than one."""
    if batch <= 1:
        return
    for part in getattr(callback, "callbacks", None) or [callback]:
        if not type(part).__name__.endswith("CFGCutoffCallback"):
            continue
        config = getattr(part, "config", {})
        index = config.get("cutoff_step_index")
        cutoff = index if index is not None else int(steps * config.get("cutoff_step_ratio", 1.0))
        if cutoff < steps - 1:  # it runs after step `cutoff`; a later step would see half the batch
            raise ConfigError(
                f"callback_on_step_end {type(part).__name__} turns guidance off after step {cutoff + 1} of {steps}, which "
                f"makes the later steps' batch 1 where catrt's caches are made for {batch}; leave it out (or give one prompt, "
                f"one image per prompt and guidance_scale <= 1)",
                field="callback_on_step_end", value=type(part).__name__,
            )
