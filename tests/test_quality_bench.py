"""bench/quality.py runs end to end on a tiny setting and writes its table and plots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_quality_script_runs_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "bench" / "quality.py"), "--n", "4", "--steps", "8", "--t0", "2",
               "--alphas", "0.3", "--grid-rows", "2", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "quality.md").read_text()
    for label in ("CAT", "random", "round-robin", "magnitude only", "sequential rows", "attention", "CAT + full refresh every 5"):
        assert f"| {label}" in table
    assert "## Figure 3 on this model" in table and "| 4 |" in table
    for name in ("figure3.png", "quality-grid.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"
