"""What every bench script shares: --help that shows defaults, and report paths that never overwrite a
committed result unless asked (`--out bench/results/<name>`)."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (whose meaning the help text says)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def default_out(stem: str, device: str, suffix: str = ".md") -> Path:
    """A file that does not exist yet, bench/results/tmp/<stem>-<device>-<time><suffix> (git ignores tmp/)."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"
    base = f"{stem}-{slug}-" + time.strftime("%Y%m%d-%H%M%S")
    path, number = RESULTS / "tmp" / f"{base}{suffix}", 2
    while path.exists():
        path, number = RESULTS / "tmp" / f"{base}-{number}{suffix}", number + 1
    return path
