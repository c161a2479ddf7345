"""Every bench script's --help says what each option is and, where it has one, its default (a user reads it before
a run that can take minutes); a run without --out writes under bench/results/tmp/, which git ignores."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest

from catrt.cli import OneLineParser
from tests.test_quality_bench import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["adaptive", "bundle_load", "compile_time", "frontier", "gpu", "load", "quality", "speed"]


class Parsed(Exception):
    """Carries the script's parser out of its main() at the moment it would parse."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def script_parser(name: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> argparse.Namespace:
        raise Parsed(self)

    monkeypatch.setattr(OneLineParser, "parse_args", capture)
    with pytest.raises(Parsed) as parsed:
        load_script(name).main([])
    return parsed.value.parser


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_option_has_help_and_shows_its_default(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = script_parser(script, monkeypatch)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"bench/{script}.py {name} has no help text"
        if action.default not in (None, False, argparse.SUPPRESS):
            shown = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in shown, f"bench/{script}.py {name}: --help does not show its default {action.default!r}"


def test_speed_report_without_out_goes_under_the_ignored_tmp_folder() -> None:
    speed = load_script("speed")
    results = ROOT / "bench" / "results"
    for dims in (None, "sd3-medium"):
        args = argparse.Namespace(dims=dims, layers=2, compile=dims is not None)
        path = speed.default_out("NVIDIA H200", args)
        assert path.parent == results / "tmp" and not path.exists()
        assert path.name.startswith("speed-nvidia-h200" + ("-sd3-medium-L2-compile" if dims else "")), path.name


class _Exited:
    """A stand-in for a server process that exited at once (so bench/adaptive.py stops before any load)."""

    returncode = 1

    def poll(self) -> int:
        return 1


@pytest.mark.parametrize(("argv", "threads"), [([], "1"), (["--threads", "3"], "3")])
def test_adaptive_starts_every_server_with_the_threads_asked(
    argv: list[str], threads: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README's bench/adaptive.py figures are "one thread per server": the plain servers run --threads torch threads
    (default 1, as a Ray replica holding one CPU), not the caller's OMP_NUM_THREADS or torch's count of cores, where
    on a shared 2-core CPU a two-thread server ran 20x slower than the one-thread Ray replica beside it."""
    adaptive = load_script("adaptive")
    started: list[dict[str, str]] = []

    def popen(command: list[str], **kwargs: Any) -> _Exited:
        started.append(kwargs["env"])
        return _Exited()

    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.setattr(adaptive.subprocess, "Popen", popen)
    with pytest.raises(SystemExit, match=r"exited with code 1 before it was ready"):
        adaptive.main([*argv, "--levels", "1", "--seconds", "1", "--out", str(tmp_path / "report.md")])
    assert [env["OMP_NUM_THREADS"] for env in started] == [threads]
    assert started[0]["PATH"] == os.environ["PATH"]  # the rest of the caller's environment is kept


def test_adaptive_threads_below_one_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        load_script("adaptive").main(["--threads", "0", "--out", str(tmp_path / "report.md")])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "bench/adaptive.py: error: --threads must be at least 1, got 0 (see bench/adaptive.py --help)"]
