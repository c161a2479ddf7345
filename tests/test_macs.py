"""MAC counting on the meta device with the published configs kept in the package."""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import pytest
import torch

from catrt import CATConfig, ConfigError
from diffusers import SD3Transformer2DModel

from catrt.macs import MacReport, model_macs, step_macs
from catrt.models import family_of
from catrt.scheduler import plan
from catrt.tokens import Grid

TINY_SD3_CONFIG = {  # tiny-sd3's transformer (catrt/tiny.py)
    "sample_size": 32, "patch_size": 2, "in_channels": 16, "num_layers": 2, "attention_head_dim": 8,
    "num_attention_heads": 4, "joint_attention_dim": 48, "caption_projection_dim": 32, "pooled_projection_dim": 64,
    "out_channels": 16, "pos_embed_max_size": 96,
}


@pytest.mark.parametrize(("steps", "ratio"), [(28, 0.537), (50, 0.456)])
def test_sd3_medium_matches_the_papers_ratio(steps: int, ratio: float) -> None:
    from catrt.model_cards import MODEL_CARDS

    card = MODEL_CARDS["sd3"]
    report = model_macs("sd3", 1024, 1024, CATConfig(alpha=0.3, t0=8), steps)
    assert report.num_tokens == 4096 and report.k == 1229 and card.text_tokens == 333
    full, pruned = (_sd3_hand_count(card.transformer_config, 333, 4096, rows) for rows in (4096, 1229))
    assert (report.full_step, report.pruned_step) == (full, pruned)  # the written-out count, as for the tiny model
    assert report.full_step == pytest.approx(4.452e12, rel=1e-3)
    assert report.pruned_step / report.full_step == pytest.approx(0.352, abs=0.005)
    assert report.schedule_ratio == pytest.approx(ratio, abs=0.002)


@pytest.mark.parametrize("name", ["sd3.5-medium", "sd3.5-large", "pixart-sigma"])
def test_other_published_models_prune_at_least_as_well(name: str) -> None:
    report = model_macs(name, 1024, 1024, CATConfig(), 28)
    assert 0.28 < report.pruned_step / report.full_step < 0.4
    assert 0.45 < report.schedule_ratio < 0.56


def test_full_steps_are_counted_as_catrt_runs_them_on_the_context_made_once() -> None:
    """PixArt's cross-attention K/V are the context, made once: catrt's full steps do not make them again, so a
    schedule of full steps only (refresh_every=1) costs less than the unpruned pipeline (it came out at 1.028 when
    the full steps were counted as diffusers' forward, the context counted on top)."""
    config = CATConfig(t0=8, refresh_every=1)
    pixart = model_macs("pixart-sigma", 256, 128, config, 9)
    assert pixart.full_steps == 9 and pixart.context_full_step < pixart.full_step
    assert pixart.schedule_macs == pixart.context + 9 * pixart.context_full_step
    assert pixart.schedule_ratio < 1
    sd3 = model_macs("sd3", 256, 128, config, 9)  # SD3's full forward makes no part of its context once
    assert sd3.context_full_step == sd3.full_step


def _flux_hand_count(config: dict, text: int, num: int, rows: int) -> int:
    """A FLUX transformer's matmul MACs, written out for one image: embeddings (timestep, guidance, pooled text, text,
    patches), double-stream blocks (both streams' adaLN, QKV, output projection, MLP 4x), single-stream blocks on text
    + image rows (adaLN, QKV and MLP in, fused output projection), the output layer. `rows` image rows and queries run
    (N on a full step, k on a pruned one, the text in full); keys/values are always T + N."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    patch_in = config["in_channels"] * config.get("patch_size", 1) ** 2
    macs = 2 * (256 * d + d * d) + (config["pooled_projection_dim"] * d + d * d)  # timestep and guidance; pooled text
    macs += text * config["joint_attention_dim"] * d + rows * patch_in * d  # context embedder, patch embedding
    attention = 2 * (text + rows) * (text + num) * d  # QK^T and AV
    macs += config["num_layers"] * (2 * 6 * d * d + 12 * (text + rows) * d * d + attention)
    macs += config["num_single_layers"] * (3 * d * d + (3 + 4 + 5) * (text + rows) * d * d + attention)
    return macs + 2 * d * d + rows * d * patch_in  # final adaLN and projection


def test_flux_dev_counts_what_a_hand_count_of_its_published_config_gives() -> None:
    # The text stream (512 T5 tokens) runs in full on pruned steps, so FLUX prunes less than SD3.
    from catrt.model_cards import MODEL_CARDS

    card = MODEL_CARDS["flux-dev"]
    report = model_macs("flux-dev", 1024, 1024, CATConfig(alpha=0.3, t0=8), 28)
    assert report.num_tokens == 4096 and report.k == 1229 and card.text_tokens == 512
    full = _flux_hand_count(card.transformer_config, 512, 4096, 4096)
    pruned = _flux_hand_count(card.transformer_config, 512, 4096, 1229)
    assert (report.full_step, report.context_full_step, report.pruned_step, report.context) == (full, full, pruned, 0)
    assert report.schedule_ratio == (8 * full + 20 * pruned) / (28 * full)
    assert replace(report, steps=50).schedule_ratio == (8 * full + 42 * pruned) / (50 * full)  # t0 = 8 full steps of 50
    assert report.full_step == pytest.approx(37.192e12, rel=1e-4)  # the figure the README quotes
    assert (report.pruned_step / report.full_step, report.schedule_ratio) == (pytest.approx(0.378, abs=5e-4),
                                                                             pytest.approx(0.556, abs=5e-4))


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


def _sd3_hand_count(config: dict, text: int, num: int, rows: int) -> int:
    """An SD3 transformer's matmul MACs, written out for one image: embeddings, joint blocks (the last one
    context_pre_only), the output layer. `rows` image rows and queries run (N on a full step, k on a pruned one);
    keys/values are always T + N."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    patch_in = config["in_channels"] * config["patch_size"] ** 2
    macs = (256 * d + d * d) + (config["pooled_projection_dim"] * d + d * d)  # timestep and pooled-text embeddings
    macs += text * config["joint_attention_dim"] * d + rows * patch_in * d  # context embedder, patch embedding
    for block in range(config["num_layers"]):
        last = block == config["num_layers"] - 1
        macs += 6 * d * d + (2 if last else 6) * d * d  # adaLN modulation of both streams
        macs += 12 * rows * d * d  # image QKV, output projection, MLP 4x
        macs += (3 if last else 12) * text * d * d  # text stream: QKV only in the last block
        macs += 2 * (text + rows) * (text + num) * d  # QK^T and AV
    return macs + 2 * d * d + rows * d * patch_in  # final adaLN and projection


@pytest.fixture(scope="module")
def tiny_sd3_on_meta() -> torch.nn.Module:
    with torch.device("meta"):
        return SD3Transformer2DModel.from_config(TINY_SD3_CONFIG).eval()


@pytest.mark.parametrize("grid", [Grid(3, 5), Grid(5, 3), Grid(1, 7), Grid(1, 1)])
def test_odd_sizes_count_what_a_hand_count_gives(grid: Grid, tiny_sd3_on_meta: torch.nn.Module) -> None:
    """N = 15 (non-square both ways), 7 (prime, one row), 1: full and pruned steps against the written-out count,
    and the schedule of 9 steps with t0 = 2 and a refresh every 3 (full 1, 2, 5, 8; pruned 3, 4, 6, 7, 9)."""
    text, config = 11, CATConfig(alpha=0.3, t0=2, refresh_every=3)
    call = dict(family_of("sd3").meta_call(TINY_SD3_CONFIG, text, grid))
    counts = step_macs(tiny_sd3_on_meta, call.pop("hidden_states"), call.pop("timestep"), call, config)
    num = grid.num_tokens
    k = max(1, math.ceil(Fraction(3, 10) * num))
    assert (counts.num_tokens, counts.k) == (num, k)
    assert counts.full == _sd3_hand_count(TINY_SD3_CONFIG, text, num, num)
    assert counts.pruned == _sd3_hand_count(TINY_SD3_CONFIG, text, num, k)
    patch_in = TINY_SD3_CONFIG["in_channels"] * TINY_SD3_CONFIG["patch_size"] ** 2
    d = TINY_SD3_CONFIG["num_attention_heads"] * TINY_SD3_CONFIG["attention_head_dim"]
    assert counts.context == num * patch_in * d  # the positional table: the patch embedding of a zero latent
    report = MacReport(num, k, counts.full, counts.context_full, counts.pruned, counts.context, 9, plan(9, 2, 3).count("full"))
    assert (report.full_steps, report.pruned_steps) == (4, 5)
    assert report.schedule_macs == counts.context + 4 * counts.full + 5 * counts.pruned


def test_real_cpu_tensors_count_attention_as_the_meta_device_does() -> None:
    """`catrt compare` counts a run's MACs on the real (CPU) transformer, whose attention goes through
    the CPU flash kernel, not bmm: it counts the same as the written-out count (and `catrt macs`)."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel.from_config(TINY_SD3_CONFIG).eval()
    grid, text, config = Grid(3, 5), 11, CATConfig(alpha=0.3, t0=2)
    with torch.device("meta"):
        shapes = dict(family_of("sd3").meta_call(TINY_SD3_CONFIG, text, grid))
    call = {name: torch.randn(value.shape) if isinstance(value, torch.Tensor) else value for name, value in shapes.items()}
    if isinstance(shapes["timestep"], torch.Tensor):
        call["timestep"] = torch.full(shapes["timestep"].shape, 500.0)
    counts = step_macs(transformer, call.pop("hidden_states"), call.pop("timestep"), call, config)
    num, k = grid.num_tokens, math.ceil(0.3 * grid.num_tokens)
    assert counts.full == _sd3_hand_count(TINY_SD3_CONFIG, text, num, num)
    assert counts.pruned == _sd3_hand_count(TINY_SD3_CONFIG, text, num, k)


def test_format_macs_picks_the_largest_unit_the_value_reaches() -> None:
    """A value of exactly one unit is written in that unit (1e12 is 1.000 TMAC, not 1000.000 GMAC); under 1000, MACs."""
    from catrt.macs import format_macs

    assert [format_macs(value) for value in (10**12, 10**12 - 1, 10**9, 10**6, 1000, 999, 0)] == [
        "1.000 TMAC", "1000.000 GMAC", "1.000 GMAC", "1.000 MMAC", "1.000 KMAC", "999 MAC", "0 MAC"]


def test_pixart_alpha_1024_counts_its_size_embedding_on_the_meta_device() -> None:
    """A PixArt transformer of sample_size 128 (PixArt-Alpha 1024's layout; use_additional_conditions unset turns it on)
    embeds the resolution (2 values) and aspect ratio (1) every step: three rows through a 256 -> D/3 -> D/3 MLP more
    than the same transformer without them. The meta call handed it None for both, an AttributeError in diffusers."""
    config = {"sample_size": 128, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 2,
              "attention_head_dim": 8, "num_attention_heads": 3, "cross_attention_dim": 24, "caption_channels": 48}
    grid, text, cat = Grid(3, 5), 7, CATConfig(alpha=0.3, t0=2)

    def counts(layout: dict) -> tuple[int, ...]:
        with torch.device("meta"):
            transformer = family_of("pixart").adapter.transformer_class.from_config(layout).eval()
        call = dict(family_of("pixart").meta_call(layout, text, grid))
        macs = step_macs(transformer, call.pop("hidden_states"), call.pop("timestep"), call, cat)
        return macs.full, macs.context_full, macs.pruned, macs.probe, macs.context

    size = 24 // 3
    sized, plain = counts(config), counts({**config, "use_additional_conditions": False})
    assert [a - b for a, b in zip(sized, plain)] == [3 * (256 * size + size * size)] * 4 + [0]


def test_dual_attention_layers_count_a_second_attention_each(tiny_sd3_on_meta: torch.nn.Module) -> None:
    """SD3.5-medium's MMDiT-X blocks (its first 13 of 24; here 2 of 4, not adjacent, the last context_pre_only one
    among them) add an image-only attention: 3 more modulation outputs, its QKV and output projections on the rows
    run, and attention of those rows over all N image keys. The RMS QK-norm adds no matmul."""
    config = {**TINY_SD3_CONFIG, "num_layers": 4, "dual_attention_layers": (1, 3), "qk_norm": "rms_norm"}
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(config).eval()
    grid, text = Grid(3, 5), 11
    call = dict(family_of("sd3").meta_call(config, text, grid))
    counts = step_macs(transformer, call.pop("hidden_states"), call.pop("timestep"), call, CATConfig(alpha=0.3, t0=2))
    d, num = 32, grid.num_tokens
    for macs, rows in ((counts.full, num), (counts.pruned, counts.k)):
        dual = 2 * (3 * d * d + 4 * rows * d * d + 2 * rows * num * d)
        assert macs == _sd3_hand_count(config, text, num, rows) + dual
