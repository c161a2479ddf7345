"""`catrt compare` end to end on a tiny model (files, metrics, CLIP score from a local folder, every
mistake one line), the metric helpers, and the First-Block-Cache-style `reuse_threshold` baseline."""

from __future__ import annotations

import csv
import errno
import fcntl
import math
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import catrt
import catrt.compare
from catrt import CATConfig, ConfigError
from catrt.build_config import BuildConfig
from catrt.bundle import _run_config
from catrt.cli import main
from catrt.macs import StepMacs
from catrt.metrics import mean_interval, paired_difference, psnr, ssim
from catrt.runtime import CATRuntime, StepRecord
from catrt.serve import ServeConfig
from tests.conftest import call_kwargs

# -- catrt compare ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP model and its processor saved with save_pretrained, as a user's local folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from catrt.tiny import _clip_tokenizer

    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def _compare(tmp_path: Path, *extra: str, prompts: str = "a red circle\na green square\n") -> tuple[int, Path]:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(prompts)
    out = tmp_path / "out"
    code = main(["compare", "--model", "tiny-pixart", "--prompts", str(prompts_file), "--height", "64", "--width", "64",
                 "--steps", "6", "--t0", "2", "--out", str(out), *extra])
    return code, out


def test_compare_end_to_end_with_clip(tmp_path: Path, clip_folder: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, out = _compare(tmp_path, "--seeds", "0", "1", "--rules", "full", "cat", "round_robin", "--clip", str(clip_folder),
                         prompts="a red circle\n\n")
    assert code == 0, capfd.readouterr().err
    assert "compare" in capfd.readouterr().err  # the progress bar
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 1 * 2 * 4  # prompts x seeds x (unpruned + 3 rules); the blank line is skipped
    by = {(r["prompt_index"], r["seed"], r["variant"]): r for r in rows}
    for row in rows:
        assert 0 <= float(row["clip"]) <= 100 and float(row["seconds"]) > 0
        if row["variant"] in ("unpruned", "full"):  # identical images: infinite PSNR, SSIM 1, the same CLIP score
            assert row["psnr"] == "inf" and float(row["ssim"]) == 1.0 and float(row["mac_ratio"]) == 1.0
            assert row["clip"] == by[(row["prompt_index"], row["seed"], "unpruned")]["clip"]
        else:
            assert math.isfinite(float(row["psnr"])) and -1 <= float(row["ssim"]) < 1
            assert 0 < float(row["mac_ratio"]) < 1 and row["reused_steps"] == "0"
    cat = {r["mac_ratio"] for r in rows if r["variant"] == "cat"}
    assert cat == {r["mac_ratio"] for r in rows if r["variant"] == "round_robin"} and len(cat) == 1  # same k and schedule
    assert len(list((out / "images").glob("*.png"))) == 8
    assert Image.open(out / "grid.png").size == (catrt.compare.ROW_LABEL_WIDTH + 4 * 128, 30 + 2 * 128)
    report = (out / "report.md").read_text()
    assert "| cat |" in report and "| round_robin |" in report and "| cat - round_robin |" in report
    assert "CLIP score" in report and "| full | inf | 1.0000" in report


def test_compare_counts_adaptive_reuse_from_the_trace(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, out = _compare(tmp_path, "--rules", "cat", "--reuse-threshold", "1000", prompts="a red circle\n")
    assert code == 0, capfd.readouterr().err
    row = next(r for r in csv.DictReader((out / "metrics.csv").open()) if r["variant"] == "cat")
    assert row["reused_steps"] == "4"  # every step after t0: the first block never moves by 1000x
    assert "reuse_threshold 1000.0" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("failure", "code", "line"),
    [(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 2, "cannot be written (No space left on device); pick a writable folder"),
     (KeyboardInterrupt(), 130, "catrt compare: interrupted")],
    ids=["disk-full", "ctrl-c"],
)
def test_a_failed_or_interrupted_write_leaves_the_earlier_results_whole(
    failure: BaseException, code: int, line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The write fails at the last file (the grid): one line, no traceback, and none of the new files among the old."""
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "report.md").write_text("earlier run\n")
    (out / "images" / "000-s0-cat.png").write_bytes(b"earlier image")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise failure

    monkeypatch.setattr(catrt.compare, "image_grid", fail)
    assert _compare(tmp_path, "--rules", "cat", prompts="a red circle\n")[0] == code
    err = capfd.readouterr().err
    assert line in err and "Traceback" not in err
    assert sorted(p.name for p in out.rglob("*")) == ["000-s0-cat.png", "images", "report.md"]  # no staging folder either
    assert (out / "report.md").read_text() == "earlier run\n"
    assert (out / "images" / "000-s0-cat.png").read_bytes() == b"earlier image"


@pytest.mark.parametrize(("signum", "code", "line"), [(signal.SIGINT, 130, "catrt compare: interrupted"),
                                                     (signal.SIGTERM, 143, "catrt compare: terminated")], ids=["ctrl-c", "sigterm"])
def test_a_signal_while_the_results_are_moved_into_place_waits_until_all_are(
    signum: int, code: int, line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:
    """A Ctrl-C between two of the moves stopped them halfway: the new images beside the earlier report. Now it
    takes effect once all are in place, through the command's own handler (its exit code and line)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("earlier run\n")
    replace = os.replace

    def interrupted_replace(source: Any, target: Any) -> None:
        if Path(target).parent == out / "images":  # after the first image
            os.kill(os.getpid(), signum)
        replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    # Ctrl-C as an interactive shell starts Python: pytest run in the background by a script (`nohup pytest &`, some CI)
    # inherits SIGINT ignored, and the command rightly keeps it ignored (this test then saw exit code 0).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert _compare(tmp_path, "--rules", "cat", prompts="a red circle\n")[0] == code
    finally:
        signal.signal(signal.SIGINT, inherited)
    monkeypatch.undo()
    assert line in capfd.readouterr().err
    assert "# catrt compare: tiny-pixart" in (out / "report.md").read_text() and (out / "grid.png").is_file()
    assert len(list((out / "images").glob("*.png"))) == 2 and [p.name for p in out.glob(".*")] == []


def test_two_compares_into_one_folder_move_their_results_in_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run moves its files with `--out` locked (publish.py's lock), so two runs into one folder at once leave one
    run's whole set, not the report of one beside the grid of the other."""
    out = tmp_path / "out"
    replace, moves = os.replace, []

    def checked_replace(source: Any, target: Any) -> None:
        if Path(target).parent in (out, out / "images"):
            other = os.open(out, os.O_RDONLY)  # another process's lock: its own open file description
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(other)
            moves.append(Path(target).name)
        replace(source, target)

    monkeypatch.setattr(os, "replace", checked_replace)
    assert _compare(tmp_path, "--rules", "cat", prompts="a red circle\n")[0] == 0
    assert sorted(moves) == sorted(["000-s0-unpruned.png", "000-s0-cat.png", "metrics.csv", "grid.png", "report.md"])


def test_a_killed_runs_hidden_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """A SIGKILLed run cannot remove its hidden staging folder in --out: the next run removes each one no live run holds
    (its lock died with it), and leaves a live run's, as builds do with theirs (publish.py)."""
    out = tmp_path / "out"
    (out / ".catrt-compare-killed" / "images").mkdir(parents=True)
    (out / ".catrt-compare-killed" / "images" / "000-s0-cat.png").write_bytes(b"half")
    (out / ".catrt-compare-live").mkdir()
    live = os.open(out / ".catrt-compare-live", os.O_RDONLY)  # a running compare's lock (its own open file description)
    try:
        fcntl.flock(live, fcntl.LOCK_EX)
        assert _compare(tmp_path, "--rules", "cat", prompts="a red circle\n")[0] == 0
    finally:
        os.close(live)
    assert sorted(p.name for p in out.glob(".*")) == [".catrt-compare-live"]
    assert (out / "report.md").is_file()


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        (None, ["--prompts", "missing.txt"], "--prompts 'missing.txt' is not a file; give a text file with one prompt per line"),
        ("empty", [], "has no prompts; write one per line"),
        ("out-file", [], "is a file; give a folder for report.md"),
        ("out-under-file", [], "cannot be a folder (Not a directory); give a folder you can write for report.md"),
        ("out-too-long", [], "cannot be a folder (File name too long); give a folder you can write for report.md"),
        ("out-empty", [], "--out is empty; give a folder for report.md"),
        (None, ["--clip", "no-such-clip-folder"], "--clip 'no-such-clip-folder' could not be loaded as a CLIP model"),
        ("not-clip", ["--clip", "bert"], "--clip 'bert' could not be loaded as a CLIP model and processor (its config is a "
                                         "'bert' model, not 'clip')"),
        (None, ["--t0", "9"], "CATConfig.t0 = 9 needs t0 < num_inference_steps, got 6 steps"),
        (None, ["--reuse-threshold", "-1"], "CATConfig.reuse_threshold must be >= 0 (0 = off), got -1.0"),
        (None, ["--rules", "best"], "argument --rules: invalid choice: 'best'"),
        (None, ["--rules", "cat", "random", "cat"], "--rules repeats cat; list each once"),
        (None, ["--seeds", "3", "1", "3"], "--seeds repeats 3; list each once"),
        (None, ["--rules", "cat", "--rules", "random", "cat"], "--rules repeats cat; list each once"),  # a repeated flag adds
        (None, ["--seeds", "3", "--seeds", "3"], "--seeds repeats 3; list each once"),
    ],
)
def test_compare_mistakes_are_one_line(
    setup: str | None, argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n \n" if setup == "empty" else "a red circle\n")
    out = tmp_path / "out"
    if setup == "out-file":
        out.write_text("")
    if setup == "out-under-file":  # refused before any model loads, not when the results are written
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    if setup == "out-too-long":
        out = tmp_path / ("o" * 300)
    if setup == "out-empty":  # an unset shell variable: the results went into the working directory
        out = ""  # type: ignore[assignment]
    if setup == "not-clip":  # another model's folder: refused before transformers warns about the type
        (tmp_path / "bert").mkdir()
        (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    args = ["compare", "--model", "tiny-pixart", "--prompts", str(prompts), "--steps", "6", "--t0", "2", "--out", str(out)]
    try:
        code = main([*args, *argv])
    except SystemExit as done:  # argparse's usage errors
        code = done.code
    err = capfd.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "out").is_file() if setup == "out-file" else not (tmp_path / "out").exists()  # made, then removed
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "images").exists()


def test_a_pipeline_refused_at_its_first_call_is_one_line_before_the_progress_bar(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A diffusers folder catrt loads but cannot run (a two-call scheduler) was refused once the bar showed: its line
    came after the bar's on the same terminal line."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = catrt.load_pipeline("tiny-sd3")
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "heun")
    capfd.readouterr()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    code = main(["compare", "--model", str(tmp_path / "heun"), "--prompts", str(prompts), "--height", "64", "--width", "64",
                 "--steps", "6", "--t0", "2", "--out", str(tmp_path / "out")])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (  # on a line of its own (diffusers' folder-loading bars come before)
        "catrt compare: error: FlowMatchHeunDiscreteScheduler calls the transformer 2 times per step; catrt needs exactly "
        "one transformer call per step (single-evaluation schedulers such as Euler or DPM-Solver)")
    assert "compare:" not in err.replace("catrt compare:", "")  # the bar never showed
    assert not (tmp_path / "out").exists()


def test_an_error_mid_run_clears_the_progress_bar_before_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """An image refused after the bar showed (a NaN at a later seed) was printed on the bar's line, after its text."""
    generate = catrt.compare.generate_image
    calls = []

    def failing(runner: Any, request: Any) -> Any:
        calls.append(request)
        if len(calls) == 6:  # the 2 warm-ups, then 3 timed images
            raise ConfigError("--guidance-scale 9 made the generation overflow", field="guidance_scale")
        return generate(runner, request)

    monkeypatch.setattr(catrt.compare, "generate_image", failing)
    code, out = _compare(tmp_path, "--rules", "cat", "--seeds", "0", "1")
    err = capfd.readouterr().err
    assert code == 2 and "compare:" in err.replace("catrt compare:", "")  # the bar showed
    cleared, line = err.rsplit("\r", 1)
    assert line == "catrt compare: error: --guidance-scale 9 made the generation overflow\n"
    assert not cleared.rsplit("\r", 1)[-1].strip()  # the bar's line was blanked first
    assert not out.exists()


def test_a_size_ssim_cannot_score_is_refused_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The reference model takes 2x2 images, which SSIM cannot score: that was found after the first images were made."""
    import catrt.loading

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loaded the model before refusing the size")

    monkeypatch.setattr(catrt.loading, "load_pipeline", no_load)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    code = main(["compare", "--model", "reference", "--prompts", str(prompts), "--height", "32", "--width", "2",
                 "--steps", "4", "--t0", "2", "--out", str(tmp_path / "out")])
    err = capfd.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "catrt compare: error: --width 2: SSIM needs images of at least 3x3 pixels; give --width 3 or more"]
    assert not (tmp_path / "out").exists()


def test_the_grid_names_each_rows_prompt_and_seed(tmp_path: Path) -> None:
    """grid.png's rows had no names: which prompt and seed a row showed was left to guess from metrics.csv's order."""
    from catrt.compare import ROW_LABEL_WIDTH, UNPRUNED, Comparison, Sample, Variant, image_grid

    colours = {UNPRUNED: (200, 30, 30), "cat": (30, 30, 200)}
    keys = [(0, 5), (1, 5)]
    samples = [Sample(index, f"prompt number {index}", seed, label, math.inf, 1.0, None, 1.0, 1.0, 0)
               for index, seed in keys for label in colours]
    images = {(index, seed, label): Image.new("RGB", (32, 32), colour) for index, seed in keys for label, colour in colours.items()}
    image_grid(Comparison([Variant(UNPRUNED, None), Variant("cat", None)], samples, images), tmp_path / "grid.png", rows=8)
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert grid.shape == (30 + 2 * 128, ROW_LABEL_WIDTH + 2 * 128, 3)
    for row in range(2):
        top = 30 + row * 128
        label = grid[top : top + 128, :ROW_LABEL_WIDTH]
        assert (label.sum(-1) < 200).sum() > 50  # text drawn in black on the white column
        assert tuple(grid[top + 64, ROW_LABEL_WIDTH + 64]) == colours[UNPRUNED]
        assert tuple(grid[top + 64, ROW_LABEL_WIDTH + 128 + 64]) == colours["cat"]
    assert catrt.compare._row_label(3, 7, "a small red circle in the top left on a blue background", 18).splitlines() == [
        "prompt 3, seed 7", "a small red circle", "in the top left on", "a blue background"]


def _two_variant_grid(path: Path, prompt: str, seed: int) -> np.ndarray:
    """grid.png of one row (`prompt`, `seed`): a red unpruned cell and a blue cat cell, as an RGB array."""
    from catrt.compare import UNPRUNED, Comparison, Sample, Variant, image_grid

    colours = {UNPRUNED: (200, 30, 30), "cat": (30, 30, 200)}
    samples = [Sample(0, prompt, seed, label, math.inf, 1.0, None, 1.0, 1.0, 0) for label in colours]
    images = {(0, seed, label): Image.new("RGB", (32, 32), colour) for label, colour in colours.items()}
    image_grid(Comparison([Variant(UNPRUNED, None), Variant("cat", None)], samples, images), path, rows=8)
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_grid_shows_a_huge_seed_whole(tmp_path: Path) -> None:
    """A seed of 19 digits (`--seeds 9223372036854775807`) overran the fixed first column and the images pasted over its
    end: the row read `seed 9223372`, another seed. The column widens to the row's heading; the cells follow it."""
    from catrt.compare import ROW_LABEL_WIDTH

    grid = _two_variant_grid(tmp_path / "grid.png", "a red circle", 2**63 - 1)
    label_width = grid.shape[1] - 2 * 128
    assert label_width > ROW_LABEL_WIDTH
    heading = grid[30 : 30 + 16, ROW_LABEL_WIDTH:label_width]
    assert (heading.sum(-1) < 200).sum() > 20  # the seed's last digits, in black on the white column
    assert tuple(grid[30 + 64, label_width + 64]) == (200, 30, 30) and tuple(grid[30 + 64, label_width + 128 + 64]) == (30, 30, 200)
    assert _two_variant_grid(tmp_path / "small.png", "a red circle", 7).shape[1] == ROW_LABEL_WIDTH + 2 * 128


def test_the_grid_names_a_prompt_beyond_latin_1_without_freetype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's bitmap default font (a Pillow without FreeType, or Pillow 10.0, which pyproject allows) encodes Latin-1
    only: a Chinese, Arabic or emoji prompt raised UnicodeEncodeError at grid.png, after every image was generated,
    and the run wrote nothing. Its characters show as '?' there."""
    from PIL import ImageFont

    monkeypatch.setattr(ImageFont, "load_default", lambda size=None: ImageFont.load_default_imagefont())
    grid = _two_variant_grid(tmp_path / "grid.png", "一只猫 on a mat, قطة 🐱", 3)
    assert (grid[30 : 30 + 128, : grid.shape[1] - 2 * 128].sum(-1) < 200).sum() > 50  # the row is named


def test_prompts_file_drops_a_byte_order_mark_and_carriage_returns(tmp_path: Path) -> None:
    from catrt.compare import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red circle\r\n\r\na blue square\r\n".encode())  # as Windows Notepad saves it
    assert read_prompts(path) == ["a red circle", "a blue square"]


def test_metrics_exact_values() -> None:
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # mse = 255^2 / 192
    assert psnr(a, a) == math.inf and ssim(a + 7, a + 7) == 1.0
    assert psnr(b, a) == pytest.approx(10 * math.log10(192))
    interval = mean_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert math.isnan(mean_interval([5.0]).half_width) and mean_interval([1.0, math.inf]).mean == math.inf
    assert paired_difference([3.0, 5.0], [1.0, 2.0]).mean == 2.5 and paired_difference([math.inf], [1.0]) is None


# -- reuse_threshold: the First-Block-Cache-style baseline ----------------------------------------


def test_reuse_threshold_is_validated_and_refused_by_engines_and_graphs(tiny_pipelines: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"reuse_threshold must be >= 0 \(0 = off\), got -0.5") as caught:
        CATConfig(reuse_threshold=-0.5)
    assert caught.value.field == "reuse_threshold"
    build = BuildConfig(model="tiny-sd3", height=64, width=64, steps=6, t0=2)
    with pytest.raises(ConfigError, match="engines run a static schedule: build one with --reuse-every") as caught:
        build.cat_config(reuse_threshold=0.1)
    assert caught.value.field == "reuse_threshold"
    with pytest.raises(ConfigError, match="engines run a static schedule"):  # catrt.load's check, before any backend
        _run_config(build, CATConfig(t0=2, reuse_threshold=0.1))
    with pytest.raises(ConfigError, match="the server runs static schedules"):
        ServeConfig(model="reference", steps=6, cat=CATConfig(t0=2, reuse_threshold=0.1))
    adapter = catrt.accelerate(tiny_pipelines["tiny-sd3"]).adapter

    class OtherBackend:  # any step functions but the adapter's own: an engine
        pass

    config = CATConfig(t0=2, reuse_threshold=0.1)
    with pytest.raises(ConfigError, match="only the eager backend computes; engines run a static schedule: use reuse_every"):
        CATRuntime(adapter, config, steps=6, guidance=False, functions=OtherBackend())
    runtime = CATRuntime(adapter, config, steps=6, guidance=False, cuda_graphs=True)
    with pytest.raises(ConfigError, match="CUDA graphs take static schedules only"):
        runtime._wants_capture(torch.device("cpu"))


@pytest.mark.parametrize("config", [CATConfig(t0=2, reuse_threshold=0.1), CATConfig(t0=2, rule="attention")],
                         ids=["reuse-threshold", "attention-rule"])
def test_accelerate_refuses_eager_only_settings_for_compiled_or_engine_steps_before_compiling(
    config: CATConfig, tiny_pipelines: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """accelerate(backend="compile") (or with an engine's step functions) and a setting only the eager adapter computes
    is refused by accelerate itself, before torch.compile runs, not at the first call; eager accepts it."""
    import catrt.engines.compile

    def compiled(adapter: Any) -> Any:
        raise AssertionError("compiled before the refusal")

    monkeypatch.setattr(catrt.engines.compile, "compile_step_functions", compiled)
    pipe = tiny_pipelines["tiny-sd3"]
    with pytest.raises(ConfigError, match="the attention rule needs|only the eager backend computes") as caught:
        catrt.accelerate(pipe, config, backend="compile")
    assert caught.value.field == ("rule" if config.rule == "attention" else "reuse_threshold")
    eager = catrt.accelerate(pipe, config)
    with pytest.raises(ConfigError, match="the attention rule needs|only the eager backend computes"):
        catrt.accelerate(pipe, config, functions=eager.adapter)  # the adapter handed over as an engine's functions
    catrt.accelerate(pipe, config)  # the eager backend runs both


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-pixart", "tiny-flux"])
def test_reuse_threshold_decides_from_the_first_block(name: str, tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines[name]

    def run(**fields: Any) -> tuple[torch.Tensor, list[StepRecord]]:
        fast = catrt.accelerate(pipe, CATConfig(alpha=0.3, t0=4, trace=True, **fields))
        return fast(**call_kwargs(pipe)).images, fast.last_trace

    plain, _ = run()
    never, trace = run(reuse_threshold=1e-12)  # every step computed: the probe leaves the caches untouched
    assert torch.equal(never, plain)
    assert "".join(r.kind[0] for r in trace) == "ffff" + "p" * 8
    assert [r.change is not None for r in trace] == [False] * 4 + [True] * 8 and all(r.change > 0 for r in trace[4:])
    always, trace = run(reuse_threshold=1e6)  # every step after t0 reuses step t0's prediction
    assert "".join(r.kind[0] for r in trace) == "ffff" + "r" * 8
    assert torch.equal(always, run(reuse_every=1)[0])


def test_first_block_residual_matches_diffusers(tiny_pipelines: dict[str, Any]) -> None:
    pipe = tiny_pipelines["tiny-sd3"]
    fast = catrt.accelerate(pipe)
    transformer, adapter = pipe.transformer, fast.adapter
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, transformer.config.in_channels, 8, 12, generator=gen)
    timestep = torch.tensor([500.0, 500.0])
    text = torch.randn(2, 9, transformer.config.joint_attention_dim, generator=gen)
    pooled = torch.randn(2, transformer.config.pooled_projection_dim, generator=gen)
    context = adapter.prepare_context({"encoder_hidden_states": text, "pooled_projections": pooled}, tuple(latents.shape))
    with torch.no_grad():
        got = adapter.first_block_residual(latents, timestep, context)
        tokens = transformer.pos_embed(latents)
        temb = transformer.time_text_embed(timestep, pooled)
        _, out = transformer.transformer_blocks[0](tokens, transformer.context_embedder(text), temb)
    torch.testing.assert_close(got, out - tokens, rtol=1e-5, atol=1e-5)


def test_traced_macs_count_probes_where_they_cost() -> None:
    def trace(kinds: str, decided: str) -> list[StepRecord]:
        return [StepRecord(i, {"f": "full", "p": "pruned", "r": "reused"}[k], None, 0.1 if d == "1" else None)
                for i, (k, d) in enumerate(zip(kinds, decided), 1)]

    steps = StepMacs(num_tokens=100, k=30, full=1000, context_full=1000, pruned=300, context=5, probe=70)
    records = trace("ffprpr", "001111")
    assert steps.traced(records) == 5 + 2 * 1000 + 2 * 300 + 4 * 70
    assert steps.traced_ratio(records) == pytest.approx((5 + 2000 + 600 + 280) / 6000)
    every_token = StepMacs(num_tokens=100, k=100, full=1000, context_full=1000, pruned=1010, context=5, probe=70)
    assert every_token.traced(records) == 5 + 2 * 1000 + 2 * 1010 + 2 * 70  # computed steps make the probe themselves


def test_a_variant_identical_on_some_images_says_how_many_and_the_others_psnr() -> None:
    """The mean PSNR of a variant with one identical image among three read a bare 'inf', as for a variant identical
    on all of them."""
    from catrt.compare import UNPRUNED, Comparison, Sample, Variant, report_lines

    def sample(index: int, variant: str, psnr: float) -> Sample:
        return Sample(index, "p", 0, variant, psnr, 1.0 if math.isinf(psnr) else 0.9, None, 1.0 if variant == UNPRUNED else 0.5, 1.0, 0)

    samples = [sample(i, UNPRUNED, math.inf) for i in range(3)]
    samples += [sample(0, "cat", math.inf), sample(1, "cat", 30.0), sample(2, "cat", 32.0)]
    samples += [sample(i, "full", math.inf) for i in range(3)]
    lines = report_lines(Comparison([Variant(UNPRUNED, None), Variant("cat", None), Variant("full", None)], samples, {}))
    rows = {line.split(" | ")[0]: line.split(" | ")[1] for line in lines if line.startswith("| ") and " | " in line}
    assert rows["| cat"] == "inf (1 of 3 identical; the other 2: 31.00 ± 12.71)"
    assert rows["| full"] == rows[f"| {UNPRUNED}"] == "inf"


def test_a_timed_generation_starts_after_the_work_queued_on_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the clock started with work still queued (compare counts MACs with real forwards between images), and
    that work's tail was timed as the next image's."""
    from types import SimpleNamespace

    from catrt import generation
    from catrt.pipeline import PIPELINES, PipelineSpec

    log: list[str] = []

    class QueuedPipeline:  # a CUDA pipeline as generate_image sees it
        device = torch.device("cuda")

        def __call__(self, prompt: str, num_inference_steps: int = 2, guidance_scale: float = 1.0,
                     generator: Any = None, output_type: str = "pil") -> Any:
            log.append("call")
            return SimpleNamespace(images=np.zeros((1, 4, 4, 3), dtype=np.float32))

    monkeypatch.setitem(PIPELINES, QueuedPipeline, PipelineSpec(call_defaults={}, text_length_argument=None))
    monkeypatch.setattr(generation.torch, "Generator", lambda device: SimpleNamespace(manual_seed=lambda seed: None))
    monkeypatch.setattr(generation.torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    image, seconds = generation.generate_image(QueuedPipeline(), generation.GenerationRequest(prompt="p", steps=2))
    assert log == ["sync", "call", "sync"] and image.size == (4, 4) and seconds >= 0


@pytest.mark.parametrize(
    ("name", "made", "says"),
    [
        ("report.md", "folder", "its report.md cannot be replaced: it is a folder, where a file is written (renamed onto "
                                "its name); move the folder away or give another --out"),
        ("grid.png", "folder", "its grid.png cannot be replaced: it is a folder"),
        ("images", "file", "its images is not a folder, where the run moves its images; move it away or give another --out"),
        ("images", "dangling link", "its images is not a folder"),
    ],
)
def test_a_folder_where_compare_writes_a_file_is_one_line_before_the_model_loads(
    name: str, made: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The final moves met it after the whole run: a folder at report.md failed its rename once the images, metrics.csv
    and grid.png had been replaced (a half set), a file at images failed its mkdir."""
    monkeypatch.setattr(catrt.loading, "load_pipeline", lambda *args, **kwargs: pytest.fail("the model loaded"))
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a red circle\n")
    out.mkdir()
    if made == "folder":
        (out / name).mkdir()
    elif made == "file":
        (out / name).write_text("")
    else:
        (out / name).symlink_to(tmp_path / "gone")
    code = main(["compare", "--model", "tiny-pixart", "--prompts", str(prompts), "--steps", "6", "--t0", "2",
                 "--out", str(out)])
    err = capfd.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"--out {str(out)!r}: {says}" in err, err
    assert sorted(p.name for p in out.iterdir()) == [name]
