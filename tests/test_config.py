"""CATConfig: defaults from the spec, validation naming the field and its range."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import pytest

from catrt import CATConfig, ConfigError
from catrt.engines import resolve_backend
from catrt.errors import CatrtError
from catrt.loading import usable_device
from catrt.model_cards import check_model_source
from catrt.request_values import check_seed


def test_defaults_follow_the_spec() -> None:
    config = CATConfig()
    assert (config.alpha, config.t0, config.n_clusters, config.ewma_decay) == (0.3, 8, 20, 0.5)
    assert (config.magnitude_fraction, config.refresh_every, config.trace) == (0.25, 0, False)
    assert config.num_selected(4096) == 1229


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("alpha", 0.0, r"alpha must be in \(0, 1\], got 0.0"),
        ("alpha", 1.5, r"alpha must be in \(0, 1\], got 1.5"),
        ("alpha", float("nan"), r"alpha must be in \(0, 1\]"),
        ("t0", 1, r"t0 must be an integer >= 2, got 1"),
        ("t0", 3.0, r"t0 must be an integer >= 2, got 3.0"),
        ("n_clusters", 0, r"n_clusters must be an integer >= 1, got 0"),
        ("ewma_decay", 1.0, r"ewma_decay must be in \[0, 1\), got 1.0"),
        ("ewma_decay", -0.1, r"ewma_decay must be in \[0, 1\)"),
        ("magnitude_fraction", 1.2, r"magnitude_fraction must be in \[0, 1\], got 1.2"),
        ("refresh_every", -1, r"refresh_every must be an integer >= 0"),
        ("seed", -3, r"seed must be an integer in \[0, 9223372036854775807\], got -3"),
        ("seed", 2**64, r"seed must be an integer in \[0, 9223372036854775807\], got 18446744073709551616"),
        ("kmeans_iters", 0, r"kmeans_iters must be an integer from 1 to 1000, got 0"),
        ("kmeans_iters", 10**12, r"kmeans_iters must be an integer from 1 to 1000, got 1000000000000"),
        ("trace", "yes", r"trace must be a bool"),
        ("rule", "best", r"rule must be one of cat, random"),
    ],
)
def test_each_invalid_field_is_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        CATConfig(**{field: value})
    assert error.value.field == field


@pytest.mark.parametrize(("field", "value"), [
    ("alpha", 1.0), ("alpha", 1e-9), ("t0", 2), ("n_clusters", 1), ("ewma_decay", 0.0), ("ewma_decay", 0.999),
    ("magnitude_fraction", 0.0), ("magnitude_fraction", 1.0), ("refresh_every", 0), ("reuse_every", 0),
    ("reuse_threshold", 0.0), ("seed", 0), ("seed", 2**63 - 1), ("kmeans_iters", 1), ("kmeans_iters", 1000),
])
def test_each_fields_documented_bounds_are_accepted(field: str, value: object) -> None:
    """The closed ends of each range the refusals above state are valid values (an off-by-one refused them)."""
    assert getattr(CATConfig(**{field: value}), field) == value


def test_k_is_at_least_one_and_at_most_every_token() -> None:
    """k = ceil(alpha * N) within [1, N]: an alpha so small that alpha * N is under the rounding guard of the ceiling
    still recomputes one token (a pruned step of 0 tokens has no shape to run)."""
    assert [CATConfig(alpha=1e-12).num_selected(n) for n in (1, 7, 4096)] == [1, 1, 1]
    assert [CATConfig(alpha=1.0).num_selected(n) for n in (1, 7, 4096)] == [1, 7, 4096]


def test_t0_must_be_before_the_last_step() -> None:
    CATConfig(t0=8).check_steps(9)
    with pytest.raises(ConfigError, match=r"t0 = 8 needs t0 < num_inference_steps, got 8 steps"):
        CATConfig(t0=8).check_steps(8)
    with pytest.raises(ConfigError, match=r"got 8 steps; lower t0 or run more steps$"):
        CATConfig(t0=8).check_steps(8)


def test_t0_at_its_minimum_says_lowering_it_is_no_way_out() -> None:
    """flux-schnell runs t0 = 2, the floor: with 2 steps "lower t0" cannot be done, so the line names the steps that work."""
    with pytest.raises(ConfigError, match=r"got 2 steps; lower t0 or run more steps \(t0 = 2 is its minimum: run at least 3 steps\)$"):
        CATConfig(t0=2).check_steps(2)
    CATConfig(t0=2).check_steps(3)
    with pytest.raises(ConfigError, match=r"CATConfig.t0 must be an integer >= 2, got 1"):
        CATConfig(t0=1)


def test_round_trip_through_dict() -> None:
    config = CATConfig(alpha=0.5, t0=3, trace=True, rule="random")
    assert CATConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="no field"):
        CATConfig.from_dict({"alpha": 0.3, "beta": 1})


@pytest.mark.parametrize("kind", ["float16", "float32", "float64", "longdouble"])
def test_a_numpy_alpha_is_the_decimal_it_was_written_as_and_selects_the_same_k(kind: str) -> None:
    # float32(0.3) is 0.30000001192...: taken as is, ceil(alpha * N) would select one token more wherever 0.3 * N is whole
    for alpha in (0.3, 0.7, 0.1, 0.25):
        config = CATConfig(alpha=getattr(np, kind)(alpha))
        assert config == CATConfig(alpha=alpha) and type(config.alpha) is float
        assert [config.num_selected(n) for n in (10, 20, 1000)] == [CATConfig(alpha=alpha).num_selected(n) for n in (10, 20, 1000)]
    assert CATConfig(alpha=np.float32(0.3)).num_selected(1000) == 300


def test_a_numpy_bool_is_a_bool_for_trace_and_never_a_number() -> None:
    # a flag read from a numpy array or mask (np.True_) is a bool; as a count or fraction it is refused as True is
    config = CATConfig(trace=np.bool_(True))
    assert config.trace is True and config == CATConfig(trace=True)
    for name in ("alpha", "t0"):
        with pytest.raises(ConfigError, match=f"CATConfig.{name} must be .*got True") as error:
            CATConfig(**{name: np.bool_(True)})
        assert error.value.field == name


# -- echoed values --------------------------------------------------------------------------------

HUGE = "y" * 10_000


def test_echo_keeps_short_values_and_shortens_long_ones_to_the_limit() -> None:
    from catrt.errors import ECHO_LIMIT, PATH_ECHO_LIMIT, echo, echo_path, shorten

    assert echo("cat") == "'cat'" and echo(3) == "3" and shorten("x" * ECHO_LIMIT) == "x" * ECHO_LIMIT
    shown = echo(HUGE)
    assert shown == f"'{'y' * 39}…{'y' * 19}' (10000 characters)" and len(shown) == ECHO_LIMIT
    path = "/data/" + "d" * 300 + "/image.png"
    assert echo_path(path).startswith("/data/ddd") and echo_path(path).endswith("d/image.png (316 characters)")
    assert len(echo_path(path)) == PATH_ECHO_LIMIT and echo_path("/a/b.png") == "/a/b.png"
    assert echo(10**5000) == "<int too large to print>"  # repr raises past Python's digit limit


@pytest.mark.parametrize("make", [
    lambda: CATConfig(rule=HUGE),
    lambda: CATConfig(alpha=HUGE),
    lambda: CATConfig.from_dict({HUGE: 1}),
    lambda: check_seed(10**5000),
    lambda: check_model_source(HUGE),
    lambda: usable_device(HUGE),
    lambda: resolve_backend(HUGE),
], ids=["require", "alpha", "from_dict", "seed", "model", "device", "backend"])
def test_python_api_errors_shorten_a_huge_value(make: Callable[[], object]) -> None:
    """Every refusal that quoted the value quoted all 10,000 characters of it (and a 5,000-digit seed crashed it)."""
    with pytest.raises(CatrtError) as caught:
        make()
    message = str(caught.value)
    assert len(message) < 600 and ("…" in message or "too large to print" in message), message


@pytest.mark.parametrize("value, kind", [(torch.tensor(0.3), "Tensor"), (np.array([0.3]), "ndarray"), ([0.3], "list")])
def test_a_value_that_reads_like_a_valid_number_is_named_by_its_type(value: object, kind: str) -> None:
    """`got tensor(0.3000)` alone reads as if 0.3 were out of range: the refusal names the type it got."""
    with pytest.raises(ConfigError, match=rf"^CATConfig\.alpha must be in \(0, 1\], got .* \(a {kind}\)$"):
        CATConfig(alpha=value)
