"""The step plan of a pruned generation: which steps run the full transformer, which a pruned one,
and which run no transformer at all.

Steps are counted from 1. Three kinds:

- "full": every token is computed. Steps 1..t0, and after t0 every `refresh_every`-th step.
- "reused": after t0, every `reuse_every`-th step returns the previous step's prediction for all
  tokens without running the transformer (DeepCache-style 1:N step reuse).
- "pruned": every other step after t0 computes the k selected tokens.

Precedence where the rules meet: full > reused > pruned. A step that is both a refresh step and a
reuse step runs full, so `refresh_every` always refreshes the caches; with refresh_every ==
reuse_every no step is reused. Both counters start at t0 (step t0 + n is a refresh step when
refresh_every divides n, a reuse step when reuse_every divides n).
"""

from __future__ import annotations

from typing import Literal

StepKind = Literal["full", "pruned", "reused"]


def step_kind(step: int, t0: int, refresh_every: int = 0, reuse_every: int = 0) -> StepKind:
    """The kind of step `step` (from 1): full up to t0, then refresh > reuse > pruned."""
    if step <= t0:
        return "full"
    after = step - t0
    if refresh_every and after % refresh_every == 0:
        return "full"
    if reuse_every and after % reuse_every == 0:
        return "reused"
    return "pruned"


def plan(steps: int, t0: int, refresh_every: int = 0, reuse_every: int = 0) -> list[StepKind]:
    """The kinds of steps 1..steps, in order."""
    return [step_kind(step, t0, refresh_every, reuse_every) for step in range(1, steps + 1)]
