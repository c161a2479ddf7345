"""`CATConfig`: the knobs of CAT Pruning, validated when made (the rules they drive: catrt/selection.py)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

from catrt.checks import integer, number, require
from catrt.errors import ConfigError, shorten
from catrt.request_values import MAX_SEED

T = TypeVar("T")

SelectionRule = Literal["cat", "random", "round_robin", "magnitude", "sequential", "attention"]
SELECTION_RULES: tuple[str, ...] = ("cat", "random", "round_robin", "magnitude", "sequential", "attention")
#: Lloyd iterations a KMeans may run (a fixed count, no early stop): 20 clusters converge in tens, and a
#: mistyped huge count would hang the generation at step t0.
MAX_KMEANS_ITERS = 1000
#: The earliest last full step: the reference prediction is step t0 - 1's, so two full steps come first.
MIN_T0 = 2


def ceil_of_fraction(fraction: float, count: int) -> int:
    """ceil(fraction * count) where the product is an integer up to float error (0.55 * 100 is
    55.00000000000001): the spec's counts (k, the magnitude part) must not gain a token from rounding."""
    return math.ceil(fraction * count - 1e-9)


@dataclass(frozen=True)
class CATConfig:
    """How a generation is pruned.

    Args:
        alpha: fraction of image tokens recomputed on a pruned step, in (0, 1]; k = ceil(alpha * N).
        t0: the last full step before pruning starts (steps are counted from 1); needs 2 <= t0 < steps.
        n_clusters: KMeans clusters made once at step t0.
        ewma_decay: decay `a` of the staleness average f <- a * f + 1[computed], in [0, 1).
        magnitude_fraction: share of k picked by noise magnitude inside clusters, in [0, 1];
            the rest are the stalest tokens.
        refresh_every: run a full step every this many steps after t0 (0 = never).
        reuse_every: after t0, every this many steps reuse the previous step's prediction for all tokens
            without running the transformer (0 = never): the paper's DeepCache-style 1:N combination.
            It combines with any `rule`. A step that is both a refresh step and a reuse step runs full
            (a refresh is never skipped). See catrt/scheduler.py for the plan.
        reuse_threshold: First-Block-Cache-style adaptive reuse, a baseline for bench/ (0 = off): after t0,
            a step that would be pruned first runs the first block on all tokens and reuses the previous
            prediction (no further transformer work) when that block's residual moved less than this, as
            mean |r - r_last| / mean |r_last| against the last computed step. A host decision every step,
            so eager only: engines and CUDA graphs refuse it (use reuse_every there).
        seed: seed of the KMeans initialisation (and of the `random` rule), in [0, 2^63 - 1].
        trace: record the per-step schedule and indices in `last_trace`.
        kmeans_iters: Lloyd iterations of the on-device KMeans, 1 to 1000.
        rule: the token selection rule; "cat" is the method, the others are baselines for bench/.
    """

    alpha: float = 0.3
    t0: int = 8
    n_clusters: int = 20
    ewma_decay: float = 0.5
    magnitude_fraction: float = 0.25
    refresh_every: int = 0
    reuse_every: int = 0
    reuse_threshold: float = 0.0
    seed: int = 0
    trace: bool = False
    kmeans_iters: int = 20
    rule: SelectionRule = "cat"

    def __post_init__(self) -> None:
        plain_numbers(self)
        _check_number("alpha", self.alpha, "in (0, 1]", lambda v: 0.0 < v <= 1.0)
        _check_int("t0", self.t0, f">= {MIN_T0}", lambda v: v >= MIN_T0)
        _check_int("n_clusters", self.n_clusters, ">= 1", lambda v: v >= 1)
        _check_number("ewma_decay", self.ewma_decay, "in [0, 1)", lambda v: 0.0 <= v < 1.0)
        _check_number(
            "magnitude_fraction", self.magnitude_fraction, "in [0, 1]", lambda v: 0.0 <= v <= 1.0
        )
        _check_int("refresh_every", self.refresh_every, ">= 0 (0 = off)", lambda v: v >= 0)
        _check_int("reuse_every", self.reuse_every, ">= 0 (0 = off)", lambda v: v >= 0)
        _check_number("reuse_threshold", self.reuse_threshold, ">= 0 (0 = off)", lambda v: v >= 0.0)
        _check_int("seed", self.seed, f"in [0, {MAX_SEED}]", lambda v: 0 <= v <= MAX_SEED)
        _check_int("kmeans_iters", self.kmeans_iters, f"from 1 to {MAX_KMEANS_ITERS}", lambda v: 1 <= v <= MAX_KMEANS_ITERS)
        require("CATConfig", "trace", self.trace, isinstance(self.trace, bool), "a bool")
        require("CATConfig", "rule", self.rule, self.rule in SELECTION_RULES, f"one of {', '.join(SELECTION_RULES)}")

    def num_selected(self, num_tokens: int) -> int:
        """k = ceil(alpha * N), the static number of tokens a pruned step computes."""
        return min(num_tokens, max(1, ceil_of_fraction(self.alpha, num_tokens)))

    def check_steps(self, steps: int) -> None:
        """Checks that need the step count: pruning must start before the last step."""
        if not self.t0 < steps:
            # at t0's floor "lower t0" cannot be done: the line says so and names the steps that work
            floor = f" (t0 = {MIN_T0} is its minimum: run at least {MIN_T0 + 1} steps)" if self.t0 <= MIN_T0 else ""
            raise ConfigError(
                f"CATConfig.t0 = {self.t0} needs t0 < num_inference_steps, got {steps} steps; "
                f"lower t0 or run more steps{floor}",
                field="t0",
                value=self.t0,
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CATConfig:
        return config_from_dict(cls, data)


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config dataclass from its `to_dict()`; unknown keys are an error, not ignored."""
    if not isinstance(data, Mapping) or not all(isinstance(key, str) for key in data):
        raise ConfigError(
            f"{cls.__name__}.from_dict takes a dict of field names to values, got {type(data).__name__}",
            field="data", value=type(data).__name__,
        )
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {shorten(', '.join(unknown))}", field=unknown[0])
    return cls(**data)


def plain_numbers(config: Any) -> None:
    """numpy's (and other) integers, reals and bools as Python's int, float and bool: `np.int64(3)` is a count, and the
    config's dict, hash and JSON stay plain. Built-in values, bools and non-numbers are left for the checks. Any frozen
    config dataclass (CATConfig, BuildConfig)."""
    for field in fields(config):
        value = getattr(config, field.name)
        if getattr(getattr(value, "dtype", None), "kind", None) == "b" and getattr(value, "ndim", None) == 0:
            object.__setattr__(config, field.name, bool(value))  # numpy's bool (np.True_, a mask's item) is a bool
            continue
        if type(value) in (int, float, bool) or not isinstance(value, numbers.Real):
            continue
        plain = int(value) if isinstance(value, numbers.Integral) else _plain_float(value)
        object.__setattr__(config, field.name, plain)


def _plain_float(value: numbers.Real) -> float:
    """A real as the Python float it was written as: a numpy float16 / float32 by its shortest decimal
    (`np.float32(0.3)` is 0.3, not 0.30000001192092896, which would select ceil(0.30000001 * 1000) = 301
    tokens of 1000 where 0.3 selects 300). numpy prints each float type's shortest round-trip decimal."""
    if getattr(getattr(value, "dtype", None), "kind", None) == "f":
        try:
            return float(str(value))
        except ValueError:  # a type whose str is not a decimal: its value as it is
            pass
    return float(value)


def _check_number(name: str, value: Any, allowed: str, ok: Any) -> None:
    require("CATConfig", name, value, number(value) and ok(value), allowed)


def _check_int(name: str, value: Any, allowed: str, ok: Any) -> None:
    require("CATConfig", name, value, integer(value) and ok(value), f"an integer {allowed}")


def shared_k(alphas: Sequence[float], num_tokens: int) -> tuple[float, float, int] | None:
    """The first two of `alphas` that select the same k of `num_tokens` tokens, and that k; None when every k
    differs. Two such alphas run the same pruned steps (same graph, same images), so a build or server refuses them
    rather than serve one computation under two names."""
    seen: dict[int, float] = {}
    for alpha in alphas:
        k = CATConfig(alpha=alpha).num_selected(num_tokens)
        if k in seen:
            return seen[k], alpha, k
        seen[k] = alpha
    return None
