"""The `catrt` command line, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image


def _catrt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "catrt.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_generate_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "pruned.png"
    result = _catrt("generate", "--model", "tiny-sd3", "--prompt", "a red circle", "--steps", "12", "--t0", "4",
                    "--height", "64", "--width", "96", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "alpha=0.3 t0=4" in result.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (96, 64)


def test_generate_full_and_bad_alpha(tmp_path: Path) -> None:
    full = _catrt("generate", "--prompt", "a red circle", "--steps", "4", "--height", "32", "--width", "32", "--full",
                  "--out", str(tmp_path / "full.png"))
    assert full.returncode == 0 and "unpruned" in full.stdout
    bad = _catrt("generate", "--prompt", "x", "--alpha", "1.5", "--out", str(tmp_path / "bad.png"))
    assert bad.returncode == 2
    assert "CATConfig.alpha must be in (0, 1], got 1.5" in bad.stderr
    assert not (tmp_path / "bad.png").exists()


def test_macs_prints_the_schedule_ratio_last() -> None:
    result = _catrt("macs", "--model", "sd3", "--alpha", "0.3", "--steps", "28", "--t0", "8",
                    "--height", "1024", "--width", "1024")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "schedule MAC ratio: 0.537"


def test_help_lists_the_commands() -> None:
    result = _catrt("--help")
    assert result.returncode == 0 and "generate" in result.stdout and "macs" in result.stdout
