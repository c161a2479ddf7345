"""Which built alpha the next batch runs at: fixed, or adapted to the load to hold a latency target.

A pruned step's cost is fixed by k = ceil(alpha * N), so a call's time at each alpha is predictable
from step times measured while serving. `choose_alpha` is the policy, a pure function of the queue,
those step times and the target: it simulates the queue being served batch by batch as the worker
forms batches (the head request, then later requests of the same batch key up to the batch size),
every batch at the candidate alpha except batches whose head pinned one, and picks the largest alpha
(best quality) under which every queued request - the oldest included - is predicted to finish within
the target, counted from its arrival. If none does, the smallest alpha (the fastest). A batch whose
head pinned an alpha runs at that alpha whatever the load.

`StepTimeTracker` keeps the step times current: an exponentially weighted moving average (EWMA) per
graph (the full step, the pruned step of each alpha) and of the rest of a call (text encoding, VAE
decode, PNG encoding), seeded by the warm-up calls and updated after every call.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from catrt.errors import ConfigError

AlphaPolicy = Literal["fixed", "adaptive"]
ALPHA_POLICIES: tuple[str, ...] = ("fixed", "adaptive")
#: Weight of a new measurement in the step-time averages (the rest is the running value).
EWMA_WEIGHT = 0.3


@dataclass(frozen=True)
class Queued:
    """A queued request as the policy sees it: its age (seconds since arrival), images, batch key and pin.

    Requests batch together only when their `key`s and pins are equal (the worker's key is the request's
    batch options, which hold the pin); `alpha` is the alpha the request pinned, or None.
    """

    age: float
    rows: int = 1
    key: Hashable = None
    alpha: float | None = None


@dataclass(frozen=True)
class StepTimes:
    """Seconds per full step, per pruned step of each alpha, and per call outside the steps; the schedule."""

    full: float
    pruned: Mapping[float, float]
    other: float
    full_steps: int
    pruned_steps: int

    def call_seconds(self, alpha: float) -> float:
        """Predicted time of one model call at `alpha`."""
        return self.full_steps * self.full + self.pruned_steps * self.pruned[alpha] + self.other


def check_choice(policy: str, alphas: Sequence[float], served: str) -> None:
    """The adaptive policy needs two alphas or more to choose from; `served` names what serves `alphas`."""
    if policy == "adaptive" and len(alphas) < 2:
        raise ConfigError(
            f"--alpha-policy adaptive needs at least two alphas to choose from, but {served} is served at alpha "
            f"{', '.join(f'{alpha:g}' for alpha in alphas)} only: build it with several (catrt build --alpha 0.5 0.3 0.2)",
            field="alpha", value=list(alphas),
        )


def ewma(previous: float | None, sample: float, weight: float = EWMA_WEIGHT) -> float:
    """The running average after `sample`; the first sample starts it."""
    return sample if previous is None else (1.0 - weight) * previous + weight * sample


def batches(queue: Sequence[Queued], capacity: int) -> list[list[int]]:
    """The queue's indices grouped into calls as the worker takes them: the oldest waiting request,
    then later ones with its key while they fit in `capacity` rows.

    Linear in the queue for batches of equal-sized requests (the policy runs it per alpha before every
    call, over queues of --max-queue requests): each key's requests are scanned from its first waiting
    one, and a scan stops once the call is full (every request has at least one row)."""
    by_key: dict[Hashable, list[int]] = {}
    for index, request in enumerate(queue):
        by_key.setdefault(_batch_key(request), []).append(index)
    start = dict.fromkeys(by_key, 0)  # each key's first index in by_key[key] that may still wait
    taken = [False] * len(queue)
    groups, head = [], 0
    while head < len(queue):
        key = _batch_key(queue[head])
        same, group, rows = by_key[key], [], 0
        for index in same[start[key]:]:
            if taken[index] or rows + queue[index].rows > capacity:
                continue
            group.append(index)
            rows += queue[index].rows
            if rows >= capacity:
                break
        if not group:  # a head larger than the batch still runs alone (the worker refuses such requests earlier)
            group = [head]
        for index in group:
            taken[index] = True
        while start[key] < len(same) and taken[same[start[key]]]:
            start[key] += 1
        groups.append(group)
        while head < len(queue) and taken[head]:
            head += 1
    return groups


def _batch_key(request: Queued) -> Hashable:
    """What a request batches by: its key and its pin (a call runs at one alpha, so a pinned request never shares an
    unpinned one's call, nor another pin's, whatever keys a caller of the policy gives)."""
    return request.key, request.alpha


def predicted_latencies(queue: Sequence[Queued], times: StepTimes, capacity: int, alpha: float) -> list[float]:
    """Each queued request's predicted latency (age + time until its call ends) if unpinned calls run at `alpha`."""
    latencies = [0.0] * len(queue)
    elapsed = 0.0
    for group in batches(queue, capacity):
        pinned = queue[group[0]].alpha
        elapsed += times.call_seconds(alpha if pinned is None else pinned)
        for index in group:
            latencies[index] = queue[index].age + elapsed
    return latencies


def choose_alpha(
    queue: Sequence[Queued], times: StepTimes, target: float, alphas: Sequence[float] | None = None,
    capacity: int = 1,
) -> float:
    """The alpha of the queue head's call: its pin; else the largest alpha keeping every queued
    request's predicted latency within `target` seconds; else the smallest alpha.

    `alphas`: the built alphas to choose from (None = those `times` has pruned step times for);
    `capacity`: the rows of one call (the build's batch)."""
    if queue and queue[0].alpha is not None:
        return queue[0].alpha
    alphas = tuple(times.pruned) if alphas is None else alphas
    for alpha in sorted(alphas, reverse=True):
        if all(latency <= target for latency in predicted_latencies(queue, times, capacity, alpha)):
            return alpha
    return min(alphas)


class StepTimeTracker:
    """EWMA step times per graph, from the phase timings of each served call."""

    def __init__(self, full_steps: int, pruned_steps: int, weight: float = EWMA_WEIGHT) -> None:
        self.full_steps = full_steps
        self.pruned_steps = pruned_steps
        self.weight = weight
        self.full: float | None = None
        self.pruned: dict[float, float] = {}
        self.other: float | None = None

    def observe(self, alpha: float, phases: Mapping[str, float]) -> None:
        """Fold one call's phases (seconds: encode, full_steps, pruned_steps, decode, ...) into the averages."""
        steps = ("full_steps", "pruned_steps")
        if self.full_steps:
            self.full = ewma(self.full, phases["full_steps"] / self.full_steps, self.weight)
        if self.pruned_steps:
            self.pruned[alpha] = ewma(self.pruned.get(alpha), phases["pruned_steps"] / self.pruned_steps, self.weight)
        rest = sum(seconds for name, seconds in phases.items() if name not in steps)
        self.other = ewma(self.other, rest, self.weight)

    def times(self, alphas: Sequence[float]) -> StepTimes:
        """The current averages; an alpha not measured yet counts as the slowest one measured."""
        slowest = max(self.pruned.values(), default=0.0)
        return StepTimes(
            full=self.full or 0.0,
            pruned={alpha: self.pruned.get(alpha, slowest) for alpha in alphas},
            other=self.other or 0.0,
            full_steps=self.full_steps,
            pruned_steps=self.pruned_steps,
        )


class AlphaChooser:
    """The worker's side of the policy: the alpha of each call, and the step times kept current."""

    def __init__(
        self, policy: AlphaPolicy, target: float | None, alphas: Sequence[float], capacity: int, tracker: StepTimeTracker
    ) -> None:
        self.policy = policy
        self.target = target
        self.alphas = tuple(alphas)
        self.capacity = capacity
        self.tracker = tracker

    def choose(self, queue: Sequence[Queued]) -> float:
        """A pinned head's alpha; else `fixed`: the default (first) alpha, `adaptive`: `choose_alpha`'s.

        The queue may hold requests for other builds (other sizes) pinning alphas this build does not
        serve; their calls count at this build's slowest measured pruned step, never optimistically.
        """
        if queue and queue[0].alpha is not None:
            return queue[0].alpha
        if self.policy == "fixed" or self.target is None:
            return self.alphas[0]
        foreign = dict.fromkeys(request.alpha for request in queue
                                if request.alpha is not None and request.alpha not in self.alphas)
        times = self.tracker.times((*self.alphas, *foreign))
        return choose_alpha(queue, times, self.target, self.alphas, self.capacity)
