"""Which diffusers schedulers an accelerated call can run: exactly one transformer call per denoising step.

catrt's step plan (t0, refresh and reuse steps, staleness) counts transformer calls as steps, and its caches
hold one prediction per step. A scheduler that evaluates the model twice in a step (Heun, KDPM2: `order` 2) or
repeats a timestep (PNDM's PLMS warm-up runs `num_inference_steps + 1` timesteps, 4 per step in its Runge-Kutta
mode, at `order` 1) would break that count in the middle of a generation, and one that resizes the latents between
steps (FlowMatchLCM's `scale_factors`) the caches, made for one size per generation. Each is refused, naming the
scheduler, before any denoising step runs.
"""

from __future__ import annotations

from typing import Any

from catrt.errors import ConfigError

#: What the refusals of extra transformer calls end with: the rule and the schedulers that keep it.
ONE_CALL_PER_STEP = "catrt needs exactly one transformer call per step (single-evaluation schedulers such as Euler or DPM-Solver)"


def check_scheduler_order(scheduler: Any) -> None:
    """Refuse, before the pipeline runs, a scheduler whose `order` (diffusers: transformer calls per step) is not 1."""
    order = getattr(scheduler, "order", 1)
    if order != 1:
        raise ConfigError(
            f"{type(scheduler).__name__} calls the transformer {order} times per step; {ONE_CALL_PER_STEP}",
            field="scheduler", value=type(scheduler).__name__,
        )


def check_scheduler_sizes(scheduler: Any) -> None:
    """Refuse, before the pipeline runs, a scheduler that upsamples the latents between steps: FlowMatchLCM with
    scale factors (multi-scale sampling), read as its `step` reads them. Factors that are all 1 keep the size (its
    `step` interpolates to the size it had), so they run."""
    factors = getattr(scheduler, "_scale_factors", None)
    if factors and getattr(scheduler, "_upscale_mode", None) and any(factor != 1 for factor in factors):
        raise ConfigError(
            f"{type(scheduler).__name__} resizes the latents between steps (scale_factors {list(factors)}), and catrt's "
            f"caches are made for one latent size per generation; use it without scale_factors",
            field="scheduler", value=type(scheduler).__name__,
        )


def check_scheduler_timesteps(scheduler: Any, steps: int) -> None:
    """Refuse a scheduler that set more timesteps than the call's `steps` (its `num_inference_steps`, or its custom
    schedule's length): the pipeline calls the transformer once per timestep.

    Read at the first transformer call, where the pipeline has set the scheduler's timesteps and no step has run
    yet. An img2img call's timesteps are the whole schedule, of which `strength` runs the last ones: `steps` is that
    whole schedule's count too. Fewer timesteps are fine (Euler ends custom sigmas with the final one).
    """
    timesteps = getattr(scheduler, "timesteps", None)
    count = None if timesteps is None else len(timesteps)
    if count is not None and count > steps:
        raise ConfigError(
            f"{type(scheduler).__name__} set {count} timesteps for {steps} steps, so the pipeline would call the "
            f"transformer more than once in some steps; {ONE_CALL_PER_STEP}",
            field="scheduler", value=type(scheduler).__name__,
        )


def check_schedule_steps_run(scheduler: Any, schedule: tuple[str, int] | None, t0: int) -> None:
    """Refuse a custom schedule from which the scheduler runs t0 or fewer steps: every step would be a full one, an
    unpruned image from a call that asked for CAT (t0 < the steps run, as `strength` is checked). Euler's custom
    `sigmas` end with the final sigma, so n values run n - 1 steps, which `check_steps` (over n) did not see.

    Read at the first transformer call, where the pipeline has set the scheduler's timesteps (and img2img its begin
    index) and no step has run yet.
    """
    timesteps = getattr(scheduler, "timesteps", None)
    if schedule is None or timesteps is None:
        return
    begin = getattr(scheduler, "begin_index", None)
    run = len(timesteps) - (begin if isinstance(begin, int) else 0)
    if not t0 < run:
        name, values = schedule
        raise ConfigError(
            f"{type(scheduler).__name__} runs {run} steps from the {values} {name} given, and CATConfig.t0 = "
            f"{t0} needs t0 < the steps run; give more {name} values, or lower t0",
            field=name, value=values,
        )
