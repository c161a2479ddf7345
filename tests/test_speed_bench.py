"""bench/speed.py's settings: a mistake is one line and exit code 2 before anything is built or timed, and
--dims never silently replaces a size the command asked for (the report would name a size it did not time)."""

from __future__ import annotations

import inspect
import os

import pytest

from catrt.engines.tensorrt import TensorRTEngine
from tests.test_quality_bench import load_script


@pytest.fixture(scope="module")
def speed():  # noqa: ANN201 - the bench module
    return load_script("speed")


@pytest.mark.parametrize(("argv", "message"), [
    (["--dims", "sd3-medium", "--layers", "0"], "--layers must be at least 1, got 0"),
    (["--dims", "sd3-medium", "--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--heads", "0"], "--heads must be at least 1, got 0"),
    (["--text-length", "0"], "--text-length must be at least 1, got 0"),
    (["--size", "100"], "--size must be a multiple of 16 (one token per 16x16 pixels), got 100"),
    (["--dims", "sd3-medium", "--alpha", "2"], "CATConfig.alpha must be in (0, 1], got 2.0"),
    (["--t0", "20", "--steps", "12"], "CATConfig.t0 = 20 needs t0 < num_inference_steps, got 12 steps"),
    (["--dims", "sd3-medium", "--size", "256"],
     "--dims sd3-medium sets --heads, --size and --text-length to the published model's; leave out --size (or leave out --dims)"),
    (["--dims", "sd3-medium", "--heads", "4", "--text-length", "8"], "leave out --heads and --text-length"),
    (["--dims", "sd3-medium", "--backends", "eager"], "--dims times steps, not engines; leave out --backends (or pass --backends none)"),
    (["--compile"], "--compile times compiled steps at a published block size; pass --dims too"),
    (["--steps", "3", "--t0", "2"], "--steps must be at least --t0 + 2 when timing backends (the selection is timed on "
                                    "the pruned steps after the first), got --steps 3 --t0 2"),
    (["--backends", "eager", "auto", "eager"], "--backends repeats eager; list each once"),
    (["--backends", "eager", "tvm"], "--backends: unknown backend 'tvm'; known: auto, eager, compile, onnxruntime, tensorrt"),
    pytest.param(["--backends", "tensorrt"], "--backends: backend 'tensorrt' cannot run here: ",
                 marks=pytest.mark.skipif(TensorRTEngine.unavailable_reason() is None, reason="TensorRT runs here")),
])
def test_a_bad_setting_is_one_line_and_exit_code_2(speed, argv: list[str], message: str,  # noqa: ANN001
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        speed.parse_args(argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("bench/speed.py: error: ") == 1 and message in error and "Traceback" not in error


@pytest.mark.parametrize("under", ["folder", "file"])
def test_an_out_no_report_can_be_written_to_is_one_line_before_the_run(  # noqa: ANN001
    speed, under: str, tmp_path, capsys: pytest.CaptureFixture[str]  # noqa: ANN001
) -> None:
    """`--out bench/results/` (a folder) was timed for minutes, then failed writing the report with a traceback."""
    (tmp_path / "a-file").write_text("x")
    out, message = ((tmp_path, f"--out {tmp_path} is a folder; give the report's file, e.g. {tmp_path / 'report.md'}")
                    if under == "folder" else
                    (tmp_path / "a-file" / "speed.md", f"{tmp_path / 'a-file'} is a file, so no report can be written"))
    with pytest.raises(SystemExit) as exited:
        speed.parse_args(["--out", str(out)])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("bench/speed.py: error: ") == 1 and message in error


def test_an_out_in_a_folder_no_file_can_be_made_in_is_one_line_before_the_run(  # noqa: ANN001
    speed, tmp_path, capsys: pytest.CaptureFixture[str]  # noqa: ANN001
) -> None:
    """A report in a folder this user cannot write (/proc: not even root can) passed the parse-time check, and the report
    write after minutes of timing failed with a traceback (FileNotFoundError / PermissionError), the results lost."""
    with pytest.raises(SystemExit) as exited:
        speed.parse_args(["--out", "/proc/catrt-speed.md"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("bench/speed.py: error: ") == 1 and "--out /proc/catrt-speed.md cannot be written (" in error
    assert "give a path in a folder you can write" in error and "Traceback" not in error
    out = tmp_path / "new" / "speed.md"  # a writable place: its folder made, nothing left in it
    assert speed.parse_args(["--out", str(out)]).out == out and list(out.parent.iterdir()) == []
    from catrt import atomic_files

    atomic_files.beside(out, f".catrt-{atomic_files.HOST}-0000abcd.tmp").write_text("")  # a killed write's, removed
    assert speed.parse_args(["--out", str(out)]).out == out and list(out.parent.iterdir()) == []


def test_a_report_in_a_read_only_folder_is_refused_naming_the_folder_before_the_run(  # noqa: ANN001
    speed, tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    """A writable report in a folder that takes no new file: the report written beside it could not be made."""
    from tests.test_atomic_files import refuse_new_files

    out = tmp_path / "speed.md"
    out.write_text("an earlier report\n")
    refuse_new_files(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as exited:
        speed.parse_args(["--out", str(out)])
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert exited.value.code == 2 and line.startswith(f"bench/speed.py: error: --out {out} cannot be replaced: its folder "
                                                      f"{tmp_path} is not writable (Permission denied), though the file is")
    assert f"make {tmp_path} writable or pick another folder" in line and out.read_text() == "an earlier report\n"


def test_dims_sets_the_published_size_and_the_defaults_hold_without_it(speed) -> None:  # noqa: ANN001
    dims = speed.parse_args(["--dims", "sd3-medium", "--layers", "2"])
    assert (dims.heads, dims.size, dims.text_length, dims.layers, dims.backends) == (24, 1024, 256, 2, None)
    assert speed.parse_args(["--dims", "sd3-medium", "--backends", "none"]).backends == []
    plain = speed.parse_args([])
    assert (plain.heads, plain.size, plain.text_length) == (6, 512, 64)
    assert speed.parse_args(["--size", "256", "--heads", "4"]).size == 256


@pytest.mark.parametrize(("dims", "heads", "width"), [("sd3-medium", 24, 1536), ("sd3.5-medium", 24, 1536), ("sd3.5-large", 38, 2432)])
def test_dims_of_each_published_sd3_layout_model_time_its_own_blocks(  # noqa: ANN001
    speed, dims: str, heads: int, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dims takes every SD3-layout card's block size (SD3.5's rms-norm and dual-attention blocks too), not SD3-medium's
    alone: parsed at the published size, and timed end to end here at a small resolution (the code is the same)."""
    args = speed.parse_args(["--dims", dims, "--layers", "2"])
    assert (args.heads, args.size, args.text_length, args.layers) == (heads, 1024, 256, 2)
    monkeypatch.setitem(speed.DIMS, dims, {**speed.DIMS[dims], "size": 64, "text_length": 4})
    report, _ = speed.run_dims(speed.parse_args(["--dims", dims, "--layers", "1", "--repeats", "1", "--threads", "1"]))
    assert f"{dims} block size" in report and f"({heads} heads x 64 = {width} wide" in report
    rows = {line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ") and "---" not in line}
    assert {"diffusers", "catrt full", "catrt pruned"} <= rows


def test_every_timed_run_starts_after_the_queued_device_work(speed, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """On CUDA a call only queues its kernels: the first timed run's clock started while the warm-up still ran."""
    log: list[str] = []
    monkeypatch.setattr(speed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(speed.torch.cuda, "synchronize", lambda *args: log.append("sync"))
    speed.best_seconds(lambda: log.append("run"), 2)
    assert log == ["run", "sync", "run", "sync", "sync", "run", "sync"]
    log.clear()
    speed.interleaved_seconds({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, 1)
    assert log == ["sync", "a", "sync", "sync", "b", "sync"]


def test_the_selection_is_timed_per_pruned_step_of_an_uncaptured_generation(  # noqa: ANN001
    speed, tiny_pipelines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline that replays captured steps (compile on CUDA) never calls the selection in its pruned steps; the
    timing generation runs them uncaptured, each call between device synchronisations, and leaves the setting."""
    import catrt

    fast = catrt.accelerate(tiny_pipelines["tiny-sd3"], catrt.CATConfig(t0=2))
    fast.cuda_graphs = True  # what a compile build gets on CUDA (on this CPU a captured call would be refused)
    synced: list[int] = []
    monkeypatch.setattr(speed, "synchronize", lambda: synced.append(1))
    monkeypatch.setattr(speed, "PROMPT", "a red circle")
    seconds = speed.selection_seconds(fast, None)
    assert seconds > 0 and fast.cuda_graphs is True
    steps = inspect.signature(type(tiny_pipelines["tiny-sd3"]).__call__).parameters["num_inference_steps"].default
    assert len(synced) == 2 * (steps - 2)  # each pruned step selects the next step's tokens, in its own timed call


def test_diffusers_runs_on_the_device_the_engines_are_built_for(speed, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """The baseline loaded diffusers on the CPU whatever the engines ran on: a CUDA engine's 'speedup vs diffusers'
    compared it with CPU diffusers."""
    from catrt.engines import ENGINES

    seen = []
    monkeypatch.setattr(ENGINES["eager"], "default_device", classmethod(lambda cls: speed.torch.device("meta")))
    monkeypatch.setattr(speed, "save_bench_model", lambda config, folder: tmp_path)
    monkeypatch.setattr(speed, "baseline", lambda model, build, repeats, device: seen.append(device) or {"full": 1.0, "generation": 2.0})
    monkeypatch.setattr(speed, "measure_backend", lambda backend, model, args: dict.fromkeys(
        ("full", "pruned", "selection", "generation", "build"), 1.0))
    monkeypatch.setattr(speed, "mac_ratio", lambda *args: 0.4)
    speed.run_engines(speed.parse_args(["--backends", "eager", "--steps", "6", "--t0", "2", "--layers", "1"]))
    assert seen == [speed.torch.device("meta")] * 2


def test_another_users_report_in_a_sticky_folder_is_refused_before_the_run(  # noqa: ANN001
    speed, tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    """`--out /tmp/speed.md` of another user's report: the temporary file beside it is made (anyone may write /tmp),
    and only the rename after minutes of measuring failed. Another user is simulated by os.geteuid (the tests run as
    root); the folder is really sticky."""
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o1777)
    out = folder / "speed.md"
    out.write_text("another user's report\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as exited:
        speed.parse_args(["--out", str(out)])
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert exited.value.code == 2 and line == (
        f"bench/speed.py: error: --out {out} cannot be replaced: it belongs to another user (uid {os.stat(out).st_uid}) "
        f"and its folder {folder} is sticky (as /tmp is): only the file's owner may replace or remove it there; write it "
        "under another name, or have its owner remove it (see bench/speed.py --help)")
    assert sorted(folder.iterdir()) == [out] and out.read_text() == "another user's report\n"


def test_a_bench_model_saved_only_in_part_is_not_taken_for_saved(speed, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """save_pretrained writes model_index.json first: a run stopped mid-save (Ctrl-C, here after that first file) left
    a folder the next run reused as the saved model, half its weights missing. The next run saves it again, whole."""
    import argparse

    from diffusers import DiffusionPipeline

    save = DiffusionPipeline.save_pretrained

    def stopped_after_the_index(self: DiffusionPipeline, folder: str, *args: object, **kwargs: object) -> None:
        self.save_config(folder)  # model_index.json
        raise KeyboardInterrupt

    config = speed.transformer_config(argparse.Namespace(size=32, layers=1, heads=1))
    folder = tmp_path / "model"
    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", stopped_after_the_index)
    with pytest.raises(KeyboardInterrupt):
        speed.save_bench_model(config, folder)
    assert not folder.exists()
    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", save)
    assert speed.save_bench_model(config, folder) == folder
    assert (folder / "transformer" / "config.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
