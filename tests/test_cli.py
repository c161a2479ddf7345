"""The `catrt` command line: real subprocesses where start-up matters (imports, notices), `main()` in-process
for the many user mistakes, each of which must end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import catrt
import catrt.cli.generate
import catrt.cli.macs
from catrt import cli
from catrt.cli import main
from catrt.errors import CatrtError, ConfigError, GenerationError
from catrt.generation import check_prompt_length, finite_images
from catrt.pipeline import pipeline_spec
from catrt.prompts import text_limit
from catrt.model_cards import MODEL_CARDS, default_precision

HEAVY_MODULES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "fastapi", "uvicorn")


def _catrt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "catrt.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def _fails(capfd: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run `catrt argv` in-process; it must exit 2 with exactly one stderr line and no traceback."""
    assert main(list(argv)) == 2
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"catrt {argv[0]}: error: ")
    return lines[0]


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command loads a model or bundle: the mistake must be caught before."""
    import catrt.build
    import catrt.bundle
    import catrt.loading

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loaded a model before refusing the arguments")

    monkeypatch.setattr(catrt.loading, "load_pipeline", forbidden)
    monkeypatch.setattr(catrt.build, "load_pipeline", forbidden)  # bound at its import, so patched there too
    monkeypatch.setattr(catrt.bundle, "load", forbidden)


# --- end to end, as a user runs it ---------------------------------------------------------------------


def test_generate_writes_a_png_without_notices(tmp_path: Path) -> None:
    out = tmp_path / "pruned.png"
    result = _catrt("generate", "--model", "tiny-sd3", "--prompt", "a red circle", "--steps", "12", "--t0", "4",
                    "--height", "64", "--width", "96", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "alpha=0.3 t0=4, fp32" in result.stdout
    assert "torchvision" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (96, 64)


@pytest.mark.parametrize("module", ["catrt.reference.train", "catrt.reference.probe"])
def test_the_reference_scripts_print_no_torchvision_notices(module: str) -> None:
    """`python -m catrt.reference.train` (the README's training command) and `.probe` are programs as `catrt` is:
    transformers' two "requires torchvision (not installed)" notices printed on every run, --help included."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "--out" in result.stdout, result.stderr
    assert "torchvision" not in result.stderr, result.stderr


def test_import_loads_no_heavy_module() -> None:
    """`import catrt` and `import catrt.cli` are cheap: the public names are imported on first use."""
    result = _python(f"import sys, catrt, catrt.cli; print(sorted(n for n in {HEAVY_MODULES!r} if n in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]" and "torchvision" not in result.stderr


def test_help_and_import_load_no_heavy_module() -> None:
    """`import catrt`, the parser and every `--help` stay free of torch and diffusers (help in well under 1 s)."""
    code = f"""
import sys
import catrt, catrt.cli
assert catrt.CATConfig().alpha == 0.3  # a lazy name that is cheap
for command in ([], ["generate"], ["macs"], ["build"], ["inspect"], ["serve"], ["compare"]):
    try:
        catrt.cli.main([*command, "--help"])
    except SystemExit as done:
        assert done.code == 0, command
print(sorted(name for name in {HEAVY_MODULES!r} if name in sys.modules))
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_version_and_defaults_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"catrt {cli._version()}"
    for command, shown in (
        ("generate", ("(default: 0.3)", "(default: 8)", "(default: image.png)", "(default: cpu)", "(default: reference)")),
        ("macs", ("(default: the model's)", "(default: 28)")),
        ("build", ("(default: auto)", "(default: engines)")),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for default in shown:
            assert default in text, (command, default)


def test_precision_help_states_each_published_models_cuda_default(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`generate` and `build --help` name the CUDA dtype `default_precision` picks for every published model (FLUX bf16)."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: argparse would wrap flux-schnell at its hyphen
    expected = {name: default_precision(name, "cuda") for name, card in MODEL_CARDS.items() if card.precision != "fp32"}
    assert expected["flux-dev"] == "bf16" and default_precision("reference", "cuda") == "fp32"
    for command in ("generate", "build"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        stated = text.split("the model's usual one: ")[1].split("; others")[0]
        named = {}
        for group in stated.split("; "):
            *names, precision = group.replace(",", "").split()
            named.update(dict.fromkeys(names, precision))
        assert named == expected, command
        assert "fp16 / bf16 need a CUDA device" not in text


def test_lazy_package_attributes() -> None:
    from catrt.loading import load_pipeline
    from catrt.pipeline import accelerate

    assert catrt.load_pipeline is load_pipeline and catrt.accelerate is accelerate
    assert issubclass(catrt.ConfigError, catrt.CatrtError)
    with pytest.raises(AttributeError):
        catrt.no_such_name  # noqa: B018


# --- mistakes caught before any model loads --------------------------------------------------------------


@pytest.mark.usefixtures("no_model_loads")
@pytest.mark.parametrize(("argv", "message"), [
    (("generate", "--prompt", "x", "--out", "image.txt"), "--out 'image.txt' is not an image file name: end it in .png"),
    (("generate", "--prompt", "x", "--out", "image"), "is not an image file name"),
    (("generate", "--model", "reference", "--prompt", "x", "--height", "128", "--width", "64"),
     "height 128 does not fit model reference, which takes multiples of 2 up to 64 pixels; try height 64"),
    (("generate", "--model", "sd3", "--prompt", "x", "--height", "1000"),
     "height 1000 does not fit model sd3, which takes multiples of 16 up to 3072 pixels; try height 992"),
    (("generate", "--prompt", "x", "--alpha", "1.5"), "CATConfig.alpha must be in (0, 1], got 1.5"),
    (("generate", "--prompt", "x", "--steps", "4"), "CATConfig.t0 = 8 needs t0 < num_inference_steps"),
    (("generate", "--prompt", "x", "--engines", "engines/some-build", "--alpha", "0.5"),
     "manifest.json is missing: engines/some-build is not a catrt engine folder"),
    (("generate", "--prompt", "x", "--engines", "engines/some-build", "--t0", "4"),
     "--t0 cannot be used with --engines: the build fixes it"),
    (("generate", "--model", "tiny-sd3", "--prompt", "x", "--precision", "fp16"),
     "--precision fp16 needs a CUDA device"),
    (("generate", "--prompt", "x", "--device", "gpu"), "--device 'gpu' is not a device catrt runs on; use cpu, cuda, cuda:N or mps"),
    (("generate", "--prompt", "x", "--device", "meta"), "--device 'meta' is not a device catrt runs on"),
    (("generate", "--prompt", "x", "--device", ""), "--device '' is not a device catrt runs on"),
    (("generate", "--prompt", " \t\u200b"), "--prompt must not be empty or blank"),
    (("generate", "--prompt", "a\x00b"), "--prompt has the control character U+0000 at character 1"),
    (("generate", "--prompt", "x", "--negative-prompt", "\x1b[31m"), "--negative-prompt has the control character U+001B"),
    (("generate", "--prompt", "x", "--seed", str(2**64)), f"--seed must be an integer in [0, {2**63 - 1}], got {2**64}"),
    (("generate", "--prompt", "x", "--guidance-scale", "nan"), "--guidance-scale must be a finite number >= 0, got nan"),
    (("generate", "--prompt", "x", "--guidance-scale", "-1"), "--guidance-scale must be a finite number >= 0, got -1.0"),
    (("macs", "--model", "pixart-sigma", "--width", "1000"),
     "width 1000 does not fit model pixart-sigma, which takes multiples of 16 pixels"),
    (("build", "--model", "reference", "--height", "96"), "height 96 does not fit model reference"),
    (("serve", "--model", "reference", "--height", "7"), "height 7 does not fit model reference, which takes multiples of 2"),
    (("serve", "--model", "reference", "--device", "meta"), "--device 'meta' is not a device catrt runs on"),
    (("serve", "--model", "reference", "--device", "cuda:x"), "--device 'cuda:x' is not a device catrt runs on"),
    (("serve", "--model", "reference", "--batch", "65"), "ServeConfig.batch must be an integer from 1 to 64, got 65"),
    (("build", "--model", "reference", "--batch", "100000"), "BuildConfig.batch must be an integer from 1 to 64, got 100000"),
    (("generate", "--model", "", "--prompt", "x"), "unknown model '': known names are"),
    (("build", "--model", "nope"), "unknown model 'nope': known names are"),
    (("generate", "--prompt", "x", "--kmeans-iters", "1000000000000"), "CATConfig.kmeans_iters must be an integer from 1 to 1000"),
    (("build", "--out", ""), "--out is empty; give a folder (default: engines)"),
    (("build", "--export-dir", " "), "--export-dir is empty; give a folder (default: export)"),
    (("generate", "--prompt", "x", "--engines", ""), "--engines is empty; give an engines/<build-name> folder (catrt build)"),
    (("inspect", " "), "the engine folder path is empty; give an engines/<build-name> folder"),
    (("serve", "--engines", "engines/a", ""), "--engines names an empty folder path; give engines/<build-name> folders"),
    (("generate", "--prompt", "x", "--full", "--alpha", "0"), "argument --alpha: CATConfig.alpha must be in (0, 1]"),
], ids=["out-txt", "out-no-ext", "reference-size", "sd3-size", "alpha", "t0-steps", "engines-alpha", "engines-t0",
        "fp16-cpu", "device-name", "device-meta", "device-empty", "prompt-blank", "prompt-nul", "negative-escape",
        "seed-huge", "guidance-nan", "guidance-negative", "macs-size", "build-size", "serve-size", "serve-device",
        "serve-device-index", "serve-batch", "build-batch", "model-empty", "build-model-unknown", "kmeans-iters-huge",
        "build-out-empty", "build-export-dir-blank", "engines-empty", "inspect-empty", "serve-engines-empty", "full-bad-alpha"])
def test_mistakes_end_in_one_line_before_loading(capfd: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str) -> None:
    assert message in _fails(capfd, *argv)


@pytest.mark.usefixtures("no_model_loads")
@pytest.mark.parametrize(("argv", "line"), [
    (("generate", "--prompt", "x", "--alpha", "2"), "argument --alpha: CATConfig.alpha must be in (0, 1], got 2.0"),
    (("generate", "--prompt", "x", "--alph=2"), "argument --alpha: CATConfig.alpha must be in (0, 1], got 2.0"),
    (("generate", "--prompt", "x", "--t0", "1"), "argument --t0: CATConfig.t0 must be an integer >= 2, got 1"),
    (("macs", "--model", "reference", "--kmeans-iters", "0"), "argument --kmeans-iters: CATConfig.kmeans_iters must be an integer from 1 to 1000"),
    (("serve", "--model", "reference", "--alpha", "0.3", "1.5"), "argument --alpha: CATConfig.alpha must be in (0, 1]"),
    (("serve", "--model", "reference", "--batch", "65"), "argument --batch: ServeConfig.batch must be an integer from 1 to 64"),
    (("build", "--model", "reference", "--alpha", "0"), "argument --alpha: BuildConfig.alphas: CATConfig.alpha must be in"),
    # The default t0 failing against the --steps given: --t0 was not given, so no flag of it is named.
    (("generate", "--prompt", "x", "--steps", "4"), "error: CATConfig.t0 = 8 needs t0 < num_inference_steps"),
], ids=["alpha", "alpha-prefix-equals", "t0", "kmeans-iters", "serve-second-alpha", "serve-batch", "build-alpha", "steps"])
def test_a_config_range_error_names_the_flag_given(capfd: pytest.CaptureFixture[str], argv: tuple[str, ...], line: str) -> None:
    """A flag's value out of its config field's range names the flag first, as argparse's own range errors do."""
    assert line in _fails(capfd, *argv)


@pytest.mark.usefixtures("no_model_loads")
@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--reuse-every", "3", "--reuse-every cannot be used with --engines: the build fixes it; drop --reuse-every"),
    ("--refresh-every", "5", "--refresh-every cannot be used with --engines: a served build runs with catrt's default "
                             "--refresh-every; drop --refresh-every, or serve the model with --model to set it"),
    ("--rule", "random", "--rule cannot be used with --engines: a served build runs with catrt's default --rule"),
    ("--n-clusters", "4", "--n-clusters cannot be used with --engines"),
    ("--magnitude-fraction", "0.5", "--magnitude-fraction cannot be used with --engines"),
    # A value CATConfig would refuse is still refused as a flag the build fixes: the flag is the mistake, not its value.
    ("--alpha", "5", "--alpha cannot be used with --engines: the build fixes it; drop --alpha or build an engine with it"),
    ("--t0", "1", "--t0 cannot be used with --engines: the build fixes it; drop --t0 or build an engine with it"),
])
def test_serve_refuses_cat_flags_a_served_build_would_not_read(
    capfd: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    """A served build runs its own schedule and the default selection: a CAT flag given with --engines was ignored."""
    assert message in _fails(capfd, "serve", "--engines", "engines/some-build", flag, value, "--port", "0")


@pytest.mark.usefixtures("no_model_loads")
@pytest.mark.parametrize("ray", [False, True], ids=["one-device", "ray"])
def test_serve_refuses_an_unknown_model_before_binding(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path, ray: bool) -> None:
    import catrt.serve.server

    def bind(*args: Any) -> None:
        raise AssertionError("bound the port before refusing the model")

    monkeypatch.setattr(catrt.serve.server, "listening_socket", bind)
    folder = tmp_path / "not-a-pipeline"
    folder.mkdir()
    for model in ("sd-3", str(folder)):
        line = _fails(capfd, "serve", "--model", model, "--port", "8123", *(["--ray"] if ray else []))
        assert f"unknown model {model!r}: known names are " in line and "an existing diffusers folder" in line


@pytest.mark.usefixtures("no_model_loads")
def test_an_out_that_cannot_be_written_is_refused_before_loading(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    line = _fails(capfd, "generate", "--prompt", "x", "--out", str(tmp_path / "file" / "sub" / "a.png"))
    assert f"{tmp_path / 'file'} is a file, not a folder" in line
    line = _fails(capfd, "generate", "--prompt", "x", "--out", "/proc/catrt-image.png")  # unwritable even as root
    assert "--out '/proc/catrt-image.png' cannot be written" in line and "pick a writable folder" in line


@pytest.mark.usefixtures("no_model_loads")
def test_an_image_in_a_read_only_folder_is_refused_naming_the_folder_before_loading(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writable image in a folder that takes no new file cannot be replaced (the new image is written beside it and
    renamed onto it): "cannot be written (Permission denied)" of a writable file named neither the folder nor why."""
    from tests.test_atomic_files import refuse_new_files

    out = tmp_path / "image.png"
    out.write_bytes(b"an earlier image")
    refuse_new_files(monkeypatch, tmp_path)
    line = _fails(capfd, "generate", "--prompt", "x", "--out", str(out))
    assert line == (f"catrt generate: error: --out {str(out)!r} cannot be replaced: its folder {tmp_path} is not writable "
                    f"(Permission denied), though the file is: a file is replaced by a new one written beside it and "
                    f"renamed onto it, never rewritten in place (an interrupted write would leave it half-written); make "
                    f"{tmp_path} writable or pick another folder")
    assert out.read_bytes() == b"an earlier image" and sorted(tmp_path.iterdir()) == [out]


@pytest.mark.usefixtures("no_model_loads")
def test_an_out_name_over_the_filesystems_limit_is_refused_before_loading(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Its staged file's name, cut to fit, could be made: the image's rename would fail only after the generation."""
    out = tmp_path / ("a" * 252 + ".png")
    line = _fails(capfd, "generate", "--prompt", "x", "--out", str(out))
    assert "cannot be written (File name too long); pick a writable folder" in line and list(tmp_path.iterdir()) == []


def _interrupt() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("stop", "code", "said"),
    [(_interrupt, 130, "interrupted"), (lambda: os.kill(os.getpid(), signal.SIGTERM), 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)
def test_a_stop_while_the_image_is_written_keeps_the_old_image_and_leaves_no_file(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stop: Callable[[], None],
    code: int, said: str,
) -> None:
    """Ctrl-C exits 130, SIGTERM 143 (its handler restored after): one line, the earlier image intact, no partial file."""
    import catrt.generation

    class HalfWritten:
        def save(self, path: Path, **named: Any) -> None:
            Path(path).write_bytes(b"half an image")
            stop()

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(catrt.cli.generate, "_model_runner", lambda args: (object(), "stub"))
    monkeypatch.setattr(catrt.generation, "generate_image", lambda runner, request: (HalfWritten(), 1.0))
    out = tmp_path / "image.png"
    out.write_bytes(b"the earlier image")
    assert main(["generate", "--prompt", "x", "--out", str(out)]) == code
    assert capfd.readouterr().err.strip() == f"catrt generate: {said}"
    assert out.read_bytes() == b"the earlier image" and sorted(tmp_path.iterdir()) == [out]
    assert signal.getsignal(signal.SIGTERM) is handler


def test_generate_writes_through_a_link_at_out_and_takes_any_name_a_plain_write_takes(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An --out that is a link (`latest.png -> runs/0042.png`) had the link replaced by the image, the file it named left
    stale, as PIL's own save would not; an --out name of 242 to 255 bytes was refused as 'File name too long' (its
    temporary's name is 14 bytes longer)."""
    import catrt.generation

    class Image:
        width, height = 96, 64

        def save(self, path: Path, **named: Any) -> None:
            Path(path).write_bytes(b"the new image")

    monkeypatch.setattr(catrt.cli.generate, "_model_runner", lambda args: (object(), "stub"))
    monkeypatch.setattr(catrt.generation, "generate_image", lambda runner, request: (Image(), 1.0))
    (tmp_path / "runs").mkdir()
    target, link = tmp_path / "runs" / "0042.png", tmp_path / "latest.png"
    target.write_bytes(b"the earlier image")
    link.symlink_to(Path("runs") / "0042.png")
    assert main(["generate", "--prompt", "x", "--out", str(link)]) == 0, capfd.readouterr().err
    assert link.is_symlink() and target.read_bytes() == b"the new image"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["0042.png"]
    link.unlink()
    link.symlink_to(Path("later") / "runs" / "0043.png")  # dangling: its folders made, as --out's own are
    assert main(["generate", "--prompt", "x", "--out", str(link)]) == 0, capfd.readouterr().err
    assert link.is_symlink() and (tmp_path / "later" / "runs" / "0043.png").read_bytes() == b"the new image"
    long = tmp_path / ("a" * 251 + ".png")
    assert main(["generate", "--prompt", "x", "--out", str(long)]) == 0, capfd.readouterr().err
    assert long.read_bytes() == b"the new image"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([long.name, "latest.png", "later", "runs"])


@pytest.mark.usefixtures("no_model_loads")
def test_compare_refuses_bad_seeds_guidance_and_prompt_text_before_loading(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue\x00square\n")
    compare = ("compare", "--prompts", str(prompts), "--out", str(tmp_path / "out"))
    assert f"the prompt on line 2 of {prompts} has the control character U+0000" in _fails(capfd, *compare)
    assert "--seeds must be an integer in [0, " in _fails(capfd, *compare, "--seeds", "0", str(2**64))
    assert "--guidance-scale must be a finite number >= 0, got inf" in _fails(capfd, *compare, "--guidance-scale", "inf")


@pytest.mark.usefixtures("no_model_loads")
def test_compare_refuses_an_out_whose_files_it_could_not_replace_before_loading(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out /tmp` holding another user's report.md (a sticky folder), or a folder that takes no new file: the run's files are moved in last, so each failed after minutes of generating. Another user is
    simulated by os.geteuid (the tests run as root); the folder is really sticky."""
    from tests.test_atomic_files import refuse_new_files

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    (shared / "report.md").write_text("another user's report\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    line = _fails(capfd, "compare", "--prompts", str(prompts), "--out", str(shared))
    assert line == (f"catrt compare: error: --out {str(shared)!r}: its report.md cannot be replaced: it belongs to another "
                    f"user (uid {os.stat(shared / 'report.md').st_uid}) and its folder {shared} is sticky (as /tmp is): "
                    "only the file's owner may replace or remove it there; give another --out")
    assert sorted(p.name for p in shared.iterdir()) == ["report.md"]
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    opener = os.open
    refuse_new_files(monkeypatch, shared)
    line = _fails(capfd, "compare", "--prompts", str(prompts), "--out", str(shared))
    assert line == f"catrt compare: error: --out {str(shared)!r} cannot be written (Permission denied); pick a writable folder"
    (shared / "report.md").unlink()
    for name in ("metrics.csv", "grid.png", "report.md"):  # the three files it replaces: the writable ones' folder named
        (shared / name).write_text("an earlier run's\n")
    line = _fails(capfd, "compare", "--prompts", str(prompts), "--out", str(shared))
    assert line.startswith(f"catrt compare: error: --out {str(shared)!r}: its metrics.csv cannot be replaced: its folder "
                           f"{shared} is not writable (Permission denied), though the file is")
    assert line.endswith(f"make {shared} writable or give another --out")
    monkeypatch.setattr(os, "open", opener)  # new files may be made again, as root: only images/ refuses them
    (shared / "images").mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path).name != "images" and access(path, mode, **kw))
    line = _fails(capfd, "compare", "--prompts", str(prompts), "--out", str(shared))
    assert line == (f"catrt compare: error: --out {str(shared)!r}: its folder images/ is not writable, where the run "
                    "moves its images; make it writable or give another --out")
    assert sorted(p.name for p in shared.iterdir()) == ["grid.png", "images", "metrics.csv", "report.md"]


@pytest.mark.usefixtures("no_model_loads")
def test_an_api_key_no_client_can_send_is_refused_at_start(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "key").write_text("first-half\nsecond-half\n")
    line = _fails(capfd, "serve", "--model", "reference", "--api-key-file", str(tmp_path / "key"))
    assert f"the API key file {tmp_path / 'key'} holds '\\n' at character 10 of the key" in line
    monkeypatch.setenv("CATRT_API_KEY", "clé")
    assert "$CATRT_API_KEY holds '\\xe9' at character 2" in _fails(capfd, "serve", "--model", "reference")
    monkeypatch.setenv("CATRT_API_KEY", " ")  # an unfilled deployment secret must not open the server
    assert "$CATRT_API_KEY is set but empty; set it to the key clients send" in _fails(capfd, "serve", "--model", "reference")


@pytest.mark.usefixtures("no_model_loads")
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capfd: pytest.CaptureFixture[str]) -> None:
    line = _fails(capfd, "generate", "--prompt", "x", "--device", "cuda", "--out", "image.png")
    assert "--device cuda: this machine has no usable CUDA GPU" in line and "use --device cpu" in line


def test_usage_errors_are_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    for argv in (["generate"], ["macs", "--model", "nope"], ["generate", "--prompt", "x", "--height", "0"], []):
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capfd.readouterr().err
        assert done.value.code == 2 and len(err.strip().splitlines()) == 1 and "--help" in err, err


@pytest.mark.parametrize("command", [("generate", "--prompt", "x"), ("build",), ("serve", "--model", "reference"),
                                     ("compare", "--prompts", "p.txt", "--out", "o"), ("macs", "--model", "sd3")])
def test_a_step_count_that_would_run_for_days_is_a_usage_error(capfd: pytest.CaptureFixture[str], command: tuple[str, ...]) -> None:
    """Every command that runs steps takes 1 to 1000 (a mistyped 1000000000 allocated its schedule, then ran on)."""
    for steps, message in (("1000000000", "expected at most 1000 steps, got 1000000000"), ("0", "expected a positive integer, got 0")):
        with pytest.raises(SystemExit) as done:
            main([*command, "--steps", steps])
        lines = capfd.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and len(lines) == 1 and f"argument --steps: {message}" in lines[0], lines


def test_any_catrt_error_is_one_line_and_ctrl_c_is_130(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(args: Any) -> int:
        raise CatrtError("first line\nsecond line", field="model")

    def interrupted(args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(catrt.cli.macs, "cmd_macs", refuse)
    assert _fails(capfd, "macs", "--model", "sd3") == "catrt macs: error: first line second line"
    monkeypatch.setattr(catrt.cli.macs, "cmd_macs", interrupted)
    assert main(["macs", "--model", "sd3"]) == 130
    err = capfd.readouterr().err
    assert err.strip() == "catrt macs: interrupted"


# --- mistakes only a loaded model can tell ---------------------------------------------------------------


def test_tiny_model_size_not_a_multiple_of_16(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _fails(capfd, "generate", "--model", "tiny-sd3", "--prompt", "x", "--height", "72", "--width", "64",
                  "--steps", "4", "--t0", "2", "--out", str(tmp_path / "a.png"))
    assert "height 72 does not fit model tiny-sd3, which takes multiples of 16" in line and "try height 64" in line
    assert not (tmp_path / "a.png").exists()


def test_a_guidance_that_overflows_the_image_is_refused_and_writes_nothing(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """diffusers saves a NaN image as flat black; catrt refuses it, naming the guidance as the cause."""
    out = tmp_path / "a.png"
    assert main(["generate", "--model", "tiny-sd3", "--prompt", "x", "--height", "32", "--width", "32",
                 "--steps", "4", "--t0", "2", "--guidance-scale", "1e308", "--out", str(out)]) == 2
    err = capfd.readouterr().err
    line = err.strip().splitlines()[-1]  # after the generation's progress bar
    assert "Traceback" not in err and line.startswith("catrt generate: error: ")
    assert "--guidance-scale 1e+308 made the generation overflow (the image came out NaN or inf)" in line
    assert "use a smaller --guidance-scale; this model's default is 7" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_overflow_at_or_below_the_default_guidance_is_a_generation_error() -> None:
    nan = np.zeros((2, 4, 6, 3), dtype=np.float32)
    nan[1, 0, 0, 0] = np.nan
    with pytest.raises(GenerationError, match=r"overflowed \(the image came out NaN or inf\): run at fp32 or bf16"):
        finite_images(nan, 7.0, 7.0)
    with pytest.raises(ConfigError, match="guidance_scale 9 made the generation overflow") as refused:
        finite_images(np.where(np.isnan(nan), np.inf, nan), 9.0, 7.0)
    assert refused.value.field == "guidance_scale"
    assert [image.size for image in finite_images(np.zeros_like(nan), 1e308, 7.0)] == [(6, 4), (6, 4)]


def test_published_model_offline_says_gated_or_local_folder(capfd: pytest.CaptureFixture[str]) -> None:
    line = _fails(capfd, "generate", "--model", "sd3", "--prompt", "x", "--steps", "28")
    assert "model sd3 (stabilityai/stable-diffusion-3-medium-diffusers)" in line
    for hint in ("gated", "hf auth login", "huggingface-cli login", "a local diffusers folder saved with save_pretrained"):
        assert hint in line


def test_the_hub_login_command_named_first_is_the_installed_clients() -> None:
    """huggingface_hub 1.0 removed `huggingface-cli` (the tested install, 2.x, has only `hf`): the refusal of a gated
    model sent its user to a command that is not there. The command it names first is one this install provides."""
    from importlib.metadata import distribution

    from catrt.hub_errors import LOGIN_COMMAND

    first = LOGIN_COMMAND.split("`")[1].split()[0]
    scripts = {entry.name for entry in distribution("huggingface_hub").entry_points if entry.group == "console_scripts"}
    assert first in scripts, (first, scripts)


def test_a_published_model_that_is_not_gated_offline_says_so(capfd: pytest.CaptureFixture[str]) -> None:
    """PixArt-Sigma downloads without a license to accept: the line must not send its user to accept one."""
    line = _fails(capfd, "generate", "--model", "pixart-sigma", "--prompt", "x")
    assert "model pixart-sigma (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS) could not be loaded" in line
    assert "It needs hub access (it is not gated): retry online, or pass --model a local diffusers folder" in line
    assert "gated and" not in line and "huggingface-cli login" not in line


def test_flux_schnell_by_name_runs_its_four_steps_with_the_cards_t0(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`catrt generate --model flux-schnell` ran its card's 4 steps with CATConfig's t0 = 8: refused, flags or not."""
    import catrt.loading
    from catrt.tiny import build_tiny_pipeline

    loaded = []

    def tiny_schnell(name: str, **kwargs: Any) -> Any:  # the published layout, offline
        loaded.append(name)
        return build_tiny_pipeline("tiny-flux-schnell")

    monkeypatch.setattr(catrt.loading, "load_pipeline", tiny_schnell)
    out = tmp_path / "schnell.png"
    assert main(["generate", "--model", "flux-schnell", "--prompt", "x", "--height", "32", "--width", "32",
                 "--out", str(out)]) == 0, capfd.readouterr().err
    assert loaded == ["flux-schnell"] and out.is_file()
    assert "alpha=0.3 t0=2, fp32" in capfd.readouterr().out
    assert "CATConfig.t0 = 4 needs t0 < num_inference_steps, got 4 steps" in _fails(
        capfd, "generate", "--model", "flux-schnell", "--prompt", "x", "--t0", "4")  # a given t0 is the user's


def test_long_prompt_refused_by_the_eager_model(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    prompt = " ".join(["red"] * 20)  # the reference model reads <cls> + 15 words
    line = _fails(capfd, "generate", "--prompt", prompt, "--steps", "4", "--t0", "2", "--out", str(tmp_path / "a.png"))
    assert "prompt is 21 tokens but this model reads at most 16; shorten it" in line


@pytest.fixture(scope="module")
def eager_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny eager build (no export, fast) with an 8-token text length and a non-square size."""
    root = tmp_path_factory.mktemp("bundle")
    argv = ["build", "--model", "tiny-sd3", "--backend", "eager", "--steps", "4", "--t0", "2", "--height", "32",
            "--width", "48", "--max-sequence-length", "8", "--out", str(root / "engines"), "--export-dir", str(root / "export")]
    assert main(argv) == 0
    (folder,) = (root / "engines").iterdir()
    return folder


def test_engine_refuses_long_prompts_and_other_sizes(
    capfd: pytest.CaptureFixture[str], eager_bundle: Path, tmp_path: Path
) -> None:
    out = str(tmp_path / "a.png")
    long_prompt = "a cat and a dog in the garden at night"
    line = _fails(capfd, "generate", "--engines", str(eager_bundle), "--prompt", long_prompt, "--out", out)
    assert "but this model reads at most 8 (max_sequence_length); shorten it" in line
    line = _fails(capfd, "generate", "--engines", str(eager_bundle), "--prompt", "a cat", "--height", "64", "--out", out)
    assert "--height 64: this engine was built for --height 32" in line
    assert main(["generate", "--engines", str(eager_bundle), "--prompt", "a cat", "--out", out]) == 0
    with Image.open(out) as image:
        assert image.size == (48, 32)


def test_a_bundles_out_of_range_alpha_is_not_blamed_on_the_alpha_flag_given(
    capfd: pytest.CaptureFixture[str], eager_bundle: Path, tmp_path: Path
) -> None:
    """`--alpha 0.3` beside a bundle whose manifest was edited to alpha 2.0: the line names the manifest, not the
    flag (a config range error prefixes the flag given, but this one is the bundle's, a CorruptBundleError)."""
    import json
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(eager_bundle, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["build"]["alphas"] = [2.0]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    line = _fails(capfd, "generate", "--engines", str(edited), "--prompt", "a cat", "--alpha", "0.3",
                  "--out", str(tmp_path / "a.png"))
    assert line.startswith("catrt generate: error: manifest.json build.alphas: BuildConfig.alphas: CATConfig.alpha must be in")
    assert "argument --alpha" not in line


def test_build_refuses_an_out_that_is_a_file_or_a_bundle_before_loading(
    capfd: pytest.CaptureFixture[str], eager_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import catrt.build

    monkeypatch.setattr(catrt.build, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded a model"))
    (tmp_path / "file").write_text("x")
    build = ("build", "--model", "tiny-sd3", "--backend", "onnxruntime", "--steps", "4", "--t0", "2")
    line = _fails(capfd, *build, "--out", str(tmp_path / "file"))
    assert f"out_dir {tmp_path / 'file'} cannot be a folder (it is a file)" in line
    line = _fails(capfd, *build, "--export-dir", str(tmp_path / "file" / "sub"), "--out", str(tmp_path / "engines"))
    assert f"export_dir {tmp_path / 'file' / 'sub'} cannot be a folder (Not a directory)" in line
    before = sorted(path.name for path in eager_bundle.iterdir())
    line = _fails(capfd, *build, "--out", str(eager_bundle))
    assert f"out_dir {eager_bundle} is an engine bundle; builds go beside it" in line
    line = _fails(capfd, *build, "--out", str(tmp_path / "engines"), "--export-dir", str(eager_bundle / "sub" / "export"))
    assert line.endswith(f"export_dir {eager_bundle / 'sub' / 'export'} is inside the engine bundle {eager_bundle}; a folder made "
                         "there would make that bundle unloadable: give a folder outside it (--out / --export-dir)")
    assert sorted(path.name for path in eager_bundle.iterdir()) == before
    assert main(["inspect", str(eager_bundle)]) == 0


@pytest.mark.usefixtures("no_model_loads")
def test_build_refuses_a_build_name_no_folder_can_have_before_loading(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A model folder of a long name makes a build name over the filesystem's 255 bytes (or within 14 of it, the
    staging folder's `.<name>.tmp-XXXXXXXX` being longer): the build failed after loading the model with an OSError
    traceback ('File name too long')."""
    for length in (230, 205):  # a build name of 270 bytes; of 245, whose staging folder's name is 259
        model = tmp_path / ("m" * length)
        model.mkdir()
        (model / "model_index.json").write_text("{}")
        line = _fails(capfd, "build", "--model", str(model), "--backend", "onnxruntime", "--steps", "6", "--t0", "3",
                      "--height", "32", "--width", "48", "--out", str(tmp_path / "engines"), "--export-dir", str(tmp_path / "export"))
        assert "bytes, but its folder (staged as .<name>.tmp-XXXXXXXX) takes at most 241 here: build from a model folder of a shorter name" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m" * 205, "m" * 230]


def test_a_build_name_no_folder_can_have_is_refused_before_the_export(
    tiny_pipelines: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the size comes from the loaded model (no --height / --width), the name is checked once it is known."""
    import catrt.build
    from catrt.build_config import BuildConfig
    from catrt.errors import ConfigError

    model = tmp_path / ("m" * 215)  # a build name of 256 bytes at the model's default size
    tiny_pipelines["tiny-sd3"].save_pretrained(model)
    monkeypatch.setattr(catrt.build, "export_graphs", lambda *args, **kwargs: pytest.fail("exported"))
    config = BuildConfig(str(model), steps=6, t0=3, max_sequence_length=8, backend="onnxruntime")
    with pytest.raises(ConfigError, match=r"is 25\d bytes, but its folder .* takes at most 241 here") as refused:
        catrt.build.build_engines(config, out_dir=tmp_path / "engines", export_dir=tmp_path / "export", progress=False)
    assert refused.value.field == "model" and sorted(path.name for path in tmp_path.iterdir()) == [model.name]


@pytest.mark.usefixtures("no_model_loads")
def test_build_refuses_one_folder_for_the_export_and_the_bundles(capfd: pytest.CaptureFixture[str], eager_bundle: Path) -> None:
    """The export is published under the bundle's name: in the same folder it would replace an earlier bundle before
    the new one is verified (a failed build would leave none)."""
    line = _fails(capfd, "build", "--model", "tiny-sd3", "--backend", "onnxruntime", "--steps", "4", "--t0", "2",
                  "--out", str(eager_bundle.parent), "--export-dir", f"{eager_bundle.parent}/")
    assert line.endswith(f"export_dir and out_dir are both {eager_bundle.parent}: the ONNX export would take the bundle's "
                         "place while it builds; give them different folders (--out / --export-dir)")



@pytest.mark.usefixtures("no_model_loads")
def test_build_refuses_an_export_dir_inside_the_bundles_folder_and_an_out_inside_the_exports(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`--out engines --export-dir engines/<name>`: the export was published in the bundle's folder, then the bundle's
    swap replaced that folder and removed the export the user asked to keep (`--out` inside `<export-dir>/<name>`:
    the export's swap removed the staged bundle). Refused before loading, links resolved; nothing is left behind."""
    from catrt.build_config import BuildConfig

    name = BuildConfig("tiny-sd3", height=32, width=48, steps=4, t0=2, backend="onnxruntime").build_name()
    build = ("build", "--model", "tiny-sd3", "--backend", "onnxruntime", "--steps", "4", "--t0", "2", "--height", "32",
             "--width", "48")
    engines, export = tmp_path / "engines", tmp_path / "export"
    fix = "give --out and --export-dir folders outside each other's <name> folder"
    line = _fails(capfd, *build, "--out", str(engines), "--export-dir", str(engines / name))
    assert line.endswith(f"export_dir {engines / name} is {engines / name}, where this build's bundle is published "
                         f"(--out): publishing there would remove the ONNX export; {fix}")
    line = _fails(capfd, *build, "--out", str(engines), "--export-dir", str(engines / name / "onnx"))
    assert line.endswith(f"export_dir {engines / name / 'onnx'} is inside {engines / name}, where this build's bundle "
                         f"is published (--out): publishing there would remove the ONNX export; {fix}")
    line = _fails(capfd, *build, "--out", str(export / name / "engines"), "--export-dir", str(export))
    assert line.endswith(f"out_dir {export / name / 'engines'} is inside {export / name}, where its ONNX export is "
                         f"published (--export-dir): publishing there would remove the bundle it builds; {fix}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    line = _fails(capfd, *build, "--out", str(tmp_path / "mine"), "--export-dir", str(tmp_path / "link" / name))
    assert f"export_dir {tmp_path / 'link' / name} is {tmp_path / 'mine' / name}, where" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link", "mine"] and not any((tmp_path / "mine").iterdir())


def test_an_export_dir_inside_the_bundles_folder_is_refused_once_the_name_is_known(
    tiny_pipelines: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --height / --width the build name needs the loaded model's default size: refused then, before the export."""
    import catrt.build
    from catrt.build_config import BuildConfig
    from catrt.errors import ConfigError
    from catrt.pipeline import default_image_size

    size = default_image_size(tiny_pipelines["tiny-sd3"])
    config = BuildConfig("tiny-sd3", steps=6, t0=3, max_sequence_length=8, backend="onnxruntime")
    name = config.resolved(height=size, width=size).build_name()
    monkeypatch.setattr(catrt.build, "export_graphs", lambda *args, **kwargs: pytest.fail("exported"))
    with pytest.raises(ConfigError, match=r"where this build's bundle is published \(--out\)") as refused:
        catrt.build.build_engines(config, out_dir=tmp_path / "engines", export_dir=tmp_path / "engines" / name / "onnx",
                                  progress=False)
    assert refused.value.field == "export_dir" and not any(tmp_path.iterdir())


def test_a_build_whose_out_is_removed_while_it_builds_is_one_line(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rm -rf engines` in another terminal while the engines verify (minutes on a real model): the manifest's write
    and the publish failed with a FileNotFoundError traceback. Removed from inside the verify step: no timing."""
    import catrt.build

    engines = tmp_path / "engines"
    verify = catrt.build._verify

    def verified_then_removed(*args: Any, **kwargs: Any) -> dict[str, Any]:
        result = verify(*args, **kwargs)
        shutil.rmtree(engines)
        return result

    monkeypatch.setattr(catrt.build, "_verify", verified_then_removed)
    assert main(["build", "--model", "tiny-sd3", "--backend", "eager", "--steps", "4", "--t0", "2", "--height", "32",
                 "--width", "48", "--out", str(engines)]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"catrt build: error: {engines} was removed while ")
    assert err.strip().endswith("was built in it; nothing was published there: build again (it makes the folder again), "
                                "or into a folder nothing removes") and list(tmp_path.iterdir()) == []

def test_build_refuses_an_export_dir_holding_a_bundle_of_that_name(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The export is published under the build's name: a bundle there (an earlier --out) would be replaced by it."""
    from catrt.build_config import BuildConfig

    name = BuildConfig("tiny-sd3", height=32, width=48, steps=4, t0=2, backend="onnxruntime").build_name()
    bundle = tmp_path / "earlier" / name
    bundle.mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    assert main(["build", "--model", "tiny-sd3", "--backend", "onnxruntime", "--steps", "4", "--t0", "2", "--height", "32",
                 "--width", "48", "--out", str(tmp_path / "engines"), "--export-dir", str(tmp_path / "earlier")]) == 2
    err = capfd.readouterr().err  # after the progress bar's first stages (the name needs the loaded model's defaults)
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.endswith(f"export_dir {tmp_path / 'earlier'} holds the engine bundle {name}: the ONNX export would take its place; "
                         "give another --export-dir (the default is export)")
    assert [path.name for path in bundle.iterdir()] == ["manifest.json"] and not (tmp_path / "engines").exists()  # made, then removed


def test_generate_refuses_a_bundle_of_several_images_per_call_before_loading(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import catrt.bundle

    assert main(["build", "--model", "tiny-sd3", "--backend", "eager", "--steps", "4", "--t0", "2", "--height", "32", "--width",
                 "48", "--batch", "2", "--out", str(tmp_path)]) == 0
    (folder,) = tmp_path.iterdir()
    capfd.readouterr()
    monkeypatch.setattr(catrt.bundle, "load", lambda *args, **kwargs: pytest.fail("loaded the bundle"))
    line = _fails(capfd, "generate", "--engines", str(folder), "--prompt", "x", "--out", str(tmp_path / "image.png"))
    assert line.endswith(f"{folder} was built for batch 2 (images per call) and catrt generate makes one image: build an "
                         "engine with --batch 1, or serve this one (catrt serve --engines fills its batches)")


def test_build_alphas_given_by_a_repeated_flag_are_all_built(tmp_path: Path) -> None:
    argv = ["build", "--model", "tiny-sd3", "--backend", "eager", "--steps", "4", "--t0", "2", "--height", "32", "--width", "48",
            "--max-sequence-length", "8", "--alpha", "0.3", "--alpha", "0.5", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    (folder,) = tmp_path.iterdir()
    assert folder.name == "tiny-sd3-48x32-b1-s4-t2-a0.30_0.50_1.00-l8-fp32-eager"
    assert catrt.load(folder).alphas == (0.3, 0.5, 1.0)


def test_serve_alphas_given_by_a_repeated_flag_are_all_served(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --alpha 0.3 --alpha 1` serves both, as build's repeated flag builds both (the last one alone was kept)."""
    import catrt.serve

    served: list[Any] = []
    monkeypatch.setattr(catrt.serve, "run_server", lambda config: served.append(config) or 0)
    assert main(["serve", "--model", "tiny-sd3", "--height", "32", "--width", "64", "--alpha", "0.3", "--alpha", "0.5", "1"]) == 0
    (config,) = served
    assert config.alphas == (0.3, 0.5, 1.0) and config.cat.alpha == 0.3  # the first is the default


@pytest.mark.parametrize(("flags", "steps", "t0"), [
    (("--model", "flux-schnell"), 4, 2),
    (("--model", "pixart-sigma"), 20, 8),
    (("--model", "sd3"), 28, 8),
    (("--model", "flux-schnell", "--steps", "8", "--t0", "3"), 8, 3),
    (("--model", "tiny-sd3"), 28, 8),  # no card: BuildConfig's defaults
])
def test_build_makes_a_models_own_schedule_where_no_flag_sets_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flags: tuple[str, ...], steps: int, t0: int,
) -> None:
    """`build --model flux-schnell` built a 28-step engine with t0 8 (7x its 4 steps), and pixart-sigma 28 (its 20),
    where generate and serve run the card's schedule."""
    import catrt.build

    built: list[Any] = []
    monkeypatch.setattr(catrt.build, "build_engines", lambda config, **kwargs: built.append(config) or tmp_path)
    assert main(["build", *flags, "--backend", "eager", "--out", str(tmp_path / "e"), "--export-dir", str(tmp_path / "x")]) == 0
    (config,) = built
    assert (config.steps, config.t0) == (steps, t0)


@pytest.mark.parametrize(("flags", "steps", "t0"), [
    (("--model", "flux-schnell"), 4, 2),  # the card's schedule, as `catrt generate` runs it
    (("--model", "pixart-sigma"), 20, 8),
    (("--model", "sd3"), 28, 8),
    (("--model", "flux-schnell", "--steps", "8"), 8, 2),
    (("--model", "flux-schnell", "--t0", "3"), 4, 3),
    (("--model", "tiny-sd3"), 28, 8),  # no card: ServeConfig's defaults
])
def test_serve_runs_a_models_own_schedule_where_no_flag_sets_it(
    monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...], steps: int, t0: int,
) -> None:
    """`serve --model flux-schnell` ran 28 steps (7x its 4) and pixart-sigma 28 (its 20), where generate runs the card's."""
    import catrt.serve

    served: list[Any] = []
    monkeypatch.setattr(catrt.serve, "run_server", lambda config: served.append(config) or 0)
    assert main(["serve", *flags]) == 0
    (config,) = served
    assert (config.steps, config.cat.t0) == (steps, t0)


@pytest.mark.parametrize(("flags", "message"), [
    (("--height", "33"), "height 33 does not fit model tiny-sd3, which takes multiples of 16 up to 1536 pixels; try height 32"),
    (("--max-sequence-length", "100000"),
     "StableDiffusion3Pipeline refused this build's settings: `max_sequence_length` cannot be greater than 512 but is 100000"),
    # PixArt does not check the length itself: its T5 encoder would be run on 100000 padded tokens (80 GB).
    (("--model", "tiny-pixart", "--max-sequence-length", "100000"),
     "PixArtSigmaPipeline refused this build's settings: `max_sequence_length` cannot be greater than 512 but is 100000"),
    (("--model", "reference", "--max-sequence-length", "16"),
     "ReferencePipeline takes no text length: its tokenizer reads 16 tokens; drop max_sequence_length (--max-sequence-length)"),
], ids=["size", "text-length", "text-length-pixart", "text-length-no-argument"])
def test_build_settings_the_loaded_model_refuses_are_one_line(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    """tiny models have no card, so these are known once loaded: still one line and exit 2, no traceback, no bundle."""
    argv = ["build", "--model", "tiny-sd3", "--backend", "eager", "--steps", "4", "--t0", "2", "--height", "32", "--width", "32",
            *flags, "--out", str(tmp_path / "engines")]
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"catrt build: error: {message}" + (
        "; change the build flags" if "refused" in message else "")
    assert list(tmp_path.iterdir()) == []  # no bundle, and not the empty --out folder the build made


def test_a_refused_build_removes_only_the_folders_it_made(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--out and --export-dir (and their missing parents) are made before the model loads; a build refused after
    that removes them again, while a folder the user had, empty or not, stays as it was."""
    mine = tmp_path / "mine"
    (mine / "empty").mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's")
    argv = ["build", "--model", "tiny-sd3", "--backend", "onnxruntime", "--steps", "4", "--t0", "2", "--height", "32",
            "--width", "32", "--max-sequence-length", "100000"]
    assert main([*argv, "--out", str(tmp_path / "new" / "deeper" / "engines"), "--export-dir", str(mine / "export")]) == 2
    assert main([*argv, "--out", str(mine / "empty"), "--export-dir", str(mine)]) == 2
    assert "StableDiffusion3Pipeline refused this build's settings" in capfd.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine"]
    assert sorted(path.name for path in mine.iterdir()) == ["empty", "notes.txt"] and list((mine / "empty").iterdir()) == []
    assert (mine / "notes.txt").read_text() == "the user's"


def test_inspect_prints_width_x_height(capfd: pytest.CaptureFixture[str], eager_bundle: Path) -> None:
    assert main(["inspect", str(eager_bundle)]) == 0
    assert "build:     48x32, batch 1" in capfd.readouterr().out


# --- what works --------------------------------------------------------------------------------------------


def test_macs_defaults_to_the_models_own_size(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["macs", "--model", "reference", "--steps", "28", "--t0", "8"]) == 0
    out = capfd.readouterr().out.strip().splitlines()
    assert out[0].startswith("model reference at 32x32: N = 256 image tokens")
    assert out[-1].startswith("schedule MAC ratio: ")


def test_macs_prints_the_schedule_ratio_last(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["macs", "--model", "sd3", "--alpha", "0.3", "--steps", "28", "--t0", "8"]) == 0
    out = capfd.readouterr().out.strip().splitlines()
    assert out[0].startswith("model sd3 at 1024x1024: N = 4096 image tokens")
    assert out[-1] == "schedule MAC ratio: 0.537"


def test_full_with_cat_flags_runs_the_unpruned_model_and_says_they_change_nothing(
    capfd: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    """Issue 2's command with `--full` added is the unpruned run of it: the CAT flags given are named in a note on
    stderr (they change nothing), not a refusal; the image is the one `--full` alone makes."""
    plain, noted = tmp_path / "plain.png", tmp_path / "noted.png"
    common = ["generate", "--model", "tiny-sd3", "--prompt", "a red circle", "--steps", "4", "--seed", "0",
              "--height", "32", "--width", "32", "--full"]
    assert main([*common, "--out", str(plain)]) == 0
    assert "note:" not in capfd.readouterr().err
    assert main([*common, "--alpha", "0.3", "--t0", "2", "--out", str(noted)]) == 0
    captured = capfd.readouterr()
    assert "unpruned, fp32" in captured.out
    assert "catrt generate: note: --full runs the unpruned model; --alpha, --t0 change nothing in it" in captured.err
    with Image.open(plain) as a, Image.open(noted) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_full_and_bf16_on_the_cpu(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "full.webp"
    assert main(["generate", "--prompt", "a red circle", "--steps", "4", "--full", "--out", str(out)]) == 0
    assert "unpruned, fp32" in capfd.readouterr().out
    with Image.open(out) as image:
        assert image.format == "WEBP" and image.size == (32, 32)
    out = tmp_path / "bf16.png"
    assert main(["generate", "--model", "tiny-sd3", "--prompt", "a red circle", "--steps", "4", "--t0", "2",
                 "--height", "32", "--width", "32", "--precision", "bf16", "--out", str(out)]) == 0
    assert "alpha=0.3 t0=2, bf16" in capfd.readouterr().out and out.is_file()


# --- library helpers the CLI and the server share ----------------------------------------------------------


def test_default_precision_per_model_and_device() -> None:
    cuda = {name: default_precision(name, "cuda") for name in (*MODEL_CARDS, "tiny-sd3", "some/folder")}
    assert cuda == {"sd3": "fp16", "sd3.5-medium": "bf16", "sd3.5-large": "bf16", "pixart-sigma": "fp16",
                    "flux-dev": "bf16", "flux-schnell": "bf16", "reference": "fp32", "tiny-sd3": "fp32",
                    "some/folder": "fp32"}
    assert {default_precision(name, "cpu") for name in MODEL_CARDS} == {"fp32"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_a_local_folder_runs_on_cuda_in_the_dtype_its_transformer_was_saved_in(tmp_path: Path, dtype: str) -> None:
    """A folder saved from an fp16 SD3 ran fp32 on CUDA by default (twice the memory, and slower): its safetensors
    headers say the dtype, read without loading a weight; the CPU stays fp32, and a folder without them too."""
    import torch

    from catrt.tiny import build_tiny_pipeline

    build_tiny_pipeline("tiny-sd3", dtype=getattr(torch, dtype)).transformer.save_pretrained(tmp_path / "transformer")
    expected = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
    assert default_precision(str(tmp_path), "cuda") == expected
    assert default_precision(str(tmp_path), "cpu") == "fp32"
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 16)  # not a header
    assert default_precision(str(tmp_path), "cuda") == "fp32"


def _safetensors_header(path: Path, header: object) -> None:
    """A safetensors file that holds only its header (saved_precision reads no weight)."""
    import json

    data = json.dumps(header).encode()
    path.write_bytes(len(data).to_bytes(8, "little") + data)


def test_a_local_folders_saved_dtype_survives_odd_headers_and_counts_the_weights_diffusers_loads(tmp_path: Path) -> None:
    """An odd header (a dtype that is a list, a negative dimension, JSON nested past the parser's depth) crashed
    the command or outweighed the real tensors; variant files (`.fp16.safetensors`) beside the plain shards were
    counted as if diffusers loaded both (a tie went to the variant)."""
    folder = tmp_path / "transformer"
    folder.mkdir()
    for index in (1, 2):  # the plain weights diffusers loads: fp32, in two shards
        _safetensors_header(folder / f"diffusion_pytorch_model-0000{index}-of-00002.safetensors",
                            {"w": {"dtype": "F32", "shape": [10, 10], "data_offsets": [0, 0]}})
    _safetensors_header(folder / "diffusion_pytorch_model.fp16.safetensors",
                        {"w": {"dtype": "F16", "shape": [1000], "data_offsets": [0, 0]}})
    _safetensors_header(folder / "odd.safetensors", {"w": {"dtype": ["F16"], "shape": [2]}})
    assert default_precision(str(tmp_path), "cuda") == "fp32"
    for name in folder.glob("diffusion_pytorch_model*"):
        name.unlink()
    _safetensors_header(folder / "a.safetensors", {"w": {"dtype": "F16", "shape": [4]},
                                                   "x": {"dtype": "BF16", "shape": [-1000]}})
    deep = b"[" * 200_000
    (folder / "b.safetensors").write_bytes(len(deep).to_bytes(8, "little") + deep)
    assert default_precision(str(tmp_path), "cuda") == "fp16"


def test_a_tiny_models_name_runs_fp32_on_cuda_beside_a_folder_of_that_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name wins over a folder of the same name (the built-in tiny model loads), so a ./tiny-sd3 folder saved in
    fp16 must not set the built-in model's dtype, which it did."""
    (tmp_path / "tiny-sd3" / "transformer").mkdir(parents=True)
    _safetensors_header(tmp_path / "tiny-sd3" / "transformer" / "diffusion_pytorch_model.safetensors",
                        {"w": {"dtype": "F16", "shape": [4]}})
    monkeypatch.chdir(tmp_path)
    assert default_precision("./tiny-sd3", "cuda") == "fp16"  # the folder, named as a path
    assert default_precision("tiny-sd3", "cuda") == "fp32"  # the built-in model


def test_prompt_length_counts_the_long_text_tokenizer(tiny_pipelines: dict[str, Any]) -> None:
    sd3, pixart = tiny_pipelines["tiny-sd3"], tiny_pipelines["tiny-pixart"]
    assert text_limit(sd3, pipeline_spec(sd3)).tokens == 256 and text_limit(pixart, pipeline_spec(pixart)).tokens == 300
    assert text_limit(sd3, pipeline_spec(sd3)).tokenizer == "tokenizer_3"  # T5 limits SD3's prompt, not CLIP
    tokens = len(pixart.tokenizer("a cat").input_ids)
    check_prompt_length(sd3, "a cat", 8)
    check_prompt_length(pixart, "a cat", tokens)
    with pytest.raises(ConfigError, match=f"negative_prompt is {tokens} tokens but this model reads at most {tokens - 1}") as refused:
        check_prompt_length(pixart, "a cat", tokens - 1, field="negative_prompt")
    assert refused.value.field == "negative_prompt"


def test_a_build_defaults_to_the_models_usual_dtype_where_it_runs_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    assert cli.build_precision("sd3", "auto") == cli.build_precision("sd3", "compile") == "fp32"  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.build_precision("sd3", "compile") == cli.build_precision("pixart-sigma", "eager") == "fp16"
    assert cli.build_precision("sd3.5-large", "compile") == "bf16"
    assert cli.build_precision("tiny-sd3", "compile") == cli.build_precision("reference", "compile") == "fp32"
    providers = onnxruntime.get_available_providers()
    assert cli.build_precision("sd3", "onnxruntime") == "fp32"  # no CUDA provider: its build runs on the CPU
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *providers])
    assert cli.build_precision("sd3", "onnxruntime") == "fp16"
    assert cli.build_precision("sd3.5-large", "onnxruntime") == "fp32"  # onnxruntime cannot build bf16


def test_cli_choices_match_the_build_config() -> None:
    """catrt.cli spells these out so that its parser needs no torch; they must not drift."""
    from catrt.build_config import BACKENDS, PRECISIONS, BuildConfig

    assert cli.PRECISION_CHOICES == tuple(PRECISIONS) and cli.BACKEND_CHOICES == BACKENDS
    build = BuildConfig("x")
    assert {name: getattr(build, name) for name in cli.BUILD_DEFAULTS} == cli.BUILD_DEFAULTS
    assert (build.alpha, build.t0) == (catrt.CATConfig().alpha, catrt.CATConfig().t0)


def test_the_cli_modules_import_one_way() -> None:
    """catrt/cli/: each subcommand module builds on the shared ones (parsing, cat_flags, model_flags, folder_flags,
    exits), never on another subcommand or on the package that puts them together, so no import cycle can form."""
    import ast

    shared = {"parsing", "cat_flags", "model_flags", "folder_flags", "exits"}
    package = Path(catrt.cli.__file__).parent
    imported = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("catrt.cli"):
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names if alias.name.startswith("catrt.cli"))
        imported[path.stem] = names
    assert {"generate", "macs", "build", "inspect", "serve", "compare"} | shared <= set(imported)
    for name, names in imported.items():
        if name not in ("__init__", "__main__"):
            assert names <= {f"catrt.cli.{each}" for each in shared}, (name, names)


def test_cat_flags_are_every_config_field_a_user_sets() -> None:
    """The CAT flags are generated from CATConfig's fields: adding a field adds the flag everywhere."""
    import dataclasses

    from catrt.cli import NOT_CAT_FLAGS, build_parser
    from catrt.config import CATConfig

    expected = {field.name for field in dataclasses.fields(CATConfig)} - set(NOT_CAT_FLAGS)
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("generate", "serve", "macs"):
        group = next(g for g in commands[name]._action_groups if g.title == "CAT Pruning")
        assert {action.dest for action in group._group_actions} == expected, name
        help_text = commands[name].format_help()
        assert "(default: 0.3)" in help_text and "{cat,random,round_robin" in help_text


def test_a_model_folder_diffusers_cannot_load_is_one_line_naming_the_folder_not_out(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline", "vae": ["diffusers", "AutoencoderKL"]}')
    out = tmp_path / "image.png"
    assert main(["generate", "--model", str(folder), "--prompt", "x", "--out", str(out)]) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # diffusers' loading bar may come before
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("catrt generate: error: "), err
    line = errors[0]
    assert f"could not load the model folder {str(folder)!r} as a diffusers pipeline (OSError: " in line  # was: --out cannot be written
    assert "--out" not in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["saved"]  # no image, no staged file left


# Per subcommand: arguments that parse, one required argument left out (None: the command has none), a bad choice.
USAGE_CASES = {
    "generate": (("--prompt", "x"), ("--out", "x.png"), ("--precision", "fp8")),
    "build": (("--steps", "4"), None, ("--backend", "fast")),
    "inspect": (("engines/x",), ("--bundle-key-file", "k"), None),
    "macs": (("--model", "sd3"), ("--steps", "4"), ("--model", "sd9")),
    "serve": (("--model", "reference"), ("--port", "8000"), ("--precision", "fp8")),
    "compare": (("--prompts", "p.txt", "--out", "o"), ("--prompts", "p.txt"), ("--rules", "best")),
}


def _usage_error(capfd: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """`catrt argv` must stop in argparse: exit 2, one stderr line, no traceback."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert done.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", sorted(USAGE_CASES))
def test_a_usage_error_points_to_its_subcommands_help(capfd: pytest.CaptureFixture[str], command: str) -> None:
    """An unknown flag or word was reported by the top parser (`see catrt --help`, which does not list the
    subcommand's flags); a missing required argument and a bad choice are the subcommand's too."""
    valid, missing, choice = USAGE_CASES[command]
    for extra, what in ((["--bogus"], "unrecognized arguments: --bogus"), (["--bogus", "stray"], "unrecognized arguments: --bogus stray")):
        line = _usage_error(capfd, [command, *valid, *extra])
        assert line == f"catrt {command}: error: {what} (see catrt {command} --help)"
    if missing is not None:
        line = _usage_error(capfd, [command, *missing])
        assert line.startswith(f"catrt {command}: error: the following arguments are required: ") or \
            line.startswith(f"catrt {command}: error: one of the arguments ")
        assert line.endswith(f"(see catrt {command} --help)")
    if choice is not None:
        line = _usage_error(capfd, [command, *valid, *choice])
        assert line.startswith(f"catrt {command}: error: argument {choice[0]}: invalid choice: {choice[1]!r}")
        assert line.endswith(f"(see catrt {command} --help)")


def test_a_top_level_usage_error_points_to_catrt_help(capfd: pytest.CaptureFixture[str]) -> None:
    assert _usage_error(capfd, ["bogus"]).startswith("catrt: error: argument COMMAND: invalid choice: 'bogus'")
    assert _usage_error(capfd, []).endswith("(see catrt --help)")


def test_a_seed_is_used_whole_and_a_float_or_one_past_the_range_is_refused(
    capfd: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    """The server's seed rules (`catrt.request_values`): an integer up to 2**63 - 1 is the generator's seed exactly
    (2**53 + 1 is no float's 2**53); a float, even a whole one, or an integer past the range is one line, exit 2."""
    def drawn(seed: int) -> bytes:
        out = tmp_path / f"{seed}.png"
        argv = ["generate", "--model", "reference", "--prompt", "a red circle", "--steps", "3", "--t0", "2"]
        assert main([*argv, "--seed", str(seed), "--out", str(out)]) == 0
        return out.read_bytes()

    assert drawn(2**53 + 1) != drawn(2**53)
    assert drawn(2**63 - 1) != drawn(0)
    capfd.readouterr()
    for written in ("9007199254740993.0", "1e20", "1.5"):
        assert f"argument --seed: invalid int value: '{written}'" in _usage_error(capfd, ["generate", "--prompt", "x", "--seed", written])
    assert f"--seed must be an integer in [0, {2**63 - 1}], got {2**63}" in _fails(capfd, "generate", "--prompt", "x", "--seed", str(2**63))
    assert "--seed must be an integer in [0, " in _fails(capfd, "generate", "--prompt", "x", "--seed", "-1")


def test_usage_errors_shorten_a_huge_value(capfd: pytest.CaptureFixture[str]) -> None:
    """argparse quoted a bad value whole: a 10,000-character one filled the terminal."""
    huge = "y" * 10_000
    shown = f"'{'y' * 39}…{'y' * 19}' (10000 characters)"
    for argv, message in (
        (["generate", "--prompt", "x", "--precision", huge], f"argument --precision: invalid choice: {shown} (choose from"),
        (["generate", "--prompt", "x", "--seed", huge], f"argument --seed: invalid int value: {shown}"),
        (["generate", "--prompt", "x", "--height", huge], f"argument --height: expected a positive integer, got {shown}"),
        ([huge], f"argument COMMAND: invalid choice: {shown}"),
        (["generate", "--prompt", "x", huge], f"unrecognized arguments: {'y' * 40}…{'y' * 20} (10000 characters)"),
    ):
        line = _usage_error(capfd, argv)
        assert message in line and len(line) < 300, line


@pytest.mark.parametrize(("argv", "shown"), [
    (["generate", "--prompt", "x", "--a\nb"], "unrecognized arguments: --a\\nb (see"),
    (["generate", "--pro\x1b[2Jmt", "x"], "unrecognized arguments: --pro\\x1b[2Jmt; the following arguments are required"),
])
def test_an_unrecognized_word_with_a_newline_or_escape_is_echoed_escaped_in_one_line(
    capfd: pytest.CaptureFixture[str], argv: list[str], shown: str
) -> None:
    """argparse echoes an unrecognized word as given: one holding a newline printed two lines, a terminal escape
    reached the terminal."""
    line = _usage_error(capfd, argv)
    assert shown in line and "\x1b" not in line, line


@pytest.mark.usefixtures("no_model_loads")
@pytest.mark.parametrize("taken", ["out", "export"])
def test_build_refuses_another_users_bundle_in_a_sticky_folder_before_loading(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken: str
) -> None:
    """`--out /tmp` holding another user's bundle of this name: only its owner may swap it away there, so the publish
    failed after the whole build (the staged folder was made: anyone may write /tmp). The tests run as root, so another
    user is simulated by os.geteuid; the folder is really sticky."""
    from catrt.build_config import BuildConfig

    name = BuildConfig(model="tiny-sd3", height=32, width=32, steps=4, t0=2, precision="fp32", backend="onnxruntime").build_name()
    folders = {"out": tmp_path / "engines", "export": tmp_path / "export"}
    for folder in folders.values():
        folder.mkdir()
        os.chmod(folder, 0o1777)
    (folders[taken] / name).mkdir()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    line = _fails(capfd, "build", "--model", "tiny-sd3", "--backend", "onnxruntime", "--height", "32", "--width", "32",
                  "--steps", "4", "--t0", "2", "--out", str(folders["out"]), "--export-dir", str(folders["export"]))
    flag, verb = ("--out", "build") if taken == "out" else ("--export-dir", "export")
    assert line.endswith(f"{folders[taken] / name} cannot be replaced: it belongs to another user (uid "
                         f"{os.stat(folders[taken] / name).st_uid}) and its folder {folders[taken]} is sticky (as /tmp "
                         f"is): only the file's owner may replace or remove it there; {verb} into another {flag}, or have "
                         "its owner remove it"), line
    assert sorted(path.name for path in tmp_path.rglob("*")) == sorted(["engines", "export", name])


@pytest.mark.parametrize("taken", ["out", "export"])
def test_build_refuses_a_file_where_its_folder_would_go_before_any_work(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken: str
) -> None:
    """A plain file at engines/<build-name> (or export/<build-name>) was swapped aside as if an earlier build."""
    import catrt.build
    from catrt.build_config import BuildConfig

    monkeypatch.setattr(catrt.build, "capture_step_sample", lambda *args, **kwargs: pytest.fail("started the build"))
    name = BuildConfig(model="tiny-sd3", height=32, width=32, steps=4, t0=2, precision="fp32", backend="onnxruntime").build_name()
    folders = {"out": tmp_path / "engines", "export": tmp_path / "export"}
    for folder in folders.values():
        folder.mkdir()
    (folders[taken] / name).write_text("the user's")
    assert main(["build", "--model", "tiny-sd3", "--backend", "onnxruntime", "--height", "32", "--width", "32", "--steps", "4",
                 "--t0", "2", "--out", str(folders["out"]), "--export-dir", str(folders["export"])]) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # the progress bar's model loading comes before
    assert "Traceback" not in err and len(errors) == 1, err
    line = errors[0]
    flag = "--out" if taken == "out" else "--export-dir"
    assert line.endswith(f"{folders[taken] / name} is a file, so nothing is published there (it is left as it is); "
                         f"move it away, or {'build' if taken == 'out' else 'export'} into another {flag}"), line
    assert sorted(path.name for path in tmp_path.rglob("*")) == sorted(["engines", "export", name])
    assert (folders[taken] / name).read_text() == "the user's"


@pytest.mark.usefixtures("no_model_loads")
@pytest.mark.parametrize("argv", [
    ("generate", "--prompt", "x", "--model", "{huge}"),
    ("generate", "--prompt", "x", "--device", "{huge}"),
    ("generate", "--prompt", "x", "--out", "{huge}"),
    ("generate", "--prompt", "x", "--out", "{huge}.png"),
    ("generate", "--prompt", "x", "--engines", "{huge}"),
    ("generate", "--prompt", "x", "--engines", "{tmp}", "--bundle-key-file", "{huge}"),
    ("build", "--model", "{huge}"),
    ("build", "--model", "tiny-sd3", "--out", "{huge}"),
    ("build", "--model", "tiny-sd3", "--sign-key-file", "{huge}"),
    ("compare", "--prompts", "{huge}", "--out", "{tmp}/out"),
    ("compare", "--prompts", "{tmp}/p.txt", "--out", "{huge}"),
    ("compare", "--prompts", "{tmp}/p.txt", "--out", "{tmp}/out", "--seeds", *[str(seed) for seed in range(2000)] * 2),
    ("serve", "--model", "{huge}"),
])
def test_a_huge_value_is_echoed_shortened_in_one_line(capfd: pytest.CaptureFixture[str], tmp_path: Path, argv: tuple[str, ...]) -> None:
    """A 10,000-character value was quoted whole, and a path that long crashed pathlib's checks (OSError: File name
    too long) before its own refusal."""
    (tmp_path / "p.txt").write_text("a cat\n")
    line = _fails(capfd, *(value.format(huge="y" * 10_000, tmp=tmp_path) for value in argv))
    assert "…" in line and len(line) < 600, line


def test_verbose_is_taken_after_the_command_too() -> None:
    """`catrt serve` says "run with -v for the traceback"; `catrt serve ... -v` was refused as an unrecognized
    argument, and only `catrt -v serve ...` worked."""
    required = {"generate": ["--prompt", "x"], "macs": ["--model", "sd3"], "build": [], "inspect": ["folder"], "serve": ["--model", "reference"],
                "compare": ["--prompts", "p.txt", "--out", "out"]}
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(required)
    for command, args in required.items():
        assert parser.parse_args([command, *args]).verbose is False
        assert parser.parse_args(["-v", command, *args]).verbose is True
        assert parser.parse_args([command, *args, "-v"]).verbose is True
        assert parser.parse_args([command, "--verbose", *args]).verbose is True


def test_list_flags_taken_repeated_add_up() -> None:
    """`catrt serve --alpha 0.3 --alpha 0.5` kept only 0.5 (argparse's last value wins), silently serving one alpha,
    where `catrt build --alpha 0.3 --alpha 0.5` builds both; so did serve's --engines and compare's lists."""
    parser = cli.build_parser()
    for command in (["build", "--model", "tiny-sd3"], ["serve", "--model", "reference"]):
        assert parser.parse_args([*command, "--alpha", "0.3", "--alpha", "0.5", "0.2"]).alpha == [0.3, 0.5, 0.2]
        assert parser.parse_args([*command, "--alpha", "0.3", "0.5"]).alpha == [0.3, 0.5]
        assert parser.parse_args(command).alpha is None
    # one build per size: `--engines A --engines B` served B only
    assert parser.parse_args(["serve", "--engines", "a", "--engines", "b", "c"]).engines == ["a", "b", "c"]
    # compare's lists: repeated they add up (the last use alone was kept), and a first use replaces the default
    compare = ["compare", "--prompts", "p.txt", "--out", "out"]
    assert parser.parse_args([*compare, "--seeds", "1", "--seeds", "2", "3"]).seeds == [1, 2, 3]
    assert parser.parse_args([*compare, "--rules", "cat", "--rules", "random"]).rules == ["cat", "random"]
    assert (parser.parse_args(compare).seeds, parser.parse_args(compare).rules) == ([0], ["cat", "round_robin", "random"])
    assert parser.parse_args(compare).seeds == [0]  # the default list is never extended in place


@pytest.mark.parametrize("module", ["catrt", "catrt.cli"])
def test_python_dash_m_runs_the_cli(module: str) -> None:
    """`python -m catrt` and `python -m catrt.cli` are the console script: a mistake is its one line, exit 2."""
    result = subprocess.run([sys.executable, "-m", module, "generate", "--promt", "x"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "catrt generate: error: unrecognized arguments: --promt; the following arguments are required: --prompt "
        "(see catrt generate --help)"]


@pytest.mark.usefixtures("no_model_loads")
def test_another_users_image_in_a_sticky_folder_is_refused_before_loading(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out /tmp/image.png` of another user's image: the staged file was made (anyone may write /tmp) and only the
    final rename failed (only the owner may replace a file in a sticky folder), after the generation. The tests run as
    root, who may replace it, so another user is simulated by os.geteuid (the folder is really sticky)."""
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o1777)
    out = folder / "image.png"
    out.write_bytes(b"another user's image")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    line = _fails(capfd, "generate", "--prompt", "x", "--out", str(out))
    assert line == (f"catrt generate: error: --out {str(out)!r} cannot be replaced: it belongs to another user (uid "
                    f"{os.stat(out).st_uid}) and its folder {folder} is sticky (as /tmp is): only the file's owner may "
                    "replace or remove it there; write it under another name, or have its owner remove it")
    assert out.read_bytes() == b"another user's image" and sorted(folder.iterdir()) == [out]
