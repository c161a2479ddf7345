"""MAC counting on the meta device with the published configs kept in the package."""

from __future__ import annotations

from dataclasses import replace

import pytest

from catrt import CATConfig, ConfigError
from catrt.macs import model_macs


@pytest.mark.parametrize(("steps", "ratio"), [(28, 0.537), (50, 0.456)])
def test_sd3_medium_matches_the_papers_ratio(steps: int, ratio: float) -> None:
    report = model_macs("sd3", 1024, 1024, CATConfig(alpha=0.3, t0=8), steps)
    assert report.num_tokens == 4096 and report.k == 1229
    assert report.full_step == pytest.approx(4.452e12, rel=1e-3)
    assert report.pruned_step / report.full_step == pytest.approx(0.352, abs=0.005)
    assert report.schedule_ratio == pytest.approx(ratio, abs=0.002)


@pytest.mark.parametrize("name", ["sd3.5-medium", "sd3.5-large", "pixart-sigma"])
def test_other_published_models_prune_at_least_as_well(name: str) -> None:
    report = model_macs(name, 1024, 1024, CATConfig(), 28)
    assert 0.28 < report.pruned_step / report.full_step < 0.4
    assert 0.45 < report.schedule_ratio < 0.56


def test_flux_dev_ratios_from_its_published_config() -> None:
    # The text stream (512 T5 tokens) runs in full on pruned steps, so FLUX prunes less than SD3.
    report = model_macs("flux-dev", 1024, 1024, CATConfig(alpha=0.3, t0=8), 28)
    assert report.num_tokens == 4096 and report.k == 1229
    assert report.full_step == pytest.approx(37.192e12, rel=1e-3)
    assert report.pruned_step / report.full_step == pytest.approx(0.378, abs=0.002)
    assert report.schedule_ratio == pytest.approx(0.556, abs=0.002)
    assert replace(report, steps=50).schedule_ratio == pytest.approx(0.478, abs=0.002)  # t0 = 8 full steps of 50


def test_alpha_one_costs_about_a_full_step() -> None:
    report = model_macs("sd3", 512, 512, CATConfig(alpha=1.0), 28)
    assert report.pruned_step == pytest.approx(report.full_step, rel=0.01)


def test_unknown_model_and_bad_size_are_refused() -> None:
    with pytest.raises(ConfigError, match="no published config for 'sdxl'"):
        model_macs("sdxl", 1024, 1024, CATConfig(), 28)
    with pytest.raises(ConfigError, match="multiples of 16, got 1000x1001"):
        model_macs("sd3", 1000, 1001, CATConfig(), 28)


def test_reference_card_matches_the_shipped_weights() -> None:
    import json

    from catrt.model_cards import MODEL_CARDS
    from catrt.reference.pipeline import CONFIG_FILE, WEIGHTS_DIR

    shipped = json.loads((WEIGHTS_DIR / CONFIG_FILE).read_text())["transformer"]
    card = MODEL_CARDS["reference"].transformer_config
    assert {name: shipped[name] for name in card} == card
    report = model_macs("reference", 32, 32, CATConfig(), 28)
    assert report.num_tokens == 256 and report.k == 77
