"""A real `catrt serve` subprocess serving two alphas: the adaptive policy under light load and a burst,
pinned requests, the chosen alpha in every response and in /metrics.

The server runs tiny-sd3 with each call's step times set, as the policy reads them from the call's phases, to
0.1 s per full step and 1.5 s x alpha per pruned one (the launcher patches the served model in the server's own
process; no step waits), so a call's time depends on alpha as on a real model and not on this machine's load:
5.2 s at alpha 0.8 and 1.6 s at 0.2, against a latency target of 15 s. One request alone fits at 0.8 (as long
as it waited under 9.8 s for its call); three waiting do not fit at 0.8, so the burst's first calls run at 0.2 (the
smallest alpha: it fits there, or at none). The burst is queued while the worker holds a call (`FAULT_CLI`'s cue),
so the policy sees all of it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import httpx
from test_serve_support import (
    FAULT_CLI,
    HeldWorker,
    RemoteServer,
    assert_error,
    generate,
    openapi_request_schema,
    queue_depth,
    stop_all,
    wait_until,
)

TIMED_STEPS = """
from catrt.serve.model import ServedModel
served_generate = ServedModel.generate
def timed(self, rows, options, should_stop=None, alpha=None):
    generation = served_generate(self, rows, options, should_stop, alpha)
    pruned = self.spec.alpha if alpha is None else alpha
    generation.phases.update(encode=0.0, decode=0.0, full_steps=4 * 0.1, pruned_steps=4 * 1.5 * pruned)
    return generation
ServedModel.generate = timed
"""
LAUNCHER = [sys.executable, "-c", TIMED_STEPS + FAULT_CLI[2]]
SERVE = ["--model", "tiny-sd3", "--height", "64", "--width", "64", "--steps", "8", "--t0", "4", "--batch", "1",
         "--alpha", "0.8", "0.2", "--alpha-policy", "adaptive", "--latency-target", "15", "--max-queue", "16",
         "--timeout", "120"]


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    started = RemoteServer(LAUNCHER, SERVE)
    try:
        started.wait_ready()
        yield started
    finally:
        stop_all({"adaptive": started})


def _chosen(url: str, alpha: str) -> float:
    """The value of catrt_alpha_chosen_total{alpha="<alpha>"} (0 while absent)."""
    series = f'catrt_alpha_chosen_total{{alpha="{alpha}"}} '
    lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(series)]
    return float(lines[0].split()[-1]) if lines else 0.0


def _alpha(response: httpx.Response) -> float:
    assert response.status_code == 200, response.text
    return response.json()["catrt"]["alpha"]


def test_light_load_gets_the_largest_alpha_and_a_burst_the_smallest(server: RemoteServer) -> None:
    assert _alpha(generate(server.url, prompt="a red circle", seed=1)) == 0.8
    burst = [{"prompt": f"a red circle {index}", "seed": index} for index in range(8)]
    burst.append({"prompt": "a pinned circle", "seed": 9, "alpha": 0.8})
    with ThreadPoolExecutor(len(burst)) as pool, HeldWorker(server, seed=10) as held:
        sent = [pool.submit(generate, server.url, **body) for body in burst]
        wait_until(lambda: queue_depth(server.url) == len(burst), "the burst waits behind the held call")
        blocker = _alpha(held.release())
        alphas = [_alpha(answer.result()) for answer in sent]
    assert blocker == 0.8  # alone in the queue when its call was made
    assert 0.2 in alphas[:8], alphas  # the queue could not be served in time at 0.8
    assert alphas[8] == 0.8  # pinned: honoured under load
    assert _alpha(generate(server.url, prompt="a red circle", seed=1)) == 0.8  # load gone: best quality again
    assert _alpha(generate(server.url, prompt="a red circle", seed=1, alpha=0.2)) == 0.2  # pinned under light load
    assert _chosen(server.url, "0.8") == alphas.count(0.8) + 3  # one per model call (batch 1), warm-up not counted
    assert _chosen(server.url, "0.2") == alphas.count(0.2) + 1


def test_an_alpha_the_server_does_not_serve_is_a_400_listing_the_served_ones(server: RemoteServer) -> None:
    error = assert_error(generate(server.url, prompt="a red circle", alpha=0.5), 400, "alpha")
    assert "alpha=0.5 is not served: this server serves alpha 0.8, 0.2" in error["message"]
    error = assert_error(generate(server.url, prompt="a red circle", alpha=0.2 + 1e-12), 400, "alpha")
    assert f"alpha={0.2 + 1e-12!r} is not served" in error["message"]  # never shown as a served 0.2
    assert_error(generate(server.url, prompt="a red circle", alpha="0.8"), 400, "alpha")  # a string is no alpha
    schema = openapi_request_schema(server.url)["properties"]["alpha"]
    assert schema["anyOf"][0] == {"type": "number", "enum": [0.8, 0.2]}
