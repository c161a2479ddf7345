"""bench/speed.py's settings: a mistake is one line and exit code 2 before anything is built or timed, and
--dims never silently replaces a size the command asked for (the report would name a size it did not time)."""

from __future__ import annotations

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


def test_dims_sets_the_published_size_and_the_defaults_hold_without_it(speed) -> None:  # noqa: ANN001
    dims = speed.parse_args(["--dims", "sd3-medium", "--layers", "2"])
    assert (dims.heads, dims.size, dims.text_length, dims.layers, dims.backends) == (24, 1024, 256, 2, None)
    assert speed.parse_args(["--dims", "sd3-medium", "--backends", "none"]).backends == []
    plain = speed.parse_args([])
    assert (plain.heads, plain.size, plain.text_length) == (6, 512, 64)
    assert speed.parse_args(["--size", "256", "--heads", "4"]).size == 256
