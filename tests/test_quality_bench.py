"""bench/quality.py and bench/load.py: end to end on tiny settings, their --out defaults (never the
committed results), and a one-line refusal when the bench extra is missing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def committed_results() -> dict[str, str]:
    """sha256 of every file directly in bench/results/ (the committed results; tmp/ is git-ignored)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.iterdir()) if p.is_file()}


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quality_script_runs_end_to_end(tmp_path: Path) -> None:
    before = committed_results()
    command = [sys.executable, str(ROOT / "bench" / "quality.py"), "--tiny", "--alphas", "0.3", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "quality.md").read_text()
    assert "`python bench/quality.py --n 2 --steps 6 --t0 2`" in table  # --tiny's setting, as a command that repeats it
    for label in ("CAT", "random", "round-robin", "magnitude only", "sequential rows", "attention", "CAT + full refresh every 5"):
        assert f"| {label}" in table
    assert "## Figure 3 on this model" in table and "| 4 |" in table
    assert "| 3 | – | – |" in table  # every pruned step has a row; the first's r is undefined (n_(t-1) = n_t0)
    for name in ("figure3.png", "quality-grid.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"
    assert committed_results() == before  # nothing in bench/results/ written, added or removed


def test_quality_default_out_is_a_new_folder_outside_the_committed_results() -> None:
    quality = load_script("quality")
    out = quality.default_out()
    assert not out.exists()
    assert out.parent == RESULTS / "tmp"
    assert out.name.startswith("quality-")


def test_load_default_out_is_a_new_file_outside_the_committed_results() -> None:
    load = load_script("load")
    out = load.default_out("NVIDIA H100 80GB")
    assert not out.exists() and out.suffix == ".md"
    assert out.parent == RESULTS / "tmp"
    assert out.name.startswith("load-nvidia-h100-80gb-")


class _FakeServer(BaseHTTPRequestHandler):
    """Just enough of `catrt serve` for bench/load.py: the images route and /metrics."""

    def do_POST(self) -> None:  # noqa: N802
        self.server.keys.add(self.headers.get("authorization"))  # type: ignore[attr-defined]
        if self._refused():
            return
        self.rfile.read(int(self.headers["content-length"]))
        self._answer(200, "application/json",
                     json.dumps({"data": [{"b64_json": ""}], "catrt": {"timings": {"queue_wait": 0.001},
                                                                        **self.server.extra}}))

    def do_GET(self) -> None:  # noqa: N802
        self.server.keys.add(self.headers.get("authorization"))  # type: ignore[attr-defined]
        if self._refused():
            return
        metrics = ('catrt_batch_rows_sum{size="64x64"} 4\ncatrt_batch_rows_count{size="64x64"} 2\n'
                   'catrt_batch_rows_sum{size="96x64"} 2\ncatrt_batch_rows_count{size="96x64"} 1\n'
                   'catrt_step_seconds_sum{kind="full",size="64x64"} 0.5\ncatrt_step_seconds_count{kind="full",size="64x64"} 5\n'
                   'catrt_step_seconds_sum{kind="full",size="96x64"} 0.5\ncatrt_step_seconds_count{kind="full",size="96x64"} 5\n')
        self._answer(200, "text/plain", metrics)

    def _refused(self) -> bool:
        """A 401 in OpenAI's error body where the server has a key (`server.key`) and the request lacks it, as
        `catrt serve --api-key-file` answers /v1/*."""
        key = getattr(self.server, "key", None)
        if key is None or self.headers.get("authorization") == f"Bearer {key}" or not self.path.startswith("/v1/"):
            return False
        self._answer(401, "application/json", json.dumps({"error": {"message": "missing or wrong API key"}}))
        return True

    def _answer(self, status: int, kind: str, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _fake_server(extra: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadingHTTPServer]:
    """A `_FakeServer` on a free port whose answers' catrt object also carries `extra`, reached without a proxy."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
    server.extra = extra  # type: ignore[attr-defined]
    server.keys = set()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _run_load_script(arguments: list[str], extra: dict, monkeypatch: pytest.MonkeyPatch) -> set[str | None]:
    """bench/load.py's main() against a `_fake_server(extra)`; the Authorization headers it was sent."""
    with _fake_server(extra, monkeypatch) as server:
        load_script("load").main([f"http://127.0.0.1:{server.server_port}/", *arguments])
    return server.keys  # type: ignore[attr-defined]


def test_each_load_client_sends_a_request_however_late_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client the event loop first ran after its level's end (a loaded machine) sent nothing: the level reported 0
    requests and nan latencies as measured (and these tests' 0.3 s levels could read no answer on a busy machine). A
    clock already past the end at each client's first look stands in for that machine."""
    load = load_script("load")
    ticks = itertools.count()
    monkeypatch.setattr(load, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    with _fake_server({}, monkeypatch) as server:
        result = asyncio.run(load.run_load(f"http://127.0.0.1:{server.server_port}", 2, 0.5, {"n": 1}))
    assert result.statuses == {"200": 2} and result.images == 2 and len(result.latencies) == 2


def test_load_script_writes_its_report_to_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = committed_results()
    out = tmp_path / "nested" / "load.md"
    _run_load_script(["--clients", "2", "--seconds", "0.3", "--device", "test", "--out", str(out)], {}, monkeypatch)
    text = out.read_text()
    assert text.startswith("# Load test: test") and "Answers by status: 200:" in text
    assert "images per model call 2.00, full step (ms) 100.00" in text  # summed over the sizes
    assert "mean alpha" not in text and "replicas answering" not in text  # the server did not report them
    assert committed_results() == before


def test_load_ramp_has_a_row_per_level_with_the_reported_alpha_and_replicas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ramp.md"
    _run_load_script(["--ramp", "1", "3", "--seconds", "0.3", "--device", "test", "--out", str(out)],
                     {"alpha": 0.2, "replica": "r7"}, monkeypatch)
    text = out.read_text()
    assert "--ramp 1 3" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| 1 |", "| 3 |"))]
    assert [row[0] for row in rows] == ["| 1", "| 3"]
    for row in rows:
        assert int(row[2]) > 0  # requests answered at this level
        assert row[-2] == "0.200" and row[-1] == "1 |"  # mean alpha, one replica answering


@pytest.mark.parametrize("url", ["127.0.0.1:{port}", "http://127.0.0.1:{port}"])
def test_load_against_no_server_is_one_line_before_the_clients_run(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong port or a URL without http:// had every request fail for --seconds, then reading /metrics raised a
    traceback (ConnectError, UnsupportedProtocol) and no report was written."""
    import socket

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    load = load_script("load")
    monkeypatch.setattr(load, "asyncio", None)  # no client may run
    # A port nothing listens on: held bound (not listening) for the run, so no other process can start listening there
    # between finding it and connecting, as a port found free and then let go could be.
    with socket.socket() as held, pytest.raises(SystemExit) as exit_info:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        load.main([url.format(port=port), "--out", str(tmp_path / "load.md")])
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and line.startswith(f"bench/load.py: error: no server answers at {url.format(port=port)} (")
    assert not (tmp_path / "load.md").exists()


def test_load_writes_its_report_when_the_server_stops_before_its_metrics_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load = load_script("load")
    real_get = load.httpx.get

    def gone_at_the_end(url: str, **kwargs: object) -> object:
        if url.endswith("/metrics"):
            raise load.httpx.ConnectError("[Errno 111] Connection refused")
        return real_get(url, **kwargs)

    monkeypatch.setattr(load.httpx, "get", gone_at_the_end)
    out = tmp_path / "load.md"
    _run_load_script(["--clients", "1", "--seconds", "0.2", "--device", "test", "--out", str(out)], {}, monkeypatch)
    text = out.read_text()
    assert "Answers by status: 200:" in text
    assert "Server side (/metrics, warm-up included): not read (ConnectError: [Errno 111] Connection refused)" in text


def test_load_sends_the_servers_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a server with --api-key-file every request was a 401 (and /metrics one with --metrics-auth)."""
    monkeypatch.delenv("CATRT_API_KEY", raising=False)
    args = ["--clients", "1", "--seconds", "0.2", "--device", "test", "--out", str(tmp_path / "a.md")]
    assert _run_load_script(args, {}, monkeypatch) == {None}
    monkeypatch.setenv("CATRT_API_KEY", "from-env")
    assert _run_load_script(args, {}, monkeypatch) == {"Bearer from-env"}
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert _run_load_script([*args, "--api-key-file", str(key_file)], {}, monkeypatch) == {"Bearer from-file"}


def test_load_against_a_server_that_refuses_its_key_is_one_line_before_the_clients_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Without the key of a server started with --api-key-file (or with another one), every request of the run was a
    401: the report of --seconds of 401s had no latency but nan, and the exit code was 0."""
    monkeypatch.delenv("CATRT_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("another key\n")
    out = tmp_path / "report.md"
    for given, needle in (([], "it needs an API key"), (["--api-key-file", str(key_file)], "it refused the API key given")):
        with _fake_server({}, monkeypatch) as server:
            server.key = "the key"  # type: ignore[attr-defined]
            url = f"http://127.0.0.1:{server.server_port}"
            with pytest.raises(SystemExit) as exited:
                load_script("load").main([url, "--seconds", "30", "--out", str(out), *given])
        assert exited.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "--api-key-file" in err, err
        assert not out.exists()


def test_load_refuses_an_unreadable_key_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script("load").main(["http://127.0.0.1:9", "--api-key-file", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert f"cannot read the API key file {tmp_path / 'missing'}" in capsys.readouterr().err


def test_load_refuses_zero_clients_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script("load").main(["http://127.0.0.1:9", "--ramp", "2", "0"])
    assert exit_info.value.code == 2
    assert "--clients and --ramp take numbers of clients >= 1" in capsys.readouterr().err


def test_load_refuses_clients_with_a_ramp_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """`--ramp` ran instead of an explicit `--clients`, which was dropped without a word."""
    with pytest.raises(SystemExit) as exit_info:
        load_script("load").main(["http://127.0.0.1:9", "--clients", "8", "--ramp", "1", "2"])
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2
    assert line == ("bench/load.py: error: --clients 8 and --ramp 1 2 both set the number of clients: give --clients N "
                    "for one level, or --ramp N1 N2 ... for several (see bench/load.py --help)")


@pytest.mark.parametrize(("script", "argv", "out"), [
    ("quality", [], "a-file"),
    ("quality", [], "a-file/sub"),
    ("frontier", ["--tiny"], "a-file/sub"),
    ("compile_time", ["--models", "tiny-sd3"], "a-folder"),
    ("compile_time", ["--models", "tiny-sd3"], "a-file/report.md"),
    ("load", ["http://127.0.0.1:9"], "a-folder"),
])
def test_an_out_no_report_can_be_written_to_is_one_line_before_the_run(
    script: str, argv: list[str], out: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """quality.py and frontier.py made their --out folder with a traceback; compile_time.py and load.py wrote their
    report file after minutes of measuring (or of load) and failed there with one."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    module = load_script(script)
    monkeypatch.setattr(module, "asyncio", None, raising=False)  # load.py: no load may run
    monkeypatch.setattr(module, "subprocess", None, raising=False)  # compile_time.py: no measuring process
    with pytest.raises(SystemExit) as exit_info:
        module.main([*argv, "--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"bench/{script}.py: error: --out {tmp_path}")


class _Generated(Exception):
    """What a stubbed model load raises: the run got past its --out checks."""


@pytest.mark.parametrize(("script", "argv", "written"), [
    ("quality", [], ["quality.md", "quality-grid.png", "figure3.png"]),
    ("frontier", ["--tiny"], ["frontier.md", "frontier.png", "frontier.csv"]),
])
def test_an_out_folder_whose_files_cannot_be_written_is_one_line_before_any_generation(
    script: str, argv: list[str], written: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A folder (or a link to one) where quality.md / frontier.csv goes, or a link there into a path under a file, passed
    the --out check, and the write failed after the whole run with a traceback; a dangling link at --out to a folder still
    to make was refused as "File exists". A link at --out to a folder is written through."""
    module = load_script(script)

    def generation(*args: object, **kwargs: object) -> None:
        raise _Generated

    monkeypatch.setattr(module.benchkit, "load_reference", generation)
    (tmp_path / "a-file").write_text("x")

    def refused(out: Path) -> str:
        with pytest.raises(SystemExit) as exit_info:
            module.main([*argv, "--out", str(out)])
        (line,) = capsys.readouterr().err.splitlines()
        assert exit_info.value.code == 2 and "Traceback" not in line
        return line

    for name in written:  # a folder at a file's name, or a link to one
        out = tmp_path / f"folder-at-{name}"
        (out / name).mkdir(parents=True)
        assert refused(out) == (f"bench/{script}.py: error: --out {out}: {out / name} is a folder, where this script "
                                f"writes its file {name}; move it away or give another --out (see bench/{script}.py --help)")
        (out / name).rmdir()
        (out / name).symlink_to(tmp_path, target_is_directory=True)
        assert f"--out {out}: {out / name} is a folder" in refused(out)
    out = tmp_path / "link-under-a-file"
    out.mkdir()
    (out / written[-1]).symlink_to(tmp_path / "a-file" / written[-1])
    assert f"--out {out / written[-1]}: {tmp_path / 'a-file'} is a file, so no report can be written under it" in refused(out)
    (tmp_path / "link-to-a-file").symlink_to(tmp_path / "a-file")
    assert f"--out {tmp_path / 'link-to-a-file'} is a file; give a folder for" in refused(tmp_path / "link-to-a-file")

    (tmp_path / "dangling").symlink_to(tmp_path / "later" / "results", target_is_directory=True)
    (tmp_path / "kept").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "kept", target_is_directory=True)
    for out in (tmp_path / "dangling", tmp_path / "linked"):
        with pytest.raises(_Generated):
            module.main([*argv, "--out", str(out)])
        assert out.is_symlink() and out.is_dir()
    assert (tmp_path / "later" / "results").is_dir() and list((tmp_path / "later" / "results").iterdir()) == []


def test_quality_report_names_the_alpha_figure_3_and_the_grid_ran_at(tmp_path: Path) -> None:
    """Without 0.3 among --alphas, Figure 3's CAT curve and the grid run at the first alpha; the report said 0.3."""
    quality = load_script("quality")
    args = quality.argparse.Namespace(n=2, steps=6, t0=2, alphas=[0.5, 0.2], device="cpu", data_seed=2024)
    baseline = dict.fromkeys(quality.ATTRIBUTES, 1.0)
    quality.write_table(tmp_path / "quality.md", args, baseline, [], [(4, 0.5)], [(4, 0.25)])
    text = (tmp_path / "quality.md").read_text()
    assert "| step | unpruned | CAT alpha 0.5 |" in text and "each method at alpha 0.5)" in text
    assert "alpha 0.3" not in text
    assert [m for m in quality.methods([0.5, 0.2]) if m.refresh_every] == [quality.Method("cat", 0.5, refresh_every=5)]


def test_quality_psnr_of_identical_images_is_inf_not_a_floor() -> None:
    """alpha 1 computes every token: the images equal the unpruned ones and the table read 'PSNR 100.00'."""
    import torch

    quality = load_script("quality")
    reference = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    assert quality.psnr_ssim(reference.clone(), reference) == ([float("inf")] * 2, 1.0)
    shifted = reference + 0.02  # 0.01 off in [0, 1] everywhere: mse 1e-4, 40 dB
    psnr, ssim = quality.psnr_ssim(shifted, reference)
    assert psnr == pytest.approx([40.0, 40.0]) and ssim < 1.0


@pytest.mark.parametrize(("script", "argv", "message"), [
    ("load", ["http://127.0.0.1:9", "--seconds", "0"], "--seconds must be a finite number > 0, got 0.0"),
    ("load", ["http://127.0.0.1:9", "--seconds", "nan"], "--seconds must be a finite number > 0, got nan"),
    ("load", ["http://127.0.0.1:9", "--n", "0"], "--n must be at least 1, got 0"),
    ("adaptive", ["--seconds", "-5"], "--seconds must be a finite number > 0, got -5.0"),
    ("adaptive", ["--latency-target", "0"], "--latency-target must be a finite number > 0, got 0.0"),
])
def test_a_load_level_that_cannot_measure_anything_is_one_line(
    script: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--seconds 0 or nan ran levels that sent nothing and reported 0 requests (nan latencies) as measured; --n 0 got
    a 400 for every request; adaptive.py started a server for each."""
    module = load_script(script)
    monkeypatch.setattr(module, "asyncio", None)  # neither may run a load
    monkeypatch.setattr(module, "subprocess", None, raising=False)  # nor adaptive.py start a server
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"bench/{script}.py: error: {message}")


@pytest.mark.parametrize(("script", "argv", "message"), [
    ("quality", ["--device", "nonsense"], "device 'nonsense' is not a torch device; use cpu, cuda or cuda:N"),
    ("frontier", ["--tiny", "--device", "nonsense"], "device 'nonsense' is not a torch device; use cpu, cuda or cuda:N"),
    ("quality", ["--weights", "{tmp}/missing"], "the reference weights folder {tmp}/missing does not exist"),
])
def test_a_device_or_weights_the_reference_model_cannot_load_from_is_one_line(
    script: str, argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--device cuda` without CUDA ended in torch's AssertionError, missing --weights in a FileNotFoundError."""
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main([*(word.format(tmp=tmp_path) for word in argv), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"bench/{script}.py: error: {message.format(tmp=tmp_path)}")


@pytest.mark.parametrize(("script", "blocked", "package"), [
    ("quality", "matplotlib", "matplotlib"),
    ("quality", "skimage", "scikit-image"),
    ("load", "httpx", "httpx"),
])
def test_missing_bench_extra_is_one_line_and_exit_2(tmp_path: Path, script: str, blocked: str, package: str) -> None:
    # sys.modules[name] = None makes `import name` fail as if the package were not installed.
    runner = (f"import sys, runpy; sys.modules[{blocked!r}] = None; "
              f"sys.argv = ['bench/{script}.py', 'http://127.0.0.1:9', '--out', {str(tmp_path / 'out')!r}]"
              if script == "load" else
              f"import sys, runpy; sys.modules[{blocked!r}] = None; "
              f"sys.argv = ['bench/{script}.py', '--out', {str(tmp_path / 'out')!r}]")
    runner += f"; runpy.run_path({str(ROOT / 'bench' / f'{script}.py')!r}, run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"missing optional dependency '{package}'" in lines[0]
    assert 'pip install -e ".[bench]"' in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("script", "argv", "message"), [
    ("quality", ["--n", "0"], "--n must be at least 1, got 0"),
    ("quality", ["--batch", "0"], "--batch must be at least 1, got 0"),
    ("quality", ["--steps", "4", "--t0", "4"], "CATConfig.t0 = 4 needs t0 < num_inference_steps, got 4 steps"),
    ("quality", ["--alphas", "0.3", "1.5"], "CATConfig.alpha must be in (0, 1], got 1.5"),
    ("quality", ["--steps", "3", "--t0", "2"], "Figure 3 needs two pruned steps: --steps must be at least --t0 + 2 = 4, got 3"),
    ("quality", ["--data-seed", "-1"], "--data-seed must be an integer >= 0, got -1"),
    ("quality", ["--alphas", "0.3", "0.5", "0.3"], "--alphas repeats 0.3; list each once"),
    ("compile_time", ["--models", "tiny-sd3", "tiny-sd3"], "--models repeats tiny-sd3; list each once"),
    ("compile_time", ["--modes", "whole", "whole"], "--modes repeats whole; list each once"),
    ("adaptive", ["--alphas", "0.2", "0.2"], "--alphas repeats 0.2; list each once"),
    ("frontier", ["--data-seed", "-1"], "--data-seed must be an integer >= 0, got -1"),
    ("frontier", ["--n", "0"], "--n must be at least 1, got 0"),
    ("frontier", ["--threads", "0"], "--threads must be at least 1, got 0"),
    ("frontier", ["--steps", "8", "--t0", "8"], "CATConfig.t0 = 8 needs t0 < num_inference_steps, got 8 steps"),
])
def test_bench_mistakes_are_one_line_before_any_model_loads(
    script: str, argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err.splitlines()[-1]
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["adaptive", "compile_time", "frontier", "gpu", "load", "quality", "speed"])
def test_a_bench_usage_mistake_is_one_line_and_exit_2(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every bench script's parser is catrt's: an unknown flag is one line naming it and the --help to read, where
    argparse printed its usage block first (gpu.py's stretched over a dozen lines)."""
    with pytest.raises(SystemExit) as exited:
        load_script(script).main(["http://127.0.0.1:9", "--bogus"] if script == "load" else ["--bogus"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"bench/{script}.py: error: unrecognized arguments: --bogus (see bench/{script}.py --help)"]


def test_quality_table_says_how_many_images_are_identical_and_what_seconds_are(tmp_path: Path) -> None:
    """A method with one identical image read a mean PSNR of inf; the seconds column (all prompts, first call
    included) did not say what it timed."""
    import argparse
    import math

    import torch

    quality = load_script("quality")
    reference = torch.zeros(3, 3, 32, 32)
    images = reference.clone()
    images[1:] += 0.1  # image 0 equals its reference
    psnr, ssim = quality.psnr_ssim(images, reference)
    assert psnr[0] == math.inf and all(math.isfinite(value) for value in psnr[1:]) and ssim < 1
    args = argparse.Namespace(n=3, steps=8, t0=2, device="cpu", data_seed=2024, alphas=[0.3])
    accuracy = {name: 1.0 for name in quality.ATTRIBUTES}
    rows = [{"method": "CAT", "alpha": 0.3, "psnr": [math.inf, 30.0, 32.0], "ssim": 0.9, "seconds": 2.0, **accuracy},
            {"method": "random", "alpha": 0.3, "psnr": [math.inf] * 3, "ssim": 1.0, "seconds": 2.0, **accuracy}]
    quality.write_table(tmp_path / "quality.md", args, accuracy, rows, [(4, 0.5)], [(4, 0.4)])
    table = (tmp_path / "quality.md").read_text()
    assert "| CAT | 0.3 | inf (1 of 3 identical; the other 2: 31.00) | 0.9000 |" in table
    assert "| random | 0.3 | inf | 1.0000 |" in table
    assert "| seconds (all prompts) |" in table
    assert "total wall time over all 3 prompts (all its pipeline calls), its first call's one-off costs" in table


def test_a_result_file_interrupted_mid_write_leaves_the_earlier_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while a bench script writes a CSV, a plot or an image grid leaves the earlier file there (a committed
    result under --out bench/results) as it was and nothing beside it: open("w"), savefig and PIL's save wrote in
    place, and left half a file. savefig and PIL's save are replaced by stand-ins that write the start of the file,
    then are interrupted; the CSV is interrupted by its second row."""
    import matplotlib.figure
    import torch

    frontier, quality, adaptive = load_script("frontier"), load_script("quality"), load_script("adaptive")

    def half_then_interrupted(self: object, fname: object, *args: object, **kwargs: object) -> None:
        with open(fname, "wb") as stream:  # type: ignore[call-overload]
            stream.write(b"\x89PNG half")
        raise KeyboardInterrupt

    class Interrupting(float):
        def __format__(self, spec: str) -> str:
            raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_interrupted)
    monkeypatch.setattr(Image.Image, "save", half_then_interrupted)
    rows = [frontier.Point("a", "cat", 20.0, 0.9, 0.5, 1.0, 0.0),
            frontier.Point("b", "cat", Interrupting(21.0), 0.9, 0.5, 1.0, 0.0)]
    load_result = adaptive.load.LoadResult(seconds=1.0, latencies=[0.5], statuses={"200": 1}, images=1)
    writes = {
        "frontier.csv": lambda path: frontier.write_csv(rows, path),
        "frontier.png": lambda path: frontier.plot(rows[:1], path),
        "figure3.png": lambda path: quality.figure3([(3, 0.5)], [(3, 0.4)], 0.3, path),
        "quality-grid.png": lambda path: quality.image_grid([("unpruned", torch.zeros(1, 3, 32, 32))], 1, path),
        "adaptive.png": lambda path: adaptive.plot({"fixed": [(1, load_result)]}, path),
    }
    for name, write in writes.items():
        (tmp_path / name).write_bytes(b"the committed " + name.encode())
        with pytest.raises(KeyboardInterrupt):
            write(tmp_path / name)
        assert (tmp_path / name).read_bytes() == b"the committed " + name.encode(), name
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(writes)


def test_a_report_write_the_os_refuses_at_the_end_is_one_line_after_the_report_is_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another user's report put in a sticky --out folder after the up-front check (or a disk full by the end) fails
    the final rename: that was a traceback after the whole run, and bench/load.py and bench/speed.py printed the report
    only once written, so the measurements were lost. Now the report is printed first and the refusal is one line."""
    import errno

    out = tmp_path / "load.md"
    out.write_text("an earlier report\n")
    replace = os.replace

    def refused(source: object, target: object) -> None:  # as the rename in a sticky folder fails (EPERM)
        if Path(str(target)) == out:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        replace(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(SystemExit) as failed:
        _run_load_script(["--clients", "1", "--seconds", "0.2", "--device", "test", "--out", str(out)], {}, monkeypatch)
    printed = capsys.readouterr().out
    assert failed.value.code == (f"{Path(sys.argv[0]).name}: error: could not write {out} ({os.strerror(errno.EPERM)}); "
                                 "the earlier file, if any, is left as it was: free some space or give another --out")
    assert printed.startswith("# Load test: test") and "Answers by status: 200:" in printed  # each client sends one
    assert out.read_text() == "an earlier report\n" and sorted(tmp_path.iterdir()) == [out]


def test_an_out_that_is_a_link_another_user_planted_in_a_sticky_folder_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bench's --out (and `catrt generate --out`) at a link another user made in a sticky folder (/tmp) pointing at
    a file of this user's: refused in one line before the run, the file it points to untouched (the tests run as root,
    so the link is given another user's uid by lchown)."""
    from catrt.cli import main

    if os.geteuid() != 0:
        pytest.skip("giving the link another user's uid (lchown) needs root, as the tests run")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"the victim's file")
    planted = shared / "out.png"
    planted.symlink_to(victim)
    os.lchown(planted, 1000, 1000)
    with pytest.raises(SystemExit) as refused:
        load_script("load").main(["http://127.0.0.1:9/", "--out", str(planted)])
    (line,) = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2 and line.startswith(
        f"bench/load.py: error: --out {planted} cannot be written ({planted} is a link another user (uid 1000) made in the "
        f"sticky folder {shared}, not followed); remove the link or give another path"), line
    monkeypatch.setattr("catrt.loading.load_pipeline", lambda *args, **kwargs: pytest.fail("the model loaded"))
    assert main(["generate", "--model", "reference", "--prompt", "a red circle", "--out", str(planted)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"--out '{planted}' cannot be written ({planted} is a link another user (uid 1000) made" in line, line
    assert victim.read_bytes() == b"the victim's file" and sorted(p.name for p in tmp_path.iterdir()) == ["shared", "victim.png"]
