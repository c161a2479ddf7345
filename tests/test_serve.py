"""`catrt serve` as a real subprocess on a free loopback port, spoken to over HTTP.

Two servers run for the module: one over an ONNX Runtime engine built here (`--engines`), and one
over the eager tiny model (`--model`) whose generation is patched in its own process to fail or
stall on marked prompts, to test 500 isolation, timeouts, disconnects and SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from PIL import Image

from catrt.build import build_engines
from catrt.build_config import BuildConfig

PROMPT = "a red sun in a blue sky"
TEXT_LENGTH = 16
# The fault server: generation raises on the prompt "boom" and sleeps N seconds on "sleep N".
FAULTY_LAUNCHER = """
import sys, time
from catrt.serve.model import ServedModel
generate = ServedModel.generate
def faulty(self, rows, options):
    for row in rows:
        if row.prompt == "boom":
            raise RuntimeError("injected failure")
        if row.prompt.startswith("sleep "):
            time.sleep(float(row.prompt.split()[1]))
    return generate(self, rows, options)
ServedModel.generate = faulty
from catrt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RemoteServer:
    """A `catrt serve` subprocess; records /health/ready answers until ready (vllm's RemoteOpenAIServer)."""

    def __init__(self, command: list[str], serve_args: list[str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        args = [*command, "serve", *serve_args, "--port", str(self.port)]
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.ready_statuses: list[int] = []

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                status = httpx.get(f"{self.url}/health/ready", timeout=1.0).status_code
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            self.ready_statuses.append(status)
            if status == 200:
                return
            time.sleep(0.02)
        raise TimeoutError(f"{self.url} not ready in {timeout} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RemoteServer]]:
    """The fault server starts first; the engine is built while it loads, then both wait for ready."""
    faulty = RemoteServer(
        [sys.executable, "-c", FAULTY_LAUNCHER],
        ["--model", "tiny-sd3", "--height", "64", "--width", "64", "--steps", "8", "--t0", "4", "--batch", "2",
         "--max-queue", "4", "--timeout", "2"],
    )
    folder = tmp_path_factory.mktemp("serve")
    build = BuildConfig("tiny-sd3", height=64, width=64, batch=2, steps=8, t0=4, alpha=0.3, backend="onnxruntime",
                        max_sequence_length=TEXT_LENGTH)
    engine_dir = build_engines(build, out_dir=folder / "engines", export_dir=folder / "export", progress=False)
    engine = RemoteServer([sys.executable, "-m", "catrt.cli"],
                          ["--engines", str(engine_dir), "--max-queue", "2", "--timeout", "30"])
    started = {"engine": engine, "faulty": faulty}
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def server(servers: dict[str, RemoteServer]) -> RemoteServer:
    return servers["engine"]


@pytest.fixture(scope="module")
def faulty(servers: dict[str, RemoteServer]) -> RemoteServer:
    return servers["faulty"]


def _generate(url: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, **body}, timeout=60)


async def _generate_all(url: str, bodies: list[dict[str, Any]], stagger: float = 0.0) -> list[httpx.Response]:
    """POST every body concurrently (the i-th after i * stagger seconds)."""
    async with httpx.AsyncClient(timeout=60) as client:

        async def post(index: int, body: dict[str, Any]) -> httpx.Response:
            await asyncio.sleep(index * stagger)
            return await client.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, **body})

        return await asyncio.gather(*(post(index, body) for index, body in enumerate(bodies)))


def _png(b64: str) -> bytes:
    return base64.b64decode(b64)


def _assert_error(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    return error


# -- readiness, success, determinism ------------------------------------------------------------


def test_ready_is_503_until_warmed_up_then_200(server: RemoteServer) -> None:
    assert 503 in server.ready_statuses, server.ready_statuses  # precondition: seen while loading
    assert server.ready_statuses[-1] == 200
    assert httpx.get(f"{server.url}/health/live").status_code == 200


def test_openai_client_gets_a_png_of_the_requested_size(server: RemoteServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    result = client.images.generate(model="tiny-sd3", prompt=PROMPT, size="64x64", response_format="b64_json",
                                    extra_body={"seed": 1})
    with Image.open(io.BytesIO(_png(result.data[0].b64_json))) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    catrt = result.model_extra["catrt"]
    assert set(catrt["timings"]) == {"queue_wait", "encode", "full_steps", "pruned_steps", "decode", "total"}
    assert catrt["timings"]["full_steps"] > 0 and catrt["timings"]["pruned_steps"] > 0
    assert catrt["alpha"] == 0.3 and catrt["seeds"] == [1]


def test_same_seed_gives_the_same_bytes_alone_batched_and_as_n(server: RemoteServer) -> None:
    alone = _png(_generate(server.url, seed=7).json()["data"][0]["b64_json"])
    second = _png(_generate(server.url, seed=8).json()["data"][0]["b64_json"])
    pair = _generate(server.url, seed=7, n=2).json()
    assert [_png(item["b64_json"]) for item in pair["data"]] == [alone, second]
    for _ in range(3):  # a busy worker makes the two later requests wait together
        blocker, other, mine = asyncio.run(_generate_all(
            server.url, [{"seed": 1, "guidance_scale": 3.0}, {"prompt": "a green tree", "seed": 2}, {"seed": 7}],
            stagger=0.02,
        ))
        if mine.json()["catrt"]["batch_rows"] == 2:
            break
    assert blocker.status_code == other.status_code == 200
    assert mine.json()["catrt"]["batch_rows"] == 2, "the requests were never batched"
    assert _png(mine.json()["data"][0]["b64_json"]) == alone


# -- bad input ----------------------------------------------------------------------------------

BAD_BODIES = [
    pytest.param({"prompt": None}, "prompt", id="prompt-null"),
    pytest.param({"prompt": "   "}, "prompt", id="prompt-empty"),
    pytest.param({"prompt": 5}, "prompt", id="prompt-not-string"),
    pytest.param({"prompt": "red " * 40}, "prompt", id="prompt-too-long"),
    pytest.param({"negative_prompt": "blue " * 40}, "negative_prompt", id="negative-too-long"),
    pytest.param({"size": "128x128"}, "size", id="size-not-built"),
    pytest.param({"size": "large"}, "size", id="size-malformed"),
    pytest.param({"steps": 9}, "steps", id="steps-not-built"),
    pytest.param({"n": 3}, "n", id="n-over-batch"),
    pytest.param({"n": 0}, "n", id="n-zero"),
    pytest.param({"n": "2"}, "n", id="n-string"),
    pytest.param({"seed": -1}, "seed", id="seed-negative"),
    pytest.param({"seed": 1.5}, "seed", id="seed-float"),
    pytest.param({"guidance_scale": "high"}, "guidance_scale", id="guidance-string"),
    pytest.param({"guidance_scale": 1.0}, "guidance_scale", id="guidance-without-cfg"),
    pytest.param({"response_format": "url"}, "response_format", id="url-format"),
    pytest.param({"quality": "hd"}, "quality", id="unknown-field"),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_bad_input_is_a_400_naming_the_param(server: RemoteServer, body: dict[str, Any], param: str) -> None:
    error = _assert_error(_generate(server.url, **body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_missing_prompt_malformed_json_and_unknown_route(server: RemoteServer) -> None:
    missing = httpx.post(f"{server.url}/v1/images/generations", json={"n": 1})
    _assert_error(missing, 400, "prompt")
    malformed = httpx.post(f"{server.url}/v1/images/generations", content=b'{"prompt": "a',
                           headers={"content-type": "application/json"})
    assert "not valid JSON" in _assert_error(malformed, 400, None)["message"]
    too_long = _generate(server.url, prompt="red " * 40)
    assert f"at most {TEXT_LENGTH}" in too_long.json()["error"]["message"]
    _assert_error(httpx.get(f"{server.url}/v1/nothing"), 404, None)


# -- load, metrics, docs ------------------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after(server: RemoteServer) -> None:
    # Distinct guidance scales: nothing batches, so 12 requests overflow a queue of 2.
    responses = asyncio.run(_generate_all(server.url, [{"guidance_scale": 2.0 + i / 10} for i in range(12)]))
    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) == {200, 429}, statuses
    rejected = next(response for response in responses if response.status_code == 429)
    _assert_error(rejected, 429, None)
    assert int(rejected.headers["retry-after"]) >= 1
    assert _generate(server.url).status_code == 200  # postcondition: still serving


def test_metrics_expose_the_documented_series(server: RemoteServer) -> None:
    _generate(server.url)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        'catrt_requests_total{route="/v1/images/generations",status="200"}',
        'catrt_request_latency_seconds_bucket{le="0.01",route="/v1/images/generations"}',
        "catrt_queue_depth 0.0",
        "catrt_images_generated_total",
        'catrt_step_seconds_count{kind="full"}',
        'catrt_step_seconds_count{kind="pruned"}',
        "catrt_batch_rows_bucket",
    ):
        assert name in text, name
    assert ("catrt_gpu_memory_used_bytes" in text) == torch.cuda.is_available()


def test_openapi_docs_are_served(server: RemoteServer) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/images/generations" in schema["paths"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


# -- failures, timeouts, disconnects, SIGTERM (the fault server) --------------------------------


def test_a_failing_generation_answers_500_to_that_request_alone(faulty: RemoteServer) -> None:
    responses = asyncio.run(_generate_all(faulty.url, [{"prompt": "sleep 0.3"}, {"prompt": "boom"}, {}], 0.05))
    assert [response.status_code for response in responses] == [200, 500, 200]
    assert _assert_error(responses[1], 500, None)["type"] == "server_error"
    assert httpx.get(f"{faulty.url}/health/ready").status_code == 200


def test_a_request_past_the_timeout_answers_504(faulty: RemoteServer) -> None:
    slow, queued = asyncio.run(_generate_all(faulty.url, [{"prompt": "sleep 2.5"}, {"guidance_scale": 2.0}], 0.1))
    assert _assert_error(slow, 504, None)["type"] == "timeout_error"
    _assert_error(queued, 504, None)
    assert _generate(faulty.url).status_code == 200


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_leaves_does_not_leave_its_work_queued(faulty: RemoteServer) -> None:
    images = _metric(faulty.url, "catrt_images_generated_total")

    async def leave_early() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as client:
            slow = asyncio.create_task(client.post(f"{faulty.url}/v1/images/generations", json={"prompt": "sleep 1"}))
            await asyncio.sleep(0.2)
            with pytest.raises(httpx.ReadTimeout):
                await client.post(f"{faulty.url}/v1/images/generations", json={"prompt": PROMPT}, timeout=0.3)
            return await slow

    assert asyncio.run(leave_early()).status_code == 200
    assert _metric(faulty.url, 'catrt_requests_cancelled_total{reason="disconnect"}') == 1
    assert _metric(faulty.url, "catrt_images_generated_total") == images + 1


def test_sigterm_finishes_the_request_in_flight_refuses_the_rest_and_exits_0(faulty: RemoteServer) -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            post = lambda body: client.post(f"{faulty.url}/v1/images/generations", json=body)  # noqa: E731
            in_flight = asyncio.create_task(post({"prompt": "sleep 1.5"}))
            await asyncio.sleep(0.2)
            queued = asyncio.create_task(post({"prompt": PROMPT, "guidance_scale": 2.0}))
            await asyncio.sleep(0.2)
            faulty.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            late = await post({"prompt": PROMPT})
            return await in_flight, await queued, late

    in_flight, queued, late = asyncio.run(scenario())
    assert in_flight.status_code == 200 and len(in_flight.json()["data"]) == 1
    _assert_error(queued, 503, None)
    _assert_error(late, 503, None)
    assert faulty.process.wait(timeout=20) == 0


def test_a_folder_that_is_not_a_build_fails_to_start(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "catrt.cli", "serve", "--engines", str(tmp_path), "--port", str(_free_port())],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert "manifest.json is missing" in result.stderr
