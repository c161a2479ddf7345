"""bench/frontier.py: end to end on its tiny setting, its Pareto rule, and its oracle baseline."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from catrt import CATConfig
from tests.test_quality_bench import committed_results, load_script


@pytest.fixture(scope="module")
def frontier():  # noqa: ANN201 - the bench module
    return load_script("frontier")


def test_frontier_runs_on_a_tiny_setting(frontier, tmp_path: Path) -> None:  # noqa: ANN001
    before = committed_results()
    frontier.main(["--tiny", "--out", str(tmp_path)])
    assert committed_results() == before  # --out elsewhere never touches bench/results
    rows, oracle = frontier.variants(2)
    table = (tmp_path / "frontier.md").read_text()
    for variant in rows:
        assert f"| {variant.label} |" in table
    assert "On the PSNR frontier: " in table and "## Headroom of this testbed" in table
    for variant in oracle:
        assert f"| {variant.label} |" in table.split("## Headroom")[1]
    main_table = table.split("On the PSNR frontier")[0]
    marks = [line.split("|")[-2].strip() for line in main_table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(marks) == len(rows) + 1  # the header, then one row per configuration
    assert all(mark in ("yes / yes", "yes / -", "- / yes", "- / -") for mark in marks[1:])
    assert any(mark.startswith("yes") for mark in marks[1:]) and any(mark.endswith("yes") for mark in marks[1:])
    points = list(csv.DictReader((tmp_path / "frontier.csv").open()))
    assert [p["configuration"] for p in points] == ["unpruned", *(v.label for v in rows), *(v.label for v in oracle)]
    assert float(points[0]["mac_ratio"]) == 1.0
    assert Image.open(tmp_path / "frontier.png").size[0] > 1000


def test_pareto_marks_exactly_the_undominated_points(frontier) -> None:  # noqa: ANN001
    point = frontier.Point
    rows = [point("a", "g", 30.0, 0.9, 0.5, 1.0, 0.0), point("b", "g", 29.0, 0.95, 0.4, 1.0, 0.0),
            point("c", "g", 28.0, 0.8, 0.5, 1.0, 0.0),  # dominated by a (same cost, lower)
            point("d", "g", 30.0, 0.9, 0.6, 1.0, 0.0),  # dominated by a (costlier, equal)
            point("e", "g", 35.0, 0.7, 0.9, 1.0, 0.0)]
    assert frontier.pareto(rows, "psnr") == {"a", "b", "e"}
    assert frontier.pareto(rows, "ssim") == {"b"}


def test_oracle_picks_the_furthest_tokens_then_the_stalest(frontier, tiny_pipelines) -> None:  # noqa: ANN001
    import catrt
    from tests.conftest import call_kwargs

    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=4, trace=True, magnitude_fraction=0.5))
    fast.runtime_class = frontier.OracleRuntime
    images = fast(**call_kwargs(pipe)).images
    assert torch.isfinite(images).all()
    pruned = [r.indices for r in fast.last_trace if r.kind == "pruned"]
    assert len(pruned) == 8 and all(len(set(row.tolist())) == 8 for step in pruned for row in step)


def test_oracle_indices_exact(frontier) -> None:  # noqa: ANN001
    error = torch.tensor([[0.1, 0.9, 0.0, 0.5, 0.2, 0.0]])
    staleness = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.5, 0.0]])  # 2 and 4 were computed recently
    last = torch.tensor([[1, 2, 5, 3, 4, 0]])
    # top-2 by error: 1, 3; then the stalest of the rest: 5 (never), 0 (step 1), 4 (EWMA 0.5) before 2 (1.0)
    assert frontier.oracle_indices(error, staleness, last, 2, 5).tolist() == [[1, 3, 5, 0, 4]]
    assert frontier.oracle_indices(error, staleness, last, 0, 2).tolist() == [[5, 0]]


def test_a_configuration_identical_on_some_images_is_placed_by_the_others(frontier, tmp_path: Path) -> None:  # noqa: ANN001
    """One identical image made a configuration's mean PSNR inf: on the PSNR frontier above every other point and
    off the plot. It is placed by the mean of the images that differ, and the table says how many were identical."""
    import argparse
    import math

    from catrt.compare import UNPRUNED, Comparison, Sample, Variant

    def sample(index: int, variant: str, psnr: float, mac: float) -> Sample:
        return Sample(index, "p", index, variant, psnr, 0.9, None, mac, 1.0, 0)

    samples = [sample(i, UNPRUNED, math.inf, 1.0) for i in range(3)]
    samples += [sample(0, "lucky", math.inf, 0.5), sample(1, "lucky", 20.0, 0.5), sample(2, "lucky", 22.0, 0.5)]
    samples += [sample(i, "steady", 30.0, 0.5) for i in range(3)]
    comparison = Comparison([Variant(UNPRUNED, None), Variant("lucky", None), Variant("steady", None)], samples, {})
    points = {p.label: p for p in frontier.points(comparison)}
    assert (points["lucky"].psnr, points["lucky"].identical) == (21.0, 1)
    assert (points["steady"].psnr, points["steady"].identical) == (30.0, 0)
    assert points[UNPRUNED].psnr == math.inf and points[UNPRUNED].identical == 3
    assert frontier.pareto([points["lucky"], points["steady"]], "psnr") == {"steady"}
    args = argparse.Namespace(tiny=True, out_label="x", device="cpu", threads=1, n=3, data_seed=7, steps=5, t0=2)
    frontier.write_table(tmp_path / "frontier.md", args, comparison, [], 1.0)
    table = (tmp_path / "frontier.md").read_text()
    assert "| lucky | inf (1 of 3 identical; the other 2: 21.00) | 0.9000 |" in table
    assert "| steady | 30.00 | 0.9000 |" in table and "On the PSNR frontier: steady." in table
    frontier.write_csv(list(points.values()), tmp_path / "frontier.csv")
    rows = {row["configuration"]: row for row in csv.DictReader((tmp_path / "frontier.csv").open())}
    assert (rows["lucky"]["psnr"], rows["lucky"]["identical_images"]) == ("21.000", "1")
