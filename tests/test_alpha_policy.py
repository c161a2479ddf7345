"""The load-adaptive alpha policy on synthetic queues, its EWMA step times, and a worker that uses it."""

from __future__ import annotations

import pytest

from catrt.cli import main

from catrt.serve.alpha_policy import (
    AlphaChooser,
    Queued,
    StepTimes,
    StepTimeTracker,
    batches,
    choose_alpha,
    ewma,
    predicted_latencies,
)

ALPHAS = (0.2, 0.3, 0.5)
# 4 full steps of 0.1 s, 8 pruned steps of alpha x 0.2 s, 0.1 s around them: a call takes
# 0.82 s at alpha 0.2, 0.98 s at 0.3 and 1.3 s at 0.5.
TIMES = StepTimes(full=0.1, pruned={alpha: 0.2 * alpha for alpha in ALPHAS}, other=0.1, full_steps=4, pruned_steps=8)
CALL = {alpha: TIMES.call_seconds(alpha) for alpha in ALPHAS}


def test_a_calls_time_is_its_steps_at_their_measured_times() -> None:
    assert CALL == pytest.approx({0.2: 0.82, 0.3: 0.98, 0.5: 1.3})


def test_light_load_runs_the_largest_alpha() -> None:
    assert choose_alpha([Queued(age=0.0, rows=1)], TIMES, target=2.0, alphas=ALPHAS, capacity=1) == 0.5
    assert choose_alpha([], TIMES, target=2.0, alphas=ALPHAS, capacity=1) == 0.5  # nothing waits: best quality


def test_the_largest_alpha_that_keeps_every_queued_request_within_the_target_is_chosen() -> None:
    queue = [Queued(age=0.5, rows=1), Queued(age=0.0, rows=1)]  # two calls; the second ends last
    # the last ends after 2 calls: 2.6 s at 0.5, 1.96 s at 0.3, 1.64 s at 0.2
    assert predicted_latencies(queue, TIMES, 1, 0.5) == pytest.approx([0.5 + 1.3, 2.6])
    assert choose_alpha(queue, TIMES, target=2.0, alphas=ALPHAS, capacity=1) == 0.3
    assert choose_alpha(queue, TIMES, target=1.9, alphas=ALPHAS, capacity=1) == 0.2
    assert choose_alpha(queue, TIMES, target=2.7, alphas=ALPHAS, capacity=1) == 0.5


def test_the_oldest_request_alone_can_force_a_smaller_alpha() -> None:
    old = [Queued(age=1.0, rows=1)]  # 1.0 + 1.3 > 2.0 but 1.0 + 0.98 fits
    assert choose_alpha(old, TIMES, target=2.0, alphas=ALPHAS, capacity=1) == 0.3


def test_overload_runs_the_smallest_alpha() -> None:
    queue = [Queued(age=0.0, rows=1)] * 10  # ten calls: even at 0.2 the last ends after 8.2 s
    assert choose_alpha(queue, TIMES, target=2.0, alphas=ALPHAS, capacity=1) == 0.2
    assert choose_alpha([Queued(age=5.0, rows=1)], TIMES, target=2.0, alphas=ALPHAS, capacity=1) == 0.2  # already late


def test_batching_is_simulated_as_the_worker_batches() -> None:
    queue = [Queued(0.0, 1, key="a"), Queued(0.0, 1, key="b"), Queued(0.0, 1, key="a"), Queued(0.0, 2, key="a")]
    assert batches(queue, capacity=2) == [[0, 2], [1], [3]]
    # four requests of one key in calls of four rows are one call: within 2 s at alpha 0.5
    assert choose_alpha([Queued(0.0, 1)] * 4, TIMES, target=2.0, alphas=ALPHAS, capacity=4) == 0.5
    assert choose_alpha([Queued(0.0, 1)] * 4, TIMES, target=2.0, alphas=ALPHAS, capacity=1) == 0.2


def test_a_pinned_head_runs_its_alpha_and_pinned_calls_count_at_their_alpha() -> None:
    overloaded = [Queued(0.0, 1, key=("pin", 0.5), alpha=0.5)] + [Queued(0.0, 1)] * 10
    assert choose_alpha(overloaded, TIMES, target=2.0, alphas=ALPHAS, capacity=1) == 0.5  # honoured under overload
    light = [Queued(0.0, 1, key=("pin", 0.2), alpha=0.2)]
    assert choose_alpha(light, TIMES, target=60.0, alphas=ALPHAS, capacity=1) == 0.2  # and under light load
    # An unpinned head followed by a pinned 0.5 call: that call costs 1.3 s whatever the head's alpha.
    queue = [Queued(0.0, 1), Queued(0.0, 1, key="pinned", alpha=0.5)]
    assert predicted_latencies(queue, TIMES, 1, 0.2) == pytest.approx([0.82, 0.82 + 1.3])
    assert choose_alpha(queue, TIMES, target=2.3, alphas=ALPHAS, capacity=1) == 0.3  # 0.98 + 1.3 fits, 1.3 + 1.3 not
    assert choose_alpha(queue, TIMES, target=2.2, alphas=ALPHAS, capacity=1) == 0.2


def test_ewma_starts_at_the_first_sample_and_moves_by_its_weight() -> None:
    assert ewma(None, 2.0) == 2.0
    assert ewma(2.0, 1.0, weight=0.25) == pytest.approx(1.75)
    tracker = StepTimeTracker(full_steps=4, pruned_steps=8, weight=0.5)
    tracker.observe(0.5, {"encode": 0.05, "full_steps": 0.4, "pruned_steps": 0.8, "decode": 0.05})
    tracker.observe(0.5, {"encode": 0.1, "full_steps": 0.8, "pruned_steps": 1.6, "decode": 0.1})
    tracker.observe(0.2, {"encode": 0.05, "full_steps": 0.4, "pruned_steps": 0.32, "decode": 0.05})
    times = tracker.times(ALPHAS)
    assert times.full == pytest.approx(0.5 * (0.5 * (0.1 + 0.2)) + 0.5 * 0.1)  # full steps: every alpha's calls
    assert times.pruned[0.5] == pytest.approx(0.15) and times.pruned[0.2] == pytest.approx(0.04)
    assert times.pruned[0.3] == pytest.approx(0.15)  # not measured yet: the slowest measured, never optimistic
    assert times.other == pytest.approx(0.5 * (0.5 * (0.1 + 0.2)) + 0.5 * 0.1)


def test_the_fixed_policy_runs_the_first_alpha_unless_pinned() -> None:
    tracker = StepTimeTracker(4, 8)
    fixed = AlphaChooser("fixed", None, (0.3, 0.5, 0.2), 1, tracker)
    assert fixed.choose([Queued(0.0, 1)] * 20) == 0.3 and fixed.choose([]) == 0.3
    assert fixed.choose([Queued(0.0, 1, key="p", alpha=0.5)]) == 0.5
    adaptive = AlphaChooser("adaptive", 2.0, ALPHAS, 1, tracker)
    tracker.full, tracker.other, tracker.pruned = TIMES.full, TIMES.other, dict(TIMES.pruned)
    assert adaptive.choose([Queued(0.0, 1)]) == 0.5 and adaptive.choose([Queued(0.0, 1)] * 10) == 0.2


@pytest.mark.parametrize(("argv", "message"), [
    (["--alpha-policy", "adaptive"], "--alpha-policy adaptive needs --latency-target SECONDS"),
    (["--alpha-policy", "adaptive", "--latency-target", "2"], "--alpha-policy adaptive needs at least two alphas"),
    (["--latency-target", "2"], "--latency-target is what --alpha-policy adaptive aims for"),
    (["--alpha", "0.3", "0.3"], "--alpha lists an alpha twice: [0.3, 0.3]"),
    (["--alpha", "0.3", "1.5"], "CATConfig.alpha must be in (0, 1], got 1.5"),
    (["--alpha", "0.5", "0.2", "--alpha-policy", "adaptive", "--latency-target", "0"], "latency_target must be > 0 seconds"),
], ids=["no-target", "one-alpha", "target-without-adaptive", "alpha-twice", "alpha-range", "target-zero"])
def test_serve_refuses_a_policy_it_cannot_run_in_one_line(capfd: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(["serve", "--model", "reference", "--port", "0", *argv]) == 2
    err = capfd.readouterr().err
    assert err.startswith("catrt serve: error: ") and message in err and err.count("\n") == 1


def test_serve_refuses_more_alphas_than_the_runtime_keeps_graphs_of() -> None:
    """The runtime keeps the pruned graphs and indices of MAX_KEPT_ALPHAS alphas per shape: a server of nine served a
    call at one by dropping and remaking another's, at every call in turn (recaptured CUDA graphs on a GPU). Refused
    as `ServeConfig` (so `catrt serve --alpha`, in one line, and a Ray deployment's settings)."""
    from catrt.checks import MAX_KEPT_ALPHAS
    from catrt.config import CATConfig
    from catrt.errors import ConfigError
    from catrt.serve.config import ServeConfig

    nine = tuple(round(0.9 - 0.1 * index, 1) for index in range(MAX_KEPT_ALPHAS + 1))
    with pytest.raises(ConfigError, match=r"^--alpha lists 9 alphas; a server serves at most 8 .*: drop 1$") as refused:
        ServeConfig(model="reference", alphas=nine, cat=CATConfig(alpha=0.9))
    assert refused.value.field == "alpha"
    assert ServeConfig(model="reference", alphas=nine[:-1], cat=CATConfig(alpha=0.9)).served_alphas == nine[:-1]


def test_a_queued_pin_of_an_alpha_only_another_size_serves_counts_at_the_slowest_pruned_step() -> None:
    """Several builds queue together; a 96x64 request pinning 0.2 may wait behind a 64x64 head whose build
    serves 0.3 and 0.5 only. Predicting its call looked 0.2 up in the head build's step times: a KeyError
    that killed the server's worker (every later request 503)."""
    tracker = StepTimeTracker(4, 8)
    tracker.full, tracker.other, tracker.pruned = TIMES.full, TIMES.other, {0.3: TIMES.pruned[0.3], 0.5: TIMES.pruned[0.5]}
    chooser = AlphaChooser("adaptive", 2.4, (0.3, 0.5), 1, tracker)
    queue = [Queued(0.0, 1, key="64x64"), Queued(0.0, 1, key=("96x64", 0.2), alpha=0.2)]
    # the pinned call counts at the slowest measured pruned step (0.5's: 1.3 s): 0.98 + 1.3 fits 2.4, 1.3 + 1.3 not
    assert chooser.choose(queue) == 0.3


class _CountedKey:
    """A batch key that counts how often it is compared (one shared counter)."""

    compared = 0

    def __init__(self, name: int) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        _CountedKey.compared += 1
        return isinstance(other, _CountedKey) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


def test_simulating_a_long_queue_is_linear_in_its_length() -> None:
    """The simulation compared every waiting request with every head: ~n^2 / 2 key comparisons per alpha before
    every call, about a second of the worker's time at 4096 queued requests of batch 1."""
    keys = [_CountedKey(index % 3) for index in range(3)]
    queue = [Queued(0.0, 1, key=keys[index % 3]) for index in range(3000)]
    _CountedKey.compared = 0
    groups = batches(queue, capacity=1)
    assert groups == [[index] for index in range(3000)]
    assert _CountedKey.compared <= 3 * len(queue)
    pairs = batches(queue, capacity=2)
    assert pairs[:2] == [[0, 3], [1, 4]] and sorted(index for group in pairs for index in group) == list(range(3000))


def test_batches_group_as_the_worker_does_on_mixed_queues() -> None:
    """Any queue: each call is its head plus later requests of its key that fit, taken in arrival order."""
    import random

    rng = random.Random(7)
    for _ in range(300):
        capacity = rng.randint(1, 4)
        queue = [Queued(0.0, rng.randint(1, 3), key=rng.randint(0, 2)) for _ in range(rng.randint(1, 12))]
        waiting = list(range(len(queue)))
        for group in batches(queue, capacity):
            head = queue[waiting[0]]
            expected, rows = [], 0
            for index in waiting:
                if queue[index].key == head.key and rows + queue[index].rows <= capacity:
                    expected.append(index)
                    rows += queue[index].rows
            assert group == (expected or [waiting[0]])
            waiting = [index for index in waiting if index not in group]
        assert not waiting


def test_a_pinned_request_is_simulated_in_its_own_call_whatever_key_it_is_given() -> None:
    """The worker never batches a pinned request with an unpinned one (a call runs at one alpha). Simulated with the
    same key, the pinned 0.5 request rode along in the head's call: 0.5 looked within 2 s where the two calls end after
    2.6 s at 0.5 and 2.12 s even at 0.2."""
    queue = [Queued(0.0, 1), Queued(0.0, 1, alpha=0.5)]
    assert batches(queue, capacity=2) == [[0], [1]]
    assert predicted_latencies(queue, TIMES, 2, 0.2) == pytest.approx([0.82, 0.82 + 1.3])
    assert choose_alpha(queue, TIMES, target=2.0, alphas=ALPHAS, capacity=2) == 0.2
    two_pins = [Queued(0.0, 1, alpha=0.2), Queued(0.0, 1, alpha=0.5), Queued(0.0, 1, alpha=0.2)]
    assert batches(two_pins, capacity=2) == [[0, 2], [1]]


def test_the_policy_is_a_function_of_queue_step_times_and_target_alone() -> None:
    """The alphas default to those the step times cover and a call to one request, so `choose_alpha(queue, times,
    target)` is the policy as the issue states it; a request is one image unless it says."""
    assert choose_alpha([Queued(age=0.0)], TIMES, 2.0) == 0.5
    assert choose_alpha([Queued(age=0.0)] * 10, TIMES, 2.0) == 0.2
    assert choose_alpha([Queued(age=0.0, alpha=0.3)] + [Queued(age=0.0)] * 10, TIMES, 2.0) == 0.3
    assert choose_alpha([Queued(age=0.5), Queued(age=0.0)], TIMES, 2.0) == 0.3


def test_a_serve_config_of_several_alphas_needs_no_pruning_settings_naming_the_first() -> None:
    """`ServeConfig(model=..., alphas=(0.5, 0.2))` (a KubeRay `serve: {alphas: [0.5, 0.2]}`) was refused: "cat.alpha 0.3
    must be the first of alphas", an alpha nobody gave (CATConfig's default). Left at its default, cat's alpha is the
    first of alphas; one given otherwise must still be the first."""
    from catrt.config import CATConfig
    from catrt.errors import ConfigError
    from catrt.serve.config import ServeConfig

    config = ServeConfig(model="reference", alphas=[0.5, 0.2], cat=CATConfig(t0=4), alpha_policy="adaptive",
                         latency_target=2.0)
    assert config.served_alphas == (0.5, 0.2) and config.cat == CATConfig(alpha=0.5, t0=4)
    assert ServeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"^ServeConfig.cat.alpha 0.2 must be the first of alphas \[0.5, 0.2\]$"):
        ServeConfig(model="reference", alphas=(0.5, 0.2), cat=CATConfig(alpha=0.2))
