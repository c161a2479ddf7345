"""bench/adaptive.py's server commands: every one is a `catrt serve` line the CLI takes, with a model and with
served builds (which fix their alphas, so no --alpha may reach them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from catrt import cli
from catrt.cli import serve as serve_command
from tests.test_quality_bench import load_script


@pytest.fixture(scope="module")
def adaptive():  # noqa: ANN201 - the bench module
    return load_script("adaptive")


def _serve_lines(adaptive, argv: list[str]) -> list[list[str]]:  # noqa: ANN001
    """The `catrt serve` arguments of each configuration a run would start (no server starts: nothing is measured)."""
    commands = []

    def measure(args, configuration, log):  # noqa: ANN001, ANN202
        commands.append(adaptive.serve_command(args, configuration, 1))
        return []

    original, adaptive.measure = adaptive.measure, measure
    try:
        adaptive.main(argv)
    finally:
        adaptive.measure = original
    return [command[3:] for command in commands]  # after `python -m catrt.cli`


@pytest.mark.parametrize("source", [["--model", "reference"], ["--engines", "engines/a", "engines/b"]])
def test_every_server_command_is_one_catrt_serve_takes(adaptive, source: list[str], tmp_path) -> None:  # noqa: ANN001
    lines = _serve_lines(adaptive, [*source, "--ray", "--out", str(tmp_path / "report.md")])
    assert len(lines) == 4
    for line in lines:
        args = cli.build_parser().parse_args(line)
        if source[0] == "--engines":
            assert args.engines == ["engines/a", "engines/b"] and "--alpha" not in line
            serve_command._refuse_serve_flags_fixed_by_build(args)  # what `catrt serve --engines` refuses: nothing here
        else:
            assert args.alpha in ([0.3], [0.2, 0.3, 0.5])


def test_alphas_with_served_builds_are_one_line(adaptive, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as stopped:
        adaptive.main(["--engines", "engines/a", "--fixed-alpha", "0.5"])
    assert stopped.value.code == 2
    assert "--fixed-alpha and --alphas cannot be used with --engines: a served build fixes its alphas" in capsys.readouterr().err


def test_an_out_that_is_a_folder_is_one_line_before_any_server_starts(adaptive, tmp_path,  # noqa: ANN001
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The report and its plot are written after every configuration was measured (minutes): a folder failed there."""
    monkeypatch.setattr(adaptive, "measure", lambda *args: pytest.fail("a server was started"))
    with pytest.raises(SystemExit) as stopped:
        adaptive.main(["--model", "reference", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert f"--out {tmp_path} is a folder; give the report's file" in capsys.readouterr().err


def test_an_out_ending_in_png_is_refused_as_the_plots_own_path(adaptive, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    """The plot is written to the report's path with .png: `--out report.png` wrote the plot, then the report over it
    (a markdown file named .png, its image link pointing at itself)."""
    out = tmp_path / "report.png"
    with pytest.raises(SystemExit) as refused:
        _serve_lines(adaptive, ["--out", str(out)])
    (line,) = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2 and line.startswith(f"bench/adaptive.py: error: --out {out} is the plot's own path")
    assert not out.exists()


def test_a_plot_path_that_cannot_be_replaced_is_one_line_before_any_server_starts(
    adaptive, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """The plot goes beside the report as <name>.png, written after every configuration was measured: a folder there,
    or another user's plot in a sticky folder (as /tmp is; another user simulated by os.geteuid, the tests run as
    root), failed savefig with a traceback then. `check_out` checked the report's path only."""
    import os

    monkeypatch.setattr(adaptive, "measure", lambda *args: pytest.fail("a server was started"))
    out = tmp_path / "adaptive.md"
    (tmp_path / "adaptive.png").mkdir()
    with pytest.raises(SystemExit) as stopped:
        adaptive.main(["--model", "reference", "--out", str(out)])
    (line,) = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and line.startswith(
        f"bench/adaptive.py: error: --out {out}: its plot {tmp_path / 'adaptive.png'} cannot be replaced: it is a folder")
    (tmp_path / "adaptive.png").rmdir()
    (tmp_path / "adaptive.png").write_bytes(b"another user's plot")
    os.chmod(tmp_path, 0o1777)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as stopped:
        adaptive.main(["--model", "reference", "--out", str(out)])
    (line,) = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and "its plot" in line and "belongs to another user" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adaptive.png"]
