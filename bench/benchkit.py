"""What every bench script shares: --help that shows defaults, one line naming a missing bench extra, and
report paths that never overwrite a committed result unless asked (`--out bench/results/<name>`)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (whose meaning the help text says)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def new_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A bench script's parser: its docstring's first paragraph, defaults in --help, and a usage mistake as one line
    naming it, exit code 2 (catrt's own parser), where argparse prints its usage block first."""
    from catrt.cli import OneLineParser  # light: no torch

    return OneLineParser(prog=prog, description=(doc or "").split("\n\n")[0], formatter_class=HelpFormatter)


BENCH_EXTRA = 'install the bench extra: pip install -e ".[bench]"'


def missing_package(error: ImportError) -> str:
    """The pip name of the package an import of the bench extra failed on."""
    module = (error.name or "").split(".")[0]
    return {"skimage": "scikit-image"}.get(module, module) or str(error)


def missing_message(prog: str, missing: str) -> str:
    return f"{prog}: error: missing optional dependency {missing!r}; {BENCH_EXTRA}\n"


def exit_if_missing(parser: argparse.ArgumentParser, missing: str | None) -> None:
    """One line and exit code 2 when the bench extra is not installed, instead of a traceback."""
    if missing:
        parser.exit(2, missing_message(parser.prog, missing))


def exit_early_if_missing(missing: str | None) -> None:
    """`exit_if_missing` from a script's top, before its heavy imports (torch, diffusers: seconds).

    `--help` still shows the options; argparse names the program after the script, as here.
    """
    if missing and not {"-h", "--help"} & set(sys.argv[1:]):
        sys.stderr.write(missing_message(Path(sys.argv[0]).name, missing))
        raise SystemExit(2)


def new_path(stem: str, suffix: str = "") -> Path:
    """bench/results/tmp/<stem>-<time><suffix>, numbered until no such file or folder exists (git ignores tmp/)."""
    base = f"{stem}-" + time.strftime("%Y%m%d-%H%M%S")
    path, number = RESULTS / "tmp" / f"{base}{suffix}", 2
    while path.exists():
        path, number = RESULTS / "tmp" / f"{base}-{number}{suffix}", number + 1
    return path


def device_slug(device: str) -> str:
    """A device's name as a report file names it: `NVIDIA H200` is `nvidia-h200`; "device" where nothing is left."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"


def default_out(stem: str, device: str, suffix: str = ".md") -> Path:
    """A report file that does not exist yet, bench/results/tmp/<stem>-<device>-<time><suffix>."""
    return new_path(f"{stem}-{device_slug(device)}", suffix)


def check_out(parser: argparse.ArgumentParser, out: Path | None) -> None:
    """One line and exit code 2 for an --out no report can be written to (a folder, or a path under a file), before
    the run: the report is written last, after minutes of measuring, and failed there with a traceback."""
    if out is None:
        return
    if out.is_dir():
        parser.error(f"--out {out} is a folder; give the report's file, e.g. {out / 'report.md'}")
    try:
        report = report_file(out)  # a link's target, which write_text writes: a dangling link's failed after the run
    except OSError as error:
        _refuse_link(parser, out, error)
    above = next((parent for parent in report.parents if parent.exists()), None)
    if above is not None and not above.is_dir():
        parser.error(f"--out {out}: {above} is a file, so no report can be written under it; give another path")
    from catrt import atomic_files  # light: no torch

    try:  # a read-only folder or file system, or another user's report in /tmp, failed the write after the run
        report.parent.mkdir(parents=True, exist_ok=True)
        refusal = atomic_files.replace_refusal(report)  # the file write_text makes beside it, made and removed now
    except OSError as error:
        linked = f" (--out is a link to {report})" if report != out else ""
        parser.error(f"--out {out} cannot be written ({error.strerror or type(error).__name__}); give a path in a folder "
                     f"you can write{linked}")
    if refusal is not None:
        parser.error(f"--out {out} cannot be replaced: {refusal}")


def check_out_folder(parser: argparse.ArgumentParser, out: Path | None, holds: str, files: Sequence[str] = ()) -> None:
    """One line and exit code 2 for an --out folder that cannot be made or written (a file, a path under a file),
    made now, before the run: it was made after parsing with a traceback, or (compile_time.py's report file) only
    after minutes of measuring. A link at --out is checked where it points, and a dangling one's folder made (it was
    refused as "File exists"). Each of `files`, the names the script writes into it, is checked as `check_out` checks a
    report file, and refused where a folder (or a link to one) has its name: the write failed there after the run."""
    from catrt.checks import output_folder, path_is
    from catrt.errors import ConfigError

    if out is None:
        return
    try:
        output_folder(report_file(out), f"--out {out}", holds, "out")
    except ConfigError as error:
        parser.error(str(error))
    except OSError as error:
        _refuse_link(parser, out, error)
    for name in files:
        if path_is(report_file(out / name), "folder"):
            parser.error(f"--out {out}: {out / name} is a folder, where this script writes its file {name}; move it away "
                         "or give another --out")
        check_out(parser, out / name)


def load_reference(parser: argparse.ArgumentParser, device: str, weights_dir: Path | None = None) -> Any:
    """The reference pipeline on `device`; a device this machine has not (`--device cuda` without CUDA: torch's
    AssertionError) or missing / damaged weights are one line and exit code 2, not a traceback."""
    from catrt.errors import CatrtError
    from catrt.loading import usable_device
    from catrt.reference.pipeline import load_reference_pipeline

    try:
        return load_reference_pipeline(device=usable_device(device), weights_dir=weights_dir)
    except CatrtError as error:
        parser.error(str(error))


def _refuse_link(parser: argparse.ArgumentParser, out: Path, error: OSError) -> None:
    """The one line for an --out whose link `report_file` refused to follow (another user's, in a sticky folder)."""
    parser.error(f"--out {out} cannot be written ({error.strerror}); remove the link or give another path")


def write_text(path: Path, text: str) -> None:
    """Write a report as a whole: into a hidden file beside it, then renamed onto it, so Ctrl-C or a kill mid-write
    leaves the earlier report (or none), never a half-written one (Path.write_text truncates first). A link at `path`
    is written through (the rename would have replaced the link with a file)."""
    with writing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[Path]:
    """A result file (a plot, a CSV, an image grid) written whole, as `write_text` writes a report: the block writes
    the temporary file yielded, renamed onto `path` once the block completes. savefig, PIL's save and open("w") write
    in place, so Ctrl-C while they wrote left half a PNG or CSV over a committed one. The temporary file's name ends in
    .tmp: give savefig and PIL the format.

    A write the OS refuses at the end (a full disk; another user's file put there since `check_out`, in a sticky
    folder) is one line naming the file and the reason, exit 1, not a traceback: the scripts print their report first.
    """
    from catrt import atomic_files  # light: no torch

    path = report_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_files.replacing(path) as temporary:
            yield temporary
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: could not write {path} ({reason}); the earlier file, if any, "
                         "is left as it was: free some space or give another --out") from None


def save_pipeline(pipe: Any, folder: Path) -> None:
    """`pipe.save_pretrained(folder)`, saved beside and renamed into place whole. save_pretrained writes model_index.json
    first, and the scripts take a folder that has it for saved: one a run stopped mid-save (Ctrl-C) left was reused,
    half its weights missing."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted run's
    pipe.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def report_file(path: Path) -> Path:
    """The file a report at `path` is written to: the target of a link there (relative links from the link's folder,
    chains to their end), else `path` itself; `check_out` checks the same file `write_text` writes."""
    from catrt import atomic_files  # light: no torch

    return atomic_files.target(path)


def check_at_least_one(parser: argparse.ArgumentParser, **counts: int) -> None:
    """One line and exit code 2 for a count below 1 (an empty prompt list or batch fails deep inside torch)."""
    for name, value in counts.items():
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def check_distinct(parser: argparse.ArgumentParser, **lists: list[Any] | None) -> None:
    """One line and exit code 2 for a list option naming a value twice: it was measured twice (minutes), and its
    report rows came out twice or, keyed by it, one overwrote the other (gpu.py's first set read 'not run yet')."""
    from catrt.checks import repeated

    for name, values in lists.items():
        twice = repeated(values or [])
        if twice:
            parser.error(f"--{name.replace('_', '-')} repeats {', '.join(map(str, twice))}; list each once")


def check_positive(parser: argparse.ArgumentParser, **values: float) -> None:
    """One line and exit code 2 for a duration or target that is not a finite number > 0 (a load level of 0 or nan
    seconds sends nothing and reports 0 requests or nan as if measured)."""
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")


def check_schedule(parser: argparse.ArgumentParser, steps: int, t0: int, alphas: list[float] = ()) -> None:
    """CATConfig's own checks of t0 (and each alpha) against the step count, as one line and exit code 2."""
    from catrt.config import CATConfig
    from catrt.errors import ConfigError

    try:
        for alpha in alphas or [CATConfig().alpha]:
            CATConfig(alpha=alpha, t0=t0).check_steps(steps)
    except ConfigError as error:
        parser.error(str(error))
