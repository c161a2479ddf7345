"""`catrt serve` as a real subprocess on a loopback port, spoken to over HTTP.

Two servers run for the module, both launched as `FAULT_CLI` (generation patched in the server's own
process to fail or stall on marked prompts): one over an ONNX Runtime engine built here (`--engines`),
which stalls only to hold its worker busy on cue, and one over the eager tiny model (`--model`), to
test 500 isolation, timeouts, disconnects, read timeouts and SIGTERM.
Other models, the API key and start-up refusals are in test_serve_models.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from PIL import Image
from test_serve_support import (
    CHECKS_RAN,
    FAULT_CLI,
    WAIT_SECONDS,
    WARM_UP_HOLD,
    HeldWorker,
    LiveProbe,
    RemoteServer,
    assert_error,
    assert_one_line_refusal,
    generate,
    generate_all,
    hold_file,
    metric,
    openapi_request_schema,
    png,
    queue_depth,
    run_cli,
    start_all,
    stop_all,
    taken_mark,
    wait_until,
)

from catrt.build import build_engines
from catrt.build_config import BuildConfig
from catrt.config import CATConfig
from catrt.errors import ConfigError
from catrt.loading import load_pipeline
from catrt.serve.config import ServeConfig
from catrt.serve.model import load_served_model

TEXT_LENGTH = 16
IMAGES_64 = 'catrt_images_generated_total{size="64x64"}'
READ_TIMEOUT = 1.0


def _faulty_args(timeout: float = WAIT_SECONDS, hang_grace: float = 1.5) -> list[str]:
    """The fault server's; its --timeout no generation outlasts, however slow the machine, unless a test says."""
    return ["--model", "tiny-sd3", "--height", "64", "--width", "64", "--steps", "8", "--t0", "4", "--batch", "2",
            "--max-queue", "4", "--timeout", f"{timeout:g}", "--read-timeout", str(READ_TIMEOUT),
            "--hang-grace", f"{hang_grace:g}"]


FAULTY_ARGS = _faulty_args()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RemoteServer]]:
    """The fault server starts first; the engine is built while it loads, then both wait for ready. The engine
    server's warm-up is held until its readiness has answered (503): a load quicker than the first question (this
    process slowed down) would leave no answer of the loading server to test."""
    started = {"faulty": RemoteServer(FAULT_CLI, FAULTY_ARGS)}
    try:
        folder = tmp_path_factory.mktemp("serve")
        build = BuildConfig("tiny-sd3", height=64, width=64, batch=2, steps=8, t0=4, alphas=(0.3,), backend="onnxruntime",
                            max_sequence_length=TEXT_LENGTH)
        engine_dir = build_engines(build, out_dir=folder / "engines", export_dir=folder / "export", progress=False)
        warm_up = folder / "warm-up"
        warm_up.touch()
        engine_args = ["--engines", str(engine_dir), "--max-queue", "2", "--timeout", f"{WAIT_SECONDS:g}"]
        started["engine"] = RemoteServer(FAULT_CLI, engine_args, env={WARM_UP_HOLD: str(warm_up)})
        engine = started["engine"]
        wait_until(taken_mark(warm_up).exists, "the engine server's warm-up holds")
        engine.wait_listening()
        wait_until(engine.ready_status, "the engine server's readiness answers")
        warm_up.unlink()
        start_all(started)
    except BaseException:
        stop_all(started)
        raise
    yield started
    stop_all(started)


@pytest.fixture(scope="module")
def server(servers: dict[str, RemoteServer]) -> RemoteServer:
    return servers["engine"]


@pytest.fixture
def faulty(servers: dict[str, RemoteServer]) -> RemoteServer:
    """The module's fault server, or a new one where the SIGTERM test has ended it (tests may run in any order: in
    another, every fault-server test after that one was refused its connection)."""
    if servers["faulty"].process.poll() is not None:
        servers["faulty"] = RemoteServer(FAULT_CLI, FAULTY_ARGS)  # the module's teardown stops it with the rest
        start_all({"faulty": servers["faulty"]})
    return servers["faulty"]


# -- readiness, success, determinism ------------------------------------------------------------


def test_ready_is_503_until_warmed_up_then_200(server: RemoteServer) -> None:
    assert 503 in server.ready_statuses, server.ready_statuses  # precondition: seen while loading
    assert server.ready_statuses[-1] == 200
    assert httpx.get(f"{server.url}/health/live").status_code == 200
    assert f"catrt serve: listening on {server.url}" in server.lines


def test_openai_client_gets_a_png_of_the_requested_size(server: RemoteServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    result = client.images.generate(model="tiny-sd3", prompt="a red sun", size="64x64", response_format="b64_json",
                                    extra_body={"seed": 1})
    with Image.open(io.BytesIO(png(result.data[0].b64_json))) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    catrt = result.model_extra["catrt"]
    assert set(catrt["timings"]) == {"queue_wait", "encode", "full_steps", "pruned_steps", "decode", "total"}
    assert catrt["timings"]["full_steps"] > 0 and catrt["timings"]["pruned_steps"] > 0
    assert catrt["alpha"] == 0.3 and catrt["seeds"] == [1]


def test_a_stock_openai_sdk_call_is_served(server: RemoteServer) -> None:
    """The SDK's optional fields are accepted: used (size, output_format, background) or ignored."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    stock = client.images.generate(model="dall-e-3", prompt="a red sun", size="64x64", quality="standard", style="vivid")
    auto = client.images.generate(
        model="gpt-image-1", prompt="a red sun", size="auto", quality="high", user="someone", moderation="low",
        background="opaque", output_format="png", output_compression=80, n=2,
    )
    for result, count in ((stock, 1), (auto, 2)):
        assert len(result.data) == count and result.output_format == "png"
        with Image.open(io.BytesIO(png(result.data[0].b64_json))) as image:
            assert image.format == "PNG" and image.size == (64, 64)


def test_same_seed_gives_the_same_bytes_alone_batched_and_as_n(server: RemoteServer) -> None:
    alone = png(generate(server.url, seed=7).json()["data"][0]["b64_json"])
    second = png(generate(server.url, seed=8).json()["data"][0]["b64_json"])
    pair = generate(server.url, seed=7, n=2).json()
    assert [png(item["b64_json"]) for item in pair["data"]] == [alone, second]
    # The worker is held on a blocker (which no other request can join) until the two later ones wait together.
    with ThreadPoolExecutor(2) as pool, HeldWorker(server, seed=1, guidance_scale=3.0) as held:
        waiting = [pool.submit(generate, server.url, prompt="a green tree", seed=2), pool.submit(generate, server.url, seed=7)]
        wait_until(lambda: queue_depth(server.url) == 2, "both requests wait behind the blocker")
        blocker = held.release()
        other, mine = (answer.result() for answer in waiting)
    assert blocker.status_code == other.status_code == 200
    assert blocker.json()["catrt"]["batch_rows"] == 1
    assert mine.json()["catrt"]["batch_rows"] == 2, "the requests were never batched"
    assert png(mine.json()["data"][0]["b64_json"]) == alone


# -- bad input ----------------------------------------------------------------------------------

BAD_BODIES = [
    pytest.param({"prompt": None}, "prompt", id="prompt-null"),
    pytest.param({"prompt": "   "}, "prompt", id="prompt-blank"),
    pytest.param({"prompt": ""}, "prompt", id="prompt-empty"),
    pytest.param({"prompt": "\u200b\ufeff "}, "prompt", id="prompt-invisible"),
    pytest.param({"prompt": "\u0001\u0002"}, "prompt", id="prompt-control"),
    pytest.param({"prompt": "a red\u0000sun"}, "prompt", id="prompt-nul"),
    pytest.param({"negative_prompt": "\u001b[1mblue"}, "negative_prompt", id="negative-control"),
    pytest.param({"prompt": 5}, "prompt", id="prompt-not-string"),
    pytest.param({"prompt": "red " * 40}, "prompt", id="prompt-too-many-tokens"),
    pytest.param({"prompt": "x" * 4001}, "prompt", id="prompt-too-many-chars"),
    pytest.param({"negative_prompt": "blue " * 40}, "negative_prompt", id="negative-too-long"),
    pytest.param({"size": "128x128"}, "size", id="size-not-built"),
    pytest.param({"size": "large"}, "size", id="size-malformed"),
    pytest.param({"steps": 9}, "steps", id="steps-not-built"),
    pytest.param({"n": 3}, "n", id="n-over-batch"),
    pytest.param({"n": 0}, "n", id="n-zero"),
    pytest.param({"n": "2"}, "n", id="n-string"),
    pytest.param({"seed": -1}, "seed", id="seed-negative"),
    pytest.param({"seed": 2**63 - 1}, "seed", id="seed-past-the-last-image"),
    pytest.param({"seed": 1.5}, "seed", id="seed-float"),
    pytest.param({"guidance_scale": "high"}, "guidance_scale", id="guidance-string"),
    pytest.param({"guidance_scale": -2.0}, "guidance_scale", id="guidance-negative"),
    pytest.param({"guidance_scale": 1.0}, "guidance_scale", id="guidance-without-cfg"),
    pytest.param({"response_format": "url"}, "response_format", id="url-format"),
    pytest.param({"output_format": "jpeg"}, "output_format", id="jpeg"),
    pytest.param({"background": "transparent"}, "background", id="transparent"),
    pytest.param({"stream": True}, "stream", id="stream"),
    pytest.param({"colour": "red"}, "colour", id="unknown-field"),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_bad_input_is_a_400_naming_the_param(server: RemoteServer, body: dict[str, Any], param: str) -> None:
    error = assert_error(generate(server.url, **body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_missing_prompt_malformed_json_and_unknown_route(server: RemoteServer) -> None:
    missing = httpx.post(f"{server.url}/v1/images/generations", json={"n": 1})
    assert_error(missing, 400, "prompt")
    malformed = httpx.post(f"{server.url}/v1/images/generations", content=b'{"prompt": "a',
                           headers={"content-type": "application/json"})
    assert "not valid JSON" in assert_error(malformed, 400, None)["message"]
    for body in (b'{"prompt": "a \xff sun"}', b'{"prompt": "a", "n": ' + b"9" * 5000 + b"}", b"[" * 100_000):
        answer = httpx.post(f"{server.url}/v1/images/generations", content=body, headers={"content-type": "application/json"})
        assert "not valid JSON: send one JSON object encoded as UTF-8" in assert_error(answer, 400, None)["message"]
    assert "n=0 is not served: this server makes 1 to 2 images" in assert_error(generate(server.url, n=0), 400, "n")["message"]
    trailing = generate(server.url, size="64x64\n")
    assert 'size must be "WxH"' in assert_error(trailing, 400, "size")["message"]
    too_long = generate(server.url, prompt="red " * 40)
    assert f"at most {TEXT_LENGTH}" in too_long.json()["error"]["message"]
    assert_error(httpx.get(f"{server.url}/v1/nothing"), 404, None)


def test_a_lone_surrogate_is_a_400_naming_the_field(server: RemoteServer) -> None:
    for field in ("prompt", "negative_prompt"):
        body = {"prompt": "a red sun", field: "a\\ud800b"}
        raw = ("{" + ", ".join(f'"{key}": "{value}"' for key, value in body.items()) + "}").encode()
        response = httpx.post(f"{server.url}/v1/images/generations", content=raw,
                              headers={"content-type": "application/json"})
        assert "surrogate" in assert_error(response, 400, field)["message"]
    assert generate(server.url).status_code == 200


def test_oversized_input_is_refused_quickly_while_live_keeps_answering(server: RemoteServer) -> None:
    """413 from Content-Length (never read) or from the bytes of a chunked body, 400 over the character limit; no
    prompt is checked (tokenized) on the event loop, and /health/live answers every probe while they and generations
    are processed. (Where the checks ran is read from the server, not from how long probes took: that depends on
    the load of the machine.)"""
    url = f"{server.url}/v1/images/generations"
    huge = b'{"prompt": "' + b"x" * 5_000_000 + b'"}'
    headers = {"content-type": "application/json"}

    def chunked() -> Iterator[bytes]:
        for start in range(0, len(huge), 100_000):
            yield huge[start : start + 100_000]

    async def busy() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            # One generation: with --max-queue 2, two queued before the worker takes the first would leave
            # no room, and a long prompt would be a 429 before its checks (as it should), not the 400 tested.
            generation = client.post(url, json={"prompt": "a red sun", "seed": 0})
            long_prompts = [client.post(url, json={"prompt": "red blue " * 444}) for _ in range(4)]
            return await asyncio.gather(generation, *long_prompts)

    with LiveProbe(server.url) as probe:
        declared = httpx.post(url, content=huge, headers=headers, timeout=30)
        streamed = httpx.post(url, content=chunked(), headers=headers, timeout=30)
        parsed = httpx.post(url, content=b'{"prompt": "' + b"x" * 900_000 + b'"}', headers=headers, timeout=30)
        answers = asyncio.run(busy())
    assert f"{len(huge)} bytes" in assert_error(declared, 413, None)["message"]  # its length as declared: not read
    assert "at most 1048576 bytes" in assert_error(streamed, 413, None)["message"]
    assert "900000 characters" in assert_error(parsed, 400, "prompt")["message"]
    assert [answer.status_code for answer in answers] == [200, 400, 400, 400, 400]
    assert not probe.failures and len(probe.latencies) >= 20, probe.failures
    # Tokenizing these on the event loop would block it for as long: each prompt's checks ran on the admission thread.
    lengths = (900_000, len("red blue " * 444))  # the prompts' own: no other test sends these
    ran = wait_until(lambda: found if len(found := _checks_ran(server, lengths)) == 5 else None,
                     "the server's lines on the five prompts' checks")
    assert [where for _, where in ran] == ["off"] * 5, ran


def _checks_ran(server: RemoteServer, lengths: tuple[int, ...]) -> list[tuple[int, str]]:
    """(characters, "on" or "off" the event loop) of each prompt of one of `lengths` the server (FAULT_CLI) checked."""
    found = [CHECKS_RAN.match(line) for line in list(server.lines)]
    return [(int(match[1]), match[2]) for match in found if match and int(match[1]) in lengths]


# -- load, metrics, docs ------------------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after(server: RemoteServer) -> None:
    """Distinct guidance scales: nothing batches, so while the worker holds a call two of 12 requests fill the
    queue of 2 and ten overflow it. (Sent as they came, a fast worker could serve each before the next was checked.)"""
    bodies = [{"guidance_scale": 2.0 + i / 10} for i in range(12)]
    with ThreadPoolExecutor(len(bodies)) as pool, HeldWorker(server, guidance_scale=9.0) as held:
        sent = [pool.submit(generate, server.url, **body) for body in bodies]
        wait_until(lambda: sum(answer.done() for answer in sent) == 10 and queue_depth(server.url) == 2,
                   "ten refused and two queued")
        responses = [held.release(), *(answer.result() for answer in sent)]
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 3 + [429] * 10, statuses
    rejected = next(response for response in responses if response.status_code == 429)
    assert_error(rejected, 429, None)
    assert int(rejected.headers["retry-after"]) >= 1
    assert generate(server.url).status_code == 200  # postcondition: still serving


def test_metrics_expose_the_documented_series(server: RemoteServer) -> None:
    """Each series is there after the requests that feed it (made here: the test stands alone)."""
    too_large = 'catrt_requests_total{route="/v1/images/generations",status="413"}'
    refused_before = metric(server.url, too_large)
    oversized = b'{"prompt": "' + b"x" * 1_100_000 + b'"}'
    refused = httpx.post(f"{server.url}/v1/images/generations", content=oversized,
                         headers={"content-type": "application/json"}, timeout=30)
    assert_error(refused, 413, None)
    # Counted once the request's handling returned, which may come after its answer was sent.
    wait_until(lambda: metric(server.url, too_large) != refused_before, "the 413 is counted")
    assert metric(server.url, too_large) == refused_before + 1
    assert generate(server.url).status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        'catrt_requests_total{route="/v1/images/generations",status="200"}',
        'catrt_requests_total{route="/v1/images/generations",status="413"}',
        'catrt_request_latency_seconds_bucket{le="0.01",route="/v1/images/generations"}',
        "catrt_queue_depth 0.0",
        IMAGES_64,
        'catrt_step_seconds_count{kind="full",size="64x64"}',
        'catrt_step_seconds_count{kind="pruned",size="64x64"}',
        'catrt_batch_rows_bucket{le="1.0",size="64x64"}',
    ):
        assert name in text, name
    assert ("catrt_gpu_memory_used_bytes" in text) == torch.cuda.is_available()


def test_openapi_states_what_the_build_serves(server: RemoteServer) -> None:
    """The document's limits are the server's: values it states as valid are served, others refused."""
    document = httpx.get(f"{server.url}/openapi.json").json()
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    properties = openapi_request_schema(server.url)["properties"]
    first = {name: schema.get("anyOf", [schema])[0] for name, schema in properties.items()}
    assert first["size"]["enum"] == ["64x64", "auto"]
    assert (first["n"]["minimum"], first["n"]["maximum"]) == (1, 2)
    assert (first["guidance_scale"]["exclusiveMinimum"], first["guidance_scale"]["maximum"]) == (1.0, 100.0)
    assert first["steps"]["enum"] == [8]
    assert (first["prompt"]["minLength"], first["prompt"]["maxLength"]) == (1, 4000)
    assert str(TEXT_LENGTH) in first["prompt"]["description"]
    pattern = re.compile(first["prompt"]["pattern"])
    assert [bool(pattern.search(text)) for text in ("a red sun", "\ta\n", " \u200b ", "a\u0000", "\u0085")] == [
        True, True, False, False, False]
    # A negative prompt may be blank, never hold a control character (the server refuses U+0089 by name).
    negative = re.compile(first["negative_prompt"]["pattern"])
    assert [bool(negative.search(text)) for text in ("", " ", "blurry\n", "a\u0089b", "\u0000")] == [
        True, True, True, False, False]
    assert first["response_format"]["enum"] == ["b64_json"] and first["output_format"]["enum"] == ["png"]
    assert httpx.get(f"{server.url}/docs").status_code == 200
    # Boundary values of the document are served ...
    largest_seed = first["seed"]["maximum"]
    edges = [
        {"n": first["n"]["maximum"], "seed": largest_seed, "size": first["size"]["enum"][0],
         "steps": first["steps"]["enum"][0], "guidance_scale": math.nextafter(1.0, 2.0), "stream": False,
         "response_format": "b64_json", "output_format": "png", "background": "opaque"},
        {"n": first["n"]["minimum"], "seed": first["seed"]["minimum"], "size": "auto", "negative_prompt": "",
         "guidance_scale": first["guidance_scale"]["maximum"]},
    ]
    for body in edges:
        response = generate(server.url, **body)
        assert response.status_code == 200, (body, response.text)
    assert response.json()["catrt"]["seeds"] == [0]
    # ... and the values just past them are not.
    for body, param in (({"n": 3}, "n"), ({"seed": largest_seed + 1}, "seed"), ({"guidance_scale": 1.0}, "guidance_scale"),
                        ({"guidance_scale": math.nextafter(100.0, 101.0)}, "guidance_scale")):
        assert_error(generate(server.url, **body), 400, param)


# -- failures, timeouts, disconnects, read timeouts, SIGTERM (the fault server) ------------------


def test_a_failing_generation_answers_500_to_that_request_alone(faulty: RemoteServer) -> None:
    responses = asyncio.run(generate_all(faulty.url, [{"prompt": "sleep 0.3"}, {"prompt": "boom"}, {}], 0.05))
    assert [response.status_code for response in responses] == [200, 500, 200]
    error = assert_error(responses[1], 500, None)
    assert error["type"] == "server_error"
    request_id = responses[1].headers["x-request-id"]
    assert error["message"].startswith(f"internal error (request id {request_id}")
    assert "injected" not in responses[1].text and "RuntimeError" not in responses[1].text
    wait_until(lambda: any(request_id in line and "generation failed" in line for line in faulty.lines),
               f"the server logs request {request_id}'s failure:\n{faulty.output}")  # read from its output on a thread
    assert httpx.get(f"{faulty.url}/health/ready").status_code == 200


def test_a_guidance_that_overflows_the_image_is_a_400_to_that_request_alone(faulty: RemoteServer) -> None:
    """A NaN image is not answered as a black PNG: the request that asked for it gets a 400 naming its guidance.
    ("nan" makes the fault server's images NaN: no guidance up to the served maximum overflows a tiny fp32 model.)"""
    responses = asyncio.run(generate_all(faulty.url, [{"prompt": "nan", "guidance_scale": 100.0}, {}], 0.05))
    assert [response.status_code for response in responses] == [400, 200]
    error = assert_error(responses[0], 400, "guidance_scale")
    assert "guidance_scale 100 made the generation overflow" in error["message"]
    with Image.open(io.BytesIO(png(responses[1].json()["data"][0]["b64_json"]))) as image:
        assert image.size == (64, 64)


def test_a_guidance_past_the_served_maximum_is_refused_before_it_runs(faulty: RemoteServer) -> None:
    """1e308 is a number >= 0 the document once called valid; it overflowed the image. The document now states
    the maximum, and past it the request is refused at admission, naming the limit."""
    error = assert_error(generate(faulty.url, guidance_scale=1e308), 400, "guidance_scale")
    assert error["message"] == (
        "guidance_scale=1e+308 is not served: this server takes at most 100 (this model's default is 7); ask for a smaller one")


def test_a_request_past_the_timeout_answers_504_and_its_work_is_dropped() -> None:
    """The queued request is dropped before its batch, the running one before its next step: no images. On a server of
    its own with a --timeout of 2 s (its --hang-grace outlasts the test): the running call is held past its request's
    deadline, the request queued behind it answered at its own; once the worker takes the next request it is past
    both, and no image was made. (The next request's answer is not asked for: a loaded machine may take 2 s for it.)"""
    timed = RemoteServer(FAULT_CLI, _faulty_args(timeout=2, hang_grace=WAIT_SECONDS))
    try:
        start_all({"timed": timed})
        images = metric(timed.url, IMAGES_64)
        with HeldWorker(timed) as held:
            queued = generate(timed.url, guidance_scale=2.0)
            slow = held.answer()
        assert assert_error(slow, 504, None)["type"] == "timeout_error"
        assert_error(queued, 504, None)
        with HeldWorker(timed, "next"):  # taken: the worker went on past the abandoned call and the dropped request
            assert metric(timed.url, IMAGES_64) == images
        assert "never retrieved" not in timed.output  # the abandoned call's outcome logs no asyncio error
    finally:
        stop_all({"timed": timed})


def _raw_request(body: dict[str, Any]) -> bytes:
    """An images request as sent bytes, for a client that leaves (closes its socket) when the test says."""
    content = json.dumps(body).encode()
    return (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(content)) + content


def _address(server: RemoteServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def _served_once_the_held_call_returns(server: RemoteServer) -> httpx.Response:
    """A new request's answer once the worker's held call, whose requests were all given up, has returned: until then
    (from --hang-grace after they were given up) the worker counts as stuck, and a request is a 503 saying so."""
    def answered() -> httpx.Response | None:
        answer = generate(server.url)
        return None if answer.status_code == 503 and "stuck in a model call" in answer.text else answer

    return wait_until(answered, "the held call returned")


def test_a_client_that_leaves_does_not_leave_its_work_queued(faulty: RemoteServer) -> None:
    """A request whose client left while it waited behind the call in flight is dropped before its batch, and that
    call's request, whose client left too, stops before its next step: neither makes an image."""
    disconnects = 'catrt_requests_cancelled_total{reason="disconnect"}'
    images, left = metric(faulty.url, IMAGES_64), metric(faulty.url, disconnects)
    held = hold_file(faulty, "left")
    taken = taken_mark(held)
    held.touch()
    try:
        with socket.create_connection(_address(faulty)) as running:
            running.sendall(_raw_request({"prompt": "wait left"}))
            wait_until(taken.exists, "the worker took the first request")
            with socket.create_connection(_address(faulty)) as queued:
                queued.sendall(_raw_request({"prompt": "a red sun", "guidance_scale": 2.0}))
                wait_until(lambda: queue_depth(faulty.url) == 1, "the second request waits")
        wait_until(lambda: metric(faulty.url, disconnects) == left + 2, "the server saw both clients leave")
    finally:
        held.unlink(missing_ok=True)
    taken.unlink()
    assert _served_once_the_held_call_returns(faulty).status_code == 200
    assert metric(faulty.url, IMAGES_64) == images + 1


def _health_until(url: str, route: str, status: int) -> httpx.Response:
    """GET `route` until it answers `status`."""
    def answered() -> httpx.Response | None:
        answer = httpx.get(f"{url}{route}", timeout=WAIT_SECONDS)
        return answer if answer.status_code == status else None

    return wait_until(answered, f"{route} answers {status}")


def test_a_step_that_never_returns_turns_liveness_503_until_it_returns(faulty: RemoteServer) -> None:
    """A hung step kept /health/live at 200, so Kubernetes never restarted the pod while each request waited out its
    504. Once its request has left, a call still in its step --hang-grace (1.5 s) later is hung: liveness and
    readiness answer 503 naming why, a new request 503 at once; once the step returns the server serves again."""
    held = hold_file(faulty, "hung")
    taken = taken_mark(held)
    held.touch()
    try:
        with socket.create_connection(_address(faulty)) as client:  # the client leaves once its step holds; it goes on
            client.sendall(_raw_request({"prompt": "block hung"}))
            wait_until(taken.exists, "the request's first step holds")
        live = _health_until(faulty.url, "/health/live", 503).json()
        assert live["status"] == "hung" and "past --hang-grace 1.5 s" in live["reason"], live
        ready = httpx.get(f"{faulty.url}/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "hung", ready.text
        refused = assert_error(generate(faulty.url), 503, None)
        assert refused["message"] == "the server's worker is stuck in a model call; retry later"
    finally:
        held.unlink()
    taken.unlink()
    assert _health_until(faulty.url, "/health/live", 200).json() == {"status": "live"}  # hung until the call returns
    assert httpx.get(f"{faulty.url}/health/ready").status_code == 200
    assert generate(faulty.url).status_code == 200
    wait_until(lambda: "the worker is still in one model call" in faulty.output, "the server's log says so too")


HALF_REQUESTS = [
    pytest.param(b"", id="idle-connection"),
    pytest.param(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Ty", id="half-headers"),
]
HALF_BODIES = [
    pytest.param(b"Content-Length: 100\r\n\r\n{\"prompt\": \"a", id="content-length-longer-than-the-body"),
    pytest.param(b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n", id="chunked-withheld"),
]


def _answer_at_the_read_timeout(server: RemoteServer, sent: bytes) -> bytes:
    """All the server writes to a connection that sends `sent` and then nothing, up to its close; the server must
    close it itself (a connection held open ends in a socket timeout here), not before the read timeout."""
    answer = b""
    started = time.perf_counter()  # before the connection: the server's deadline cannot start earlier
    with socket.create_connection(_address(server), timeout=WAIT_SECONDS) as sock:
        sock.sendall(sent)
        while chunk := sock.recv(65536):
            answer += chunk
        waited = time.perf_counter() - started
    assert READ_TIMEOUT * 0.9 <= waited, waited
    return answer


@pytest.mark.parametrize("sent", HALF_REQUESTS)
def test_a_connection_short_of_a_whole_request_is_closed_after_the_read_timeout(faulty: RemoteServer, sent: bytes) -> None:
    assert _answer_at_the_read_timeout(faulty, sent) == b""  # no request to answer: closed
    assert generate(faulty.url).status_code == 200


@pytest.mark.parametrize("rest", HALF_BODIES)
def test_a_request_short_of_its_body_is_answered_408_at_the_read_timeout(faulty: RemoteServer, rest: bytes) -> None:
    """Its headers came whole, so there is a request to answer: a 408 in OpenAI's error body naming the read timeout,
    with its request id, then the close (it was a close with no answer, which a client reads as a dropped connection).
    The request metrics count it as the 408 it was answered (they counted the app's view: a client that left, 499)."""
    head = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    counted = {status: _requests_counted(faulty, status) for status in ("408", "499")}
    answer = _answer_at_the_read_timeout(faulty, head + rest)
    status, _, rest_of_answer = answer.partition(b"\r\n")
    headers, _, body = rest_of_answer.partition(b"\r\n\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout", answer
    lines = headers.lower().split(b"\r\n")
    assert b"connection: close" in lines and any(line.startswith(b"x-request-id: ") for line in lines), answer
    error = json.loads(body)["error"]
    assert (error["type"], error["param"], error["code"]) == ("timeout_error", None, "408")
    assert f"within the read timeout of {READ_TIMEOUT:g} s (--read-timeout)" in error["message"]
    wait_until(lambda: _requests_counted(faulty, "408") != counted["408"],  # once the app has seen the client leave
               "the 408 is counted")
    assert {status: _requests_counted(faulty, status) for status in ("408", "499")} == {
        "408": counted["408"] + 1, "499": counted["499"]}
    assert generate(faulty.url).status_code == 200


def _requests_counted(server: RemoteServer, status: str) -> float:
    """`catrt_requests_total` of the images route and `status`, from the server's /metrics."""
    series = f'catrt_requests_total{{route="/v1/images/generations",status="{status}"}} '
    lines = [line for line in httpx.get(f"{server.url}/metrics", timeout=WAIT_SECONDS).text.splitlines()
             if line.startswith(series)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_a_trickled_request_is_closed_at_the_read_timeout(faulty: RemoteServer) -> None:
    """Bytes that keep coming do not move the deadline (one byte every 0.2 s): the connection is closed (a write fails)
    long before the whole request, which would take 2 minutes, came."""
    request = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * 560 + b"\r\n\r\n"
    with socket.create_connection(_address(faulty), timeout=WAIT_SECONDS) as sock, pytest.raises(OSError):
        for byte in request:
            sock.sendall(bytes([byte]))
            time.sleep(0.2)


def test_connections_ended_every_way_leave_no_descriptor_or_thread_behind(faulty: RemoteServer) -> None:
    """A server runs for weeks: clients that leave mid-generation or mid-body, stall to the read timeout, pipeline or
    time out leave the process's open files and threads (read from /proc) as they were."""
    pid = faulty.process.pid
    address = _address(faulty)

    def counts() -> tuple[int, int]:
        return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))

    assert generate(faulty.url).status_code == 200  # the admission thread and every lazy start behind us
    before = counts()
    request = _raw_request({"prompt": "sleep 0.2"})
    for _ in range(3):
        with socket.create_connection(address) as generating:  # leaves while its request runs or waits
            generating.sendall(request)
            time.sleep(0.1)  # only a chance for its request to start: whenever it leaves, it leaves nothing behind
        with socket.create_connection(address) as half:  # leaves mid-body
            half.sendall(request[:-3])
    stalled, pipelined = socket.create_connection(address), socket.create_connection(address)
    stalled.sendall(request[:-3])  # answered 408 and closed at the read timeout
    pipelined.sendall(request * 2)
    with pytest.raises(httpx.ReadTimeout):  # its answer takes 0.2 s at least
        httpx.post(f"{faulty.url}/v1/images/generations", json={"prompt": "sleep 0.2"},
                   timeout=httpx.Timeout(WAIT_SECONDS, read=0.1))
    time.sleep(READ_TIMEOUT + 0.5)  # only a chance for the 408: closed before it, `stalled` is one more client leaving
    stalled.close()
    pipelined.close()
    # fewer: a connection of an earlier test closed since
    wait_until(lambda: _none_above(counts(), before), f"no more descriptors and threads than {before}", interval=0.1)
    assert generate(faulty.url).status_code == 200


def _none_above(counts: tuple[int, ...], limits: tuple[int, ...]) -> bool:
    return all(count <= limit for count, limit in zip(counts, limits, strict=True))


def test_sigterm_finishes_the_request_in_flight_refuses_the_rest_and_exits_0(faulty: RemoteServer) -> None:
    """The request in flight is held until a request is queued behind it, the server drains and a late request came."""
    with ThreadPoolExecutor(1) as pool, HeldWorker(faulty) as held:
        queued = pool.submit(generate, faulty.url, guidance_scale=2.0)
        wait_until(lambda: queue_depth(faulty.url) == 1, "a request waits behind the one in flight")
        faulty.process.send_signal(signal.SIGTERM)
        assert _health_until(faulty.url, "/health/ready", 503).json()["status"] == "draining"
        late = generate(faulty.url)
        in_flight = held.release()
    assert in_flight.status_code == 200 and len(in_flight.json()["data"]) == 1
    assert_error(queued.result(), 503, None)
    assert_error(late, 503, None)
    assert faulty.process.wait(timeout=WAIT_SECONDS) == 0


def test_a_folder_that_is_not_a_build_fails_to_start(tmp_path: Path) -> None:
    result = run_cli(["serve", "--engines", str(tmp_path), "--port", "0"])
    assert_one_line_refusal(result, "manifest.json is missing")
    assert "listening" not in result.stderr


def test_a_corrupt_bundle_is_refused_before_the_server_says_it_listens(tmp_path: Path) -> None:
    """The worker loads after the server starts: a bundle `catrt.load` refuses (here an edited manifest) printed
    "listening on ..." before its refusal, so for a moment it looked served."""
    bundle = build_engines(BuildConfig("reference", height=32, width=32, batch=1, steps=3, t0=2, backend="eager"),
                           out_dir=tmp_path / "engines", export_dir=tmp_path / "export", progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["alphas"][0]["k"] = 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(["serve", "--engines", str(bundle), "--port", "0"])
    assert_one_line_refusal(result, "manifest.json alphas[0].k is 1")
    assert "listening" not in result.stderr and "rebuild the engine" in result.stderr


def test_a_bundle_whose_model_folder_is_gone_is_refused_before_the_server_says_it_listens(tmp_path: Path) -> None:
    """It was refused by the worker after "listening on ...", as an unknown model the command never named."""
    load_pipeline("reference").save_pretrained(tmp_path / "model")
    bundle = build_engines(BuildConfig(str(tmp_path / "model"), height=32, width=32, batch=1, steps=3, t0=2, backend="eager"),
                           out_dir=tmp_path / "engines", export_dir=tmp_path / "export", progress=False)
    (tmp_path / "model").rename(tmp_path / "moved")
    result = run_cli(["serve", "--engines", str(bundle), "--port", "0"])
    assert_one_line_refusal(result, f"was built from model '{tmp_path / 'model'}' (build.model in its manifest), which is "
                                    "neither a catrt model name nor a diffusers folder here")
    assert "listening" not in result.stderr


def test_eager_alphas_selecting_the_same_k_are_refused_before_listening() -> None:
    """0.3 and 0.2999 both select 77 of the reference model's 256 tokens: the same pruned steps under two alphas
    (two metric labels, an adaptive policy choosing between equal costs). The model's card gives N before binding."""
    result = run_cli(["serve", "--model", "reference", "--alpha", "0.3", "0.2999", "--steps", "3", "--t0", "2", "--port", "0"])
    assert_one_line_refusal(result, "--alpha 0.3 and 0.2999 both select k = 77 of the 256 image tokens at 32x32, "
                                    "so they would run the same pruned steps: drop one")
    assert "listening" not in result.stderr


def test_eager_alphas_selecting_the_same_k_are_refused_once_a_model_without_a_card_loads() -> None:
    config = ServeConfig(model="tiny-sd3", height=64, width=64, steps=3, cat=CATConfig(alpha=0.5, t0=2), alphas=(0.5, 0.3, 0.26))
    with pytest.raises(ConfigError, match=r"^--alpha 0\.3 and 0\.26 both select k = 5 of the 16 image tokens at 64x64") as caught:
        load_served_model(config)
    assert caught.value.field == "alpha"


def test_a_size_the_model_cannot_take_is_refused_as_such_before_its_alphas_are_counted() -> None:
    """From Python (no CLI size check first), 1 pixel high is 0 tokens: refused as a size, not as two alphas of k = 0."""
    from catrt.serve.server import check_source_of

    config = ServeConfig(model="reference", height=1, width=32, steps=3, cat=CATConfig(alpha=0.3, t0=2), alphas=(0.3, 0.2))
    with pytest.raises(ConfigError, match=r"^height 1 does not fit model reference, which takes multiples of 2"):
        check_source_of(config)
