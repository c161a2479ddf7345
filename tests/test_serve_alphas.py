"""A real `catrt serve` subprocess serving two alphas: the adaptive policy under light load and a burst,
pinned requests, the chosen alpha in every response and in /metrics.

The server runs tiny-sd3 with a fixed extra delay inside every transformer step (the same trick as
test_serve.py's fault server: the launcher patches the runtime in the server's own process), 10 ms
per full step and 150 ms x k / N per pruned step, so a call's time depends on alpha as on a real
model and far more than on this machine's load: about 0.6 s at alpha 0.8 and 0.2 s at 0.2, against a
latency target of 1.5 s. One request alone fits at 0.8; a burst of eight cannot fit at any alpha.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import pytest
import httpx
from test_serve_support import RemoteServer, assert_error, generate, generate_all, openapi_request_schema, stop_all

SLOW_LAUNCHER = """
import sys, time
from catrt.runtime import CATRuntime
run = CATRuntime._run
def slowed(self, kind):
    time.sleep(0.01 if kind == "full" else 0.15 * self.k / self.grid.num_tokens)
    return run(self, kind)
CATRuntime._run = slowed
from catrt.cli import main
sys.exit(main(sys.argv[1:]))
"""
SERVE = ["--model", "tiny-sd3", "--height", "64", "--width", "64", "--steps", "8", "--t0", "4", "--batch", "1",
         "--alpha", "0.8", "0.2", "--alpha-policy", "adaptive", "--latency-target", "1.5", "--max-queue", "16",
         "--timeout", "60"]


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    started = RemoteServer([sys.executable, "-c", SLOW_LAUNCHER], SERVE)
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
    responses = asyncio.run(generate_all(server.url, burst))
    alphas = [_alpha(response) for response in responses]
    assert 0.2 in alphas[:8], alphas  # the queue could not be served in time at 0.8
    assert alphas[8] == 0.8  # pinned: honoured under load
    assert _alpha(generate(server.url, prompt="a red circle", seed=1)) == 0.8  # load gone: best quality again
    assert _alpha(generate(server.url, prompt="a red circle", seed=1, alpha=0.2)) == 0.2  # pinned under light load
    assert _chosen(server.url, "0.8") == alphas.count(0.8) + 2  # one per model call (batch 1), warm-up not counted
    assert _chosen(server.url, "0.2") == alphas.count(0.2) + 1


def test_an_alpha_the_server_does_not_serve_is_a_400_listing_the_served_ones(server: RemoteServer) -> None:
    error = assert_error(generate(server.url, prompt="a red circle", alpha=0.5), 400, "alpha")
    assert "alpha=0.5 is not served: this server serves alpha 0.8, 0.2" in error["message"]
    error = assert_error(generate(server.url, prompt="a red circle", alpha=0.2 + 1e-12), 400, "alpha")
    assert f"alpha={0.2 + 1e-12!r} is not served" in error["message"]  # never shown as a served 0.2
    assert_error(generate(server.url, prompt="a red circle", alpha="0.8"), 400, "alpha")  # a string is no alpha
    schema = openapi_request_schema(server.url)["properties"]["alpha"]
    assert schema["anyOf"][0] == {"type": "number", "enum": [0.8, 0.2]}
