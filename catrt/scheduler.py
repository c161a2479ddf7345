"""The step plan of a pruned generation: which steps run the full transformer."""

from __future__ import annotations

from typing import Literal

StepKind = Literal["full", "pruned"]


def step_kind(step: int, t0: int, refresh_every: int = 0) -> StepKind:
    """Steps 1..t0 are full; later steps are pruned, except every `refresh_every`-th one after t0."""
    if step <= t0:
        return "full"
    if refresh_every and (step - t0) % refresh_every == 0:
        return "full"
    return "pruned"


def plan(steps: int, t0: int, refresh_every: int = 0) -> list[StepKind]:
    """The kinds of steps 1..steps, in order."""
    return [step_kind(step, t0, refresh_every) for step in range(1, steps + 1)]
