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
