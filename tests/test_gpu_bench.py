"""bench/gpu.py runs end to end with --tiny on the CPU and reports every model and variant.

The GPU figures themselves come from a lent GPU; this only checks that the script's code paths
(diffusers eager and compiled, catrt eager and compiled, the selection timing, the steady-state
checks, the report) run and write sane numbers, and that one failing variant does not stop the rest.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("sd3", "sd3.5-large", "pixart-sigma")
VARIANTS = ("diffusers-eager", "diffusers-compile", "catrt-eager", "catrt-graphs", "catrt-compile")
STEPS, T0 = 6, 3  # short of the --tiny default (10, 4): the script is the same at any length


def parse_table(text: str) -> tuple[list[str], dict[tuple[str, str], dict[str, str]]]:
    """The report's table as {(model, variant): {column: cell}}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    columns = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[(cells[0], cells[1])] = dict(zip(columns, cells))
    return columns, rows


def positive(cell: str) -> float:
    value = float(cell.removesuffix("x"))
    assert math.isfinite(value) and value > 0, cell
    return value


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_every_model_and_variant(tmp_path: Path) -> None:
    out = tmp_path / "speed.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--repeats", "1", "--steps", str(STEPS), "--t0", str(T0),
               "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "wrote" in result.stdout

    text = out.read_text()
    assert "torch " in text and "diffusers " in text and "alpha 0.3" in text
    columns, rows = parse_table(text)
    assert columns[:2] == ["model", "variant"]
    for column in ("full step (ms)", "pruned step (ms)", "selection (ms)", f"{STEPS} steps (ms)", "speedup vs diffusers eager",
                   "peak memory (GiB)", "allocs / pruned step", "host sync", "warm-up (s)"):
        assert column in columns
    assert set(rows) == {(model, variant) for model in MODELS for variant in VARIANTS}, sorted(rows)
    for (model, variant), row in rows.items():
        assert row["full step (ms)"] != "error", f"{model} {variant} failed:\n{text}"
        positive(row["full step (ms)"])
        positive(row[f"{STEPS} steps (ms)"])
        positive(row["speedup vs diffusers eager"])
        assert float(row["warm-up (s)"]) >= 0
        assert row["peak memory (GiB)"] == "n/a (cpu)"
        if variant.startswith("catrt"):
            positive(row["pruned step (ms)"])
            positive(row["selection (ms)"])
            assert row["allocs / pruned step"] == "n/a (cpu)" and row["host sync"] == "n/a (cpu)"
        else:
            assert row["pruned step (ms)"] == "n/a" and row["selection (ms)"] == "-"
        if variant == "diffusers-eager":
            assert row["speedup vs diffusers eager"] == "1.00x"
    for model in MODELS:  # the full step of every variant computes the same first prediction
        assert f"- {model}: catrt-eager: step-1 prediction vs diffusers eager" in text
        bound = next(line for line in text.splitlines() if line.startswith(f"- {model} catrt-eager: pruned step = "))
        row = rows[(model, "catrt-eager")]
        full = float(row["full step (ms)"])
        assert f"bound at this full step: {T0} x {full:.2f} + {STEPS - T0} x " in bound, bound
        assert bound.endswith("x over diffusers eager"), bound


def test_a_failing_variant_reports_its_error_and_the_rest_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = load_script()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu, "catrt_variant", broken)
    out = tmp_path / "speed.md"
    gpu.main(["--tiny", "--models", "sd3", "--variants", "diffusers-eager", "catrt-eager",
              "--repeats", "1", "--steps", "4", "--t0", "2", "--out", str(out)])
    text = out.read_text()
    _, rows = parse_table(text)
    positive(rows[("sd3", "diffusers-eager")]["4 steps (ms)"])
    assert rows[("sd3", "catrt-eager")]["full step (ms)"] == "error"
    assert "- sd3 catrt-eager: **error** RuntimeError: CUDA out of memory (simulated)" in text


def test_a_run_stopped_mid_way_leaves_a_report_that_says_which_rows_never_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report is rewritten after every variant so a killed run keeps its finished rows; the rows after the kill
    read '-' in every cell and the notes ended in 'total run time', as a finished run's do."""
    gpu = load_script()
    out = tmp_path / "speed.md"

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # what a kill between the variants leaves: the report as last written

    monkeypatch.setattr(gpu, "catrt_variant", killed)
    with pytest.raises(KeyboardInterrupt):
        gpu.main(["--tiny", "--models", "sd3", "--variants", "diffusers-eager", "catrt-eager",
                  "--repeats", "1", "--steps", "4", "--t0", "2", "--out", str(out)])
    text = out.read_text()
    _, rows = parse_table(text)
    positive(rows[("sd3", "diffusers-eager")]["4 steps (ms)"])
    assert rows[("sd3", "diffusers-eager")]["speedup vs diffusers eager"] == "1.00x"  # derived as the report is written
    assert rows[("sd3", "catrt-eager")]["full step (ms)"] == "not run yet"
    assert "- **partial report**, written " in text and "1 row(s) *not run yet*" in text
    assert "total run time" not in text


def test_variants_past_the_budget_are_reported_skipped_not_failed(tmp_path: Path) -> None:
    gpu = load_script()
    out = tmp_path / "speed.md"
    gpu.main(["--tiny", "--models", "sd3", "--variants", "diffusers-eager", "--budget-s", "1e-9",
              "--repeats", "1", "--steps", "4", "--t0", "2", "--out", str(out)])
    text = out.read_text()
    _, rows = parse_table(text)
    assert rows[("sd3", "diffusers-eager")]["full step (ms)"] == "skipped"
    assert "- sd3 diffusers-eager: skipped, not started: over the --budget-s 1e-09 s time budget" in text
    assert "**error**" not in text and "- total run time " in text and "partial report" not in text


def test_a_report_rewrite_cut_short_keeps_the_last_whole_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Path.write_text truncates first: a kill during a rewrite left half a report where a whole one had been."""
    gpu = load_script()
    out = tmp_path / "speed.md"
    args = gpu.parse_args(["--tiny", "--models", "sd3", "--variants", "diffusers-eager", "--out", str(out)])
    report = gpu.Report(args, gpu.torch.device("cpu"), out)
    report.write()
    whole = out.read_text()
    real_write = Path.write_text

    def cut_short(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", cut_short)
    report.rows[0].notes.append("a later note")
    with pytest.raises(KeyboardInterrupt):
        report.write()
    monkeypatch.undo()
    assert out.read_text() == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed.md"]


def test_a_report_path_that_is_a_link_is_written_through(tmp_path: Path) -> None:
    """The atomic rewrite renamed its file onto the link itself: a report kept elsewhere and linked from --out was
    left stale while --out became a plain file."""
    gpu = load_script()
    (tmp_path / "kept").mkdir()
    target, out = tmp_path / "kept" / "speed.md", tmp_path / "speed.md"
    target.write_text("an earlier report\n")
    out.symlink_to(target)
    args = gpu.parse_args(["--tiny", "--models", "sd3", "--variants", "diffusers-eager", "--out", str(out)])
    gpu.Report(args, gpu.torch.device("cpu"), out).write()
    assert out.is_symlink() and "diffusers-eager" in target.read_text()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["speed.md"]


def test_a_link_at_out_is_checked_where_the_report_goes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """write_text writes through a link at --out, but check_out probed the link's own folder: a dangling link to a path
    under a file (or in a folder that cannot be made) passed, and the report write failed after the run with a
    traceback. A dangling link to a folder still to make is written through, that folder made."""
    gpu = load_script()
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "speed.md"
    out.symlink_to(tmp_path / "a-file" / "speed.md")
    with pytest.raises(SystemExit) as exited:
        gpu.parse_args(["--tiny", "--out", str(out)])
    (line,) = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2
    assert f"error: --out {out}: {tmp_path / 'a-file'} is a file, so no report can be written under it" in line
    out.unlink()
    out.symlink_to(Path("later") / "speed.md")  # relative: from the link's folder
    args = gpu.parse_args(["--tiny", "--models", "sd3", "--variants", "diffusers-eager", "--out", str(out)])
    gpu.Report(args, gpu.torch.device("cpu"), out).write()
    assert out.is_symlink() and "diffusers-eager" in (tmp_path / "later" / "speed.md").read_text()
    assert sorted(p.name for p in (tmp_path / "later").iterdir()) == ["speed.md"]


def test_a_report_name_a_plain_write_takes_is_taken(tmp_path: Path) -> None:
    """check_out probed `.<name>.<pid>.tmp` beside the report, longer than the name: a report name of 242 to 255
    bytes, which the filesystem takes, was refused as 'File name too long' before the run."""
    gpu = load_script()
    out = tmp_path / ("speed-" + "r" * 246 + ".md")
    args = gpu.parse_args(["--tiny", "--models", "sd3", "--variants", "diffusers-eager", "--out", str(out)])
    gpu.Report(args, gpu.torch.device("cpu"), out).write()
    assert "diffusers-eager" in out.read_text() and sorted(tmp_path.iterdir()) == [out]


def test_a_loop_of_links_at_out_is_one_line_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check_out's probe beside the loop passed, and the report write failed after the run with a traceback (ELOOP)."""
    gpu = load_script()
    out = tmp_path / "speed.md"
    out.symlink_to(tmp_path / "other.md")
    (tmp_path / "other.md").symlink_to(out)
    with pytest.raises(SystemExit) as exited:
        gpu.parse_args(["--tiny", "--out", str(out)])
    (line,) = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2 and f"error: --out {out} cannot be written (Too many levels of symbolic links)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.md", "speed.md"]


def test_reuse_every_times_the_pruned_steps_only_and_bounds_the_steps_that_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = load_script()
    from catrt.runtime import CATRuntime

    args = gpu.parse_args(["--tiny", "--steps", "10", "--t0", "3", "--reuse-every", "3"])
    assert gpu.pruned_steps(args) == [5, 7, 8, 10]  # 4 selects at t0; 6 and 9 reuse the previous prediction
    assert gpu.pruned_steps(gpu.parse_args(["--tiny", "--steps", "10", "--t0", "3"])) == list(range(5, 11))
    with pytest.raises(SystemExit) as refused:
        gpu.parse_args(["--tiny", "--steps", "10", "--t0", "3", "--reuse-every", "1"])
    assert refused.value.code == 2

    reuse_settings = []
    original_init = CATRuntime.__init__

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        reuse_settings.append(self.config.reuse_every)

    monkeypatch.setattr(CATRuntime, "__init__", recording_init)
    out = tmp_path / "speed.md"
    gpu.main(["--tiny", "--models", "sd3", "--variants", "diffusers-eager", "catrt-eager", "--repeats", "1",
              "--steps", "10", "--t0", "3", "--reuse-every", "3", "--out", str(out)])
    text = out.read_text()
    assert reuse_settings and set(reuse_settings) == {3}
    assert "catrt: 3 full + 5 pruned + 2 reused (--reuse-every 3)" in text
    assert "pruned: the 4 pruned steps among 5..10" in text
    _, rows = parse_table(text)
    full = positive(rows[("sd3", "catrt-eager")]["full step (ms)"])
    positive(rows[("sd3", "catrt-eager")]["pruned step (ms)"])
    bound = next(line for line in text.splitlines() if line.startswith("- sd3 catrt-eager: pruned step = "))
    assert f"bound at this full step: 3 x {full:.2f} + 5 x " in bound, bound


@pytest.mark.parametrize(("t0", "steps", "span"), [(4, range(2, 4), "steps 2..3"), (3, range(2, 3), "step 2"), (2, range(1, 2), "step 1")])
def test_the_catrt_full_steps_timed_are_the_ones_the_report_names(t0: int, steps: range, span: str, tmp_path: Path) -> None:
    """Full steps 2..t0-1 are timed (step 1 allocates, t0 clusters); t0 = 2 (the least) leaves none, so step 1 is,
    and the method says so (it said "steps 2..1")."""
    gpu = load_script()
    args = gpu.parse_args(["--tiny", "--steps", "6", "--t0", str(t0)])
    assert gpu.catrt_full_steps(args) == steps
    header = "\n".join(gpu.Report(args, gpu.torch.device("cpu"), tmp_path / "speed.md").header())
    assert f"(catrt full: {span}; pruned: steps {t0 + 2}..6," in header


def test_profile_writes_the_top_kernels_of_full_and_pruned_steps(tmp_path: Path) -> None:
    gpu = load_script()
    out = tmp_path / "speed.md"
    gpu.main(["--tiny", "--models", "pixart-sigma", "--variants", "diffusers-eager", "catrt-graphs", "--repeats", "1",
              "--steps", "8", "--t0", "4", "--profile", "--profile-rows", "5", "--out", str(out)])
    profile = (tmp_path / "speed-profile.md").read_text()
    sections = [line for line in profile.splitlines() if line.startswith("## ")]
    assert sections == [
        "## pixart-sigma diffusers-eager: full steps 2-3",
        "## pixart-sigma catrt-graphs: full steps 2-3",
        "## pixart-sigma catrt-graphs: pruned steps 6-8",
    ]
    assert profile.count("Self CPU") >= 3 and "aten::" in profile  # a profiler table per section


def test_profile_records_the_first_profile_steps_of_each_kind(tmp_path: Path) -> None:
    """The profiler records and sums every op of its window: 19 pruned steps of SD3.5-large per variant would spend the
    GPU's time budget on it, so the windows are the first --profile-steps steady steps of each kind."""
    gpu = load_script()
    out = tmp_path / "speed.md"
    gpu.main(["--tiny", "--models", "pixart-sigma", "--variants", "catrt-eager", "--repeats", "1", "--steps", "8",
              "--t0", "4", "--profile", "--profile-steps", "1", "--profile-rows", "3", "--check-steps", "1", "--selection-repeats", "1", "--out", str(out)])
    sections = [line for line in (tmp_path / "speed-profile.md").read_text().splitlines() if line.startswith("## ")]
    assert sections == ["## pixart-sigma catrt-eager: full steps 2-2", "## pixart-sigma catrt-eager: pruned steps 6-6"]


def test_a_failing_profile_leaves_the_variants_figures_and_stops_the_profiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--profile is an extra: a generation that fails inside a profiled window (as a profiler that cannot trace
    CUDA-graph replays might) becomes a note; the measured row stays, and the next variant profiles normally."""
    gpu = load_script()
    real = gpu.profile_steps

    def failing_for_catrt(variant: Any, *args: Any) -> dict[str, str]:
        if not variant.prunes:
            return real(variant, *args)

        generations = []

        def new_generation() -> Any:
            step, calls = variant.new_generation(), []
            generations.append(1)

            def broken(*inputs: Any) -> Any:
                calls.append(1)
                if len(generations) == 2 and len(calls) == 5:  # the pruned window (steps 5-6), the profiler running
                    raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED (simulated)")
                return step(*inputs)

            return broken

        return real(dataclasses.replace(variant, new_generation=new_generation), *args)

    monkeypatch.setattr(gpu, "profile_steps", failing_for_catrt)
    out = tmp_path / "speed.md"
    gpu.main(["--tiny", "--models", "sd3", "--variants", "catrt-eager", "diffusers-eager", "--repeats", "1",
              "--steps", "6", "--t0", "3", "--profile", "--profile-rows", "5", "--out", str(out)])
    text = out.read_text()
    _, rows = parse_table(text)
    positive(rows[("sd3", "catrt-eager")]["pruned step (ms)"])
    assert "- sd3 catrt-eager: --profile failed: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED (simulated)" in text
    assert not gpu.torch.autograd.profiler._is_profiler_enabled
    sections = [line for line in (tmp_path / "speed-profile.md").read_text().splitlines() if line.startswith("## ")]
    assert sections == ["## sd3 diffusers-eager: full steps 2-2"]


def test_the_report_goes_to_the_lent_machines_out_folder_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the lent GPU machine only what is written under $OUT comes back: a run without --out writes its report
    (and the profile beside it) there, not into the machine's copy of bench/results."""
    gpu = load_script()
    cpu = gpu.torch.device("cpu")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu.default_out(cpu, tiny=False) == tmp_path / "speed-cpu.md"
    monkeypatch.setenv("OUT", str(tmp_path / "missing"))
    assert gpu.default_out(cpu, tiny=False).parent == gpu.RESULTS
    monkeypatch.delenv("OUT")
    assert gpu.default_out(cpu, tiny=False).parent == gpu.RESULTS


def test_flux_runs_from_its_registered_meta_call_without_doubling_the_batch(tmp_path: Path) -> None:
    """FLUX (packed tokens, distilled guidance: one row per image) takes the same code as SD3 and PixArt."""
    gpu = load_script()
    out = tmp_path / "speed.md"
    gpu.main(["--tiny", "--models", "flux-dev", "--variants", "diffusers-eager", "catrt-eager", "--repeats", "1",
              "--steps", "4", "--t0", "2", "--out", str(out)])
    text = out.read_text()
    _, rows = parse_table(text)
    for variant in ("diffusers-eager", "catrt-eager"):
        positive(rows[("flux-dev", variant)]["4 steps (ms)"])
    positive(rows[("flux-dev", "catrt-eager")]["pruned step (ms)"])
    agreement = next(line for line in text.splitlines() if line.startswith("- flux-dev: catrt-eager: step-1 prediction"))
    assert float(agreement.rsplit("= ", 1)[1]) < 1e-5, agreement  # catrt's full step is diffusers' forward
    setup = gpu.model_setup("flux-dev", gpu.parse_args(["--tiny"]))
    loop = gpu.Loop(setup, gpu.parse_args(["--tiny"]), gpu.torch.device("cpu"))
    assert not loop.doubled and loop.latents.shape == (1, setup.grid.num_tokens, 64)
    assert loop.call_kwargs["guidance"].tolist() == [gpu.GUIDANCE_SCALE]


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "--steps must be at least 1, got 0"),  # 0 was taken as "unset": the default ran instead
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--size", "0"], "--size must be at least 1, got 0"),
    (["--check-steps", "0"], "--check-steps must be at least 1, got 0"),
    (["--selection-repeats", "0"], "--selection-repeats must be at least 1, got 0"),
    (["--profile-rows", "0"], "--profile-rows must be at least 1, got 0"),
    (["--profile-steps", "0"], "--profile-steps must be at least 1, got 0"),
    (["--budget-s", "-1"], "--budget-s must be a number of seconds >= 0 (0 = no budget), got -1.0"),
    (["--models", "sd3", "pixart-sigma", "sd3"], "--models repeats sd3; list each once"),
    (["--variants", "catrt-eager", "catrt-eager"], "--variants repeats catrt-eager; list each once"),
    (["--budget-s", "nan"], "--budget-s must be a number of seconds >= 0 (0 = no budget), got nan"),
    (["--t0", "0"], "CATConfig.t0 must be an integer >= 2, got 0"),
    (["--t0", "20"], "CATConfig.t0 = 20 needs t0 < num_inference_steps, got 10 steps"),  # was a ConfigError traceback
    (["--alpha", "2"], "CATConfig.alpha must be in (0, 1], got 2.0"),
    (["--reuse-every", "-1"], "CATConfig.reuse_every must be an integer >= 0 (0 = off), got -1"),
])
def test_a_bad_setting_is_one_line_and_exit_code_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    gpu = load_script()
    with pytest.raises(SystemExit) as refused:
        gpu.parse_args(["--tiny", *argv])
    assert refused.value.code == 2
    error = capsys.readouterr().err
    assert error.count("error: ") == 1 and message in error and "Traceback" not in error


@pytest.mark.parametrize("out", ["a-folder", "a-file/speed.md"])
def test_an_out_no_report_can_be_written_to_is_one_line(out: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The first report write (before any model) raised IsADirectoryError / FileExistsError with a traceback."""
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit) as exited:
        load_script().parse_args(["--tiny", "--out", str(tmp_path / out)])
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"bench/gpu.py: error: --out {tmp_path}")


def test_a_gpu_run_without_cuda_is_one_line_and_exit_code_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    gpu = load_script()
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as refused:
        gpu.main(["--models", "sd3"])
    assert refused.value.code == 2  # was 1: SystemExit with the message
    assert capsys.readouterr().err == "bench/gpu.py needs a CUDA device; use --tiny to run it on the CPU\n"


def test_unset_settings_take_the_tiny_or_gpu_defaults() -> None:
    gpu = load_script()
    tiny, full = gpu.parse_args(["--tiny"]), gpu.parse_args([])
    assert (tiny.size, tiny.steps, tiny.t0, tiny.repeats, tiny.budget_s) == (128, 10, 4, 2, 0.0)
    assert (full.size, full.steps, full.t0, full.repeats, full.budget_s) == (1024, 28, 8, 3, 420.0)


def test_profile_on_cuda_sets_up_the_profiler_for_graphs_before_any_model_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tests our glue, not CUDA: with --profile on a (stand-in) CUDA device, torch's CUPTI workaround for CUDA graphs
    runs once, before the first model (whose warm-up captures the graphs the profiled windows replay); not without
    --profile; and a helper that fails is logged, the run goes on."""
    import torch.profiler._utils as profiler_utils

    gpu = load_script()
    order: list[str] = []
    monkeypatch.setattr(gpu, "pick_device", lambda tiny: gpu.torch.device("cuda"))
    monkeypatch.setattr(gpu, "device_name", lambda device: "stand-in GPU")
    monkeypatch.setattr(gpu, "measure_model", lambda name, *args: order.append(f"measure {name}"))
    monkeypatch.setattr(profiler_utils, "_init_for_cuda_graphs", lambda: order.append("init"))
    argv = ["--models", "sd3", "pixart-sigma", "--out", str(tmp_path / "speed.md")]
    gpu.main(argv + ["--profile"])
    assert order == ["init"] + ["measure sd3", "measure pixart-sigma"] * 2
    order.clear()
    gpu.main(argv)
    assert order == ["measure sd3", "measure pixart-sigma"] * 2

    def failing() -> None:
        raise RuntimeError("CUPTI unavailable (simulated)")

    monkeypatch.setattr(profiler_utils, "_init_for_cuda_graphs", failing)
    order.clear()
    gpu.main(argv + ["--profile"])
    assert order == ["measure sd3", "measure pixart-sigma"] * 2
    assert "--profile: torch's CUPTI set-up for CUDA graphs did not run (RuntimeError: CUPTI unavailable (simulated))" in capsys.readouterr().out
