"""`catrt serve --ray`: the images API as a Ray Serve application on a local Ray cluster (CPU).

Ray starts once for the module (2 CPUs, a small object store) with 2 model replicas of the eager
tiny-sd3 at 64x64, 8 steps (each holding a "wait NAME" prompt on cue, `_CuedReplica`); the last test shuts it down
and checks no process is left. The CLI's refusals around `--ray` run without starting Ray.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import ray
import torch
from prometheus_client.parser import text_string_to_metric_families
from ray import cloudpickle, serve
from ray.serve._private.common import DeploymentID, ReplicaID
from test_serve_support import (
    WAIT_SECONDS,
    assert_error,
    assert_one_line_refusal,
    generate,
    metric,
    openapi_request_schema,
    run_cli,
    server_env,
    wait_until,
)

import catrt
from catrt.config import CATConfig
from catrt.errors import ConfigError, ServiceUnavailableError
from catrt.serve.config import FleetConfig, ServeConfig
from catrt.serve.ray_app import (APP_NAME, MODEL_DEPLOYMENT, PROXY_GRACE_SECONDS, ModelReplica, application, build,
                                 http_options, logging_config)

pytestmark = pytest.mark.timeout(240)

MIB = 1 << 20
KEY = "fleet-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
READ_TIMEOUT = 2.0  # seconds; the requests of these tests arrive whole at once


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999) and above Ray's worker ports (10002-19999): Ray's
    processes, started between this choice and the proxy's bind, take ports from both, and one took the port the
    kernel handed out here (the proxy then failed with "Failed to bind to address")."""
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-31999")


def _descendants(root: int) -> set[int]:
    """Every live process below `root`, from /proc (zombies excluded)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _cue(name: str) -> Path:
    """The file whose existence holds the fleet's "wait NAME" requests (`_CuedReplica`)."""
    return Path(tempfile.gettempdir()) / f"catrt-ray-cue-{os.getpid()}-{name}"


class _CuedReplica(ModelReplica):
    """The fleet's model replica, which holds a request whose prompt is "wait NAME" while the file `_cue(NAME)` exists
    (before its worker sees it, so it holds one of the replica's --max-queue places in Ray), as the fault server holds
    its worker: tests fill the fleet on cue, not by guessing how fast this machine generates."""

    cues = str(_cue(""))  # the driver's paths, sent with the class

    async def generate(self, body: dict, request_id: str) -> dict:
        if str(body.get("prompt", "")).startswith("wait "):
            while os.path.exists(self.cues + body["prompt"].split()[1]):
                await asyncio.sleep(0.02)
        return await super().generate(body, request_id)


# Ray's workers cannot import this module (pytest puts tests/ on the path, Ray's workers do not): Ray sends what it
# needs of it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def fleets() -> Iterator[list[str]]:
    """The URLs of the fleets `fleet` started; Ray and Serve stop at the end (or in `test_shutdown_is_clean`)."""
    urls: list[str] = []
    try:
        yield urls
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()


@pytest.fixture
def fleet(fleets: list[str]) -> str:
    """The application's URL: the module's fleet, started at its first use, and again where `test_shutdown_is_clean`
    has stopped it (tests may run in any order: in another, every fleet test after that one found no Ray)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=100 * MIB, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        port = _free_port()
        config = ServeConfig(model="tiny-sd3", height=64, width=64, steps=8, cat=CATConfig(t0=4), port=port,
                             timeout=60, max_body_bytes=8192, max_queue=2, api_key=KEY, read_timeout=READ_TIMEOUT)
        serve.start(http_options=http_options(config), logging_config=logging_config())  # as `catrt serve --ray` starts it
        with pytest.MonkeyPatch.context() as patched:
            patched.setattr("catrt.serve.ray_app.ModelReplica", _CuedReplica)
            app = application(config, FleetConfig(replicas=2), gpus=False)
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config=logging_config())
        fleets.append(f"http://127.0.0.1:{port}")
    return fleets[-1]


def _replicas_of(url: str, count: int) -> list[str]:
    """`count` concurrent requests with the OpenAI client; the replica id of each."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=60, max_retries=0)

    def one(seed: int) -> str:
        result = client.images.generate(prompt="a red sun", size="64x64", extra_body={"seed": seed})
        assert len(result.data) == 1 and result.size == "64x64"
        return result.model_extra["catrt"]["replica"]

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_requests_succeed_on_both_replicas(fleet: str) -> None:
    seen: set[str] = set()
    for _ in range(30):  # rounds end once both answered: six left a 1 in 2,000 chance of one replica taking all
        seen |= set(_replicas_of(fleet, 2))  # within --max-queue 2: Ray counts requests being routed as queued
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen
    ready = httpx.get(f"{fleet}/health/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "sizes": ["64x64"]}
    text = httpx.get(f"{fleet}/metrics").text
    for replica in seen:
        assert f'catrt_replica_answers_total{{replica="{replica}",status="200"}}' in text
        assert f'catrt_replica_images_generated_total{{replica="{replica}",size="64x64"}}' in text
    assert 'catrt_requests_total{route="/v1/images/generations",status="200"}' in text
    steps = {sample.labels["replica"] for family in text_string_to_metric_families(text) for sample in family.samples
             if sample.name == "catrt_step_seconds_count" and sample.labels["kind"] == "pruned"}
    assert steps == seen  # each replica's own series, brought by its answers


def test_the_ingress_checks_requests_as_the_single_server_does(fleet: str) -> None:
    for headers in (None, {"Authorization": "Bearer wrong"}):  # the ingress checks the key
        refused = assert_error(generate(fleet, headers=headers), 401, None)
        assert "key" in refused["message"]
    unserved = assert_error(generate(fleet, headers=AUTH, size="128x128"), 400, "size")  # checked by a replica's rules
    assert "this server serves 64x64" in unserved["message"]
    assert_error(generate(fleet, headers=AUTH, colour="red"), 400, "colour")  # the ingress's schema
    assert_error(generate(fleet, headers=AUTH, n=2), 400, "n")
    too_big = httpx.post(f"{fleet}/v1/images/generations", content=b"x" * 9000,
                         headers={"content-type": "application/json", **AUTH})
    assert_error(too_big, 413, None)
    assert too_big.headers["x-request-id"]
    first = {name: schema.get("anyOf", [schema])[0] for name, schema in openapi_request_schema(fleet)["properties"].items()}
    assert first["size"]["enum"] == ["64x64", "auto"] and first["steps"]["enum"] == [8]
    assert httpx.get(f"{fleet}/health/live").json() == {"status": "live"}


def test_a_body_that_stalls_is_a_408_and_its_connection_closed(fleet: str) -> None:
    """Ray Serve's proxy has no read deadline: the ingress answers a body not whole within --read-timeout
    408 in OpenAI's body, with `Connection: close`, and the proxy closes the connection (a slow-loris
    client holds it for --read-timeout, not forever). A client's `x-request-timeout-seconds: 0`, which
    lifts the proxy's own limit, does not lift the ingress's."""
    host, port = fleet.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_SECONDS) as connection:
        connection.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                           + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
                           + b"x-request-timeout-seconds: 0\r\n\r\n{\"prom")
        answer = b""
        while chunk := connection.recv(65536):  # until the proxy closes the connection
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    error = json.loads(body)["error"]
    assert error["code"] == "408" and f"within {READ_TIMEOUT:g} s" in error["message"]
    assert httpx.get(f"{fleet}/health/live").status_code == 200


def test_the_proxy_gets_the_servers_time_limits() -> None:
    options = http_options(ServeConfig(model="reference", host="0.0.0.0", port=8123, read_timeout=3, timeout=30,
                                       keep_alive=2.5))
    assert options == {"host": "0.0.0.0", "port": 8123, "request_timeout_s": 33 + PROXY_GRACE_SECONDS,
                       "keep_alive_timeout_s": 3}


def test_the_fleet_takes_its_capacity_at_once_and_answers_one_more_429(fleet: str) -> None:
    """2 replicas of --max-queue 2: 2 requests at each and 2 waiting in the ingress are taken, all at once (Ray's own
    bound refused some of such a burst while its probes of the replicas lagged); the next is a 429 with Retry-After.
    The 6 are held on cue until the 7th has its answer."""
    wait_until(lambda: metric(fleet, "catrt_fleet_capacity", AUTH) == 6, "the ingress counts both replicas")
    cue = _cue("ray429")
    cue.touch()
    with ThreadPoolExecutor(6) as pool:
        try:
            burst = [pool.submit(generate, fleet, AUTH, prompt="wait ray429", seed=seed) for seed in range(6)]
            wait_until(lambda: metric(fleet, "catrt_fleet_in_flight", AUTH) == 6
                       or any(answer.done() for answer in burst), "the burst is in flight", interval=0.1)
            early = [answer.result().text for answer in burst if answer.done()]
            assert not early, early  # held on cue: an answer now is a refusal
            refused = generate(fleet, headers=AUTH, seed=6)
        finally:
            cue.unlink(missing_ok=True)  # the replicas go on (a failed test leaves none held)
        statuses = [answer.result().status_code for answer in burst]
    assert statuses == [200] * 6, statuses
    error = assert_error(refused, 429, None)
    assert error["message"] == "every model replica is busy and 2 requests wait; retry later"
    assert refused.headers["retry-after"] == "1"
    assert metric(fleet, "catrt_fleet_in_flight", AUTH) == 0


def test_the_kuberay_builder_takes_serve_and_fleet_args(fleet: str) -> None:
    """`catrt.serve.ray_app:build`, as a RayService's import_path names it: bad args are catrt's one-line errors."""
    assert isinstance(build({"serve": {"engines": ["/models/a"], "max_queue": 4}, "fleet": {"replicas": 3}}),
                      serve.Application)
    with pytest.raises(ConfigError, match="give both --min-replicas and --max-replicas"):
        build({"serve": {"model": "tiny-sd3"}, "fleet": {"replicas": None, "min_replicas": 2}})


@pytest.mark.parametrize(("args", "needle"), [
    ({"serve": {"model": "tiny-sd3", "replicas": 2}}, "serve has no setting replicas; the settings are engines, model"),
    ({"serve": {"model": "tiny-sd3"}, "fleet": {"replica": 2}}, "fleet has no setting replica; the settings are replicas"),
    ({"serve": {"model": "tiny-sd3"}, "flet": {"replicas": 2}}, "the builder's args are"),
    ({"serve": ["tiny-sd3"]}, "serve must be a mapping of settings, got list"),
])
def test_the_kuberay_builder_names_a_misspelt_setting(args: dict, needle: str) -> None:
    """A misspelt setting was a TypeError (unexpected keyword argument), or, at the top level, silently ignored."""
    with pytest.raises(ConfigError) as caught:
        build(args)
    assert needle in str(caught.value)


def test_min_and_max_replicas_alone_autoscale_and_nothing_is_one_replica() -> None:
    """`FleetConfig(min_replicas=1, max_replicas=4)` (a KubeRay `fleet: {min_replicas: 1, max_replicas: 4}`) was
    refused with "--replicas fixes the replica count; drop it", a --replicas nobody gave: it defaulted to 1."""
    def model_deployment(fleet: FleetConfig):  # noqa: ANN202
        return application(ServeConfig(model="reference"), fleet, gpus=False)._bound_deployment.init_args[1]._bound_deployment

    autoscaled = model_deployment(FleetConfig(min_replicas=1, max_replicas=4))._deployment_config.autoscaling_config
    assert (autoscaled.min_replicas, autoscaled.max_replicas) == (1, 4)
    assert FleetConfig().replicas == 1 and model_deployment(FleetConfig()).num_replicas == 1
    with pytest.raises(ConfigError, match="^--replicas fixes the replica count"):
        FleetConfig(replicas=2, min_replicas=1, max_replicas=4)


def _metric_replicas(url: str) -> set[str]:
    """The `replica` labels on the fleet's /metrics (the ingress's own per-replica series and the replicas' own)."""
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    return {sample.labels["replica"] for family in text_string_to_metric_families(text) for sample in family.samples
            if "replica" in sample.labels}


def test_a_killed_replica_is_replaced_and_later_requests_succeed(fleet: str) -> None:
    before = set(_replicas_of(fleet, 2))
    victim = sorted(before)[0]
    assert victim in _metric_replicas(fleet)
    name = ReplicaID(victim, DeploymentID(name=MODEL_DEPLOYMENT, app_name=APP_NAME)).to_full_id_str()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    replaced, statuses = False, []
    deadline = time.monotonic() + 150
    while not replaced and time.monotonic() < deadline:
        for response in [generate(fleet, headers=AUTH, seed=seed) for seed in range(3)]:
            statuses.append(response.status_code)
            if response.status_code == 200:
                replaced |= response.json()["catrt"]["replica"] not in before
            else:  # while Ray notices the kill: an OpenAI error body, never a hang or a crash
                assert_error(response, response.status_code, None)
                assert response.status_code in (503, 504), response.text
        time.sleep(0.5)
    assert replaced, statuses
    now = set(_replicas_of(fleet, 2))
    assert victim not in now
    # Its series leave /metrics once Ray Serve no longer lists it (they stayed until the ingress restarted); the
    # live replicas' stay.
    deadline = time.monotonic() + 60
    while victim in (labelled := _metric_replicas(fleet)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert victim not in labelled and now <= labelled, (victim, labelled)


def test_each_replicas_state_reaches_the_router_of_a_handle_to_the_model_deployment(fleet: str) -> None:
    """Serve's controller asks each model replica for its routing stats (`record_routing_stats`) and hands them to
    every handle's router, here one made in this process: catrt's router, holding each replica's state. (Reads Ray
    Serve's private router attributes: the public API shows neither.)"""
    from catrt.serve.ray_app import ReadyFirstRouter
    from catrt.serve.router_states import replica_states

    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, APP_NAME)
    assert handle.describe.remote().result(timeout_s=30)["status"] == "ready"  # the handle's router has started
    router = getattr(handle._router, "_asyncio_router", handle._router).request_router
    assert isinstance(router, ReadyFirstRouter)
    deadline = time.monotonic() + WAIT_SECONDS
    ready = {"status": "ready", "reason": None, "sizes": ["64x64"]}
    while (stats := [replica.routing_stats for replica in router.curr_replicas.values()]) != [ready] * 2:
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    # what the ingress's /health/ready reads of its own router
    assert replica_states(APP_NAME) == {replica.unique_id: ready for replica in router.curr_replicas}


def test_shutdown_is_clean(fleet: str) -> None:
    spawned = _descendants(os.getpid())
    assert spawned, "Ray started no processes below this one"
    serve.shutdown()
    ray.shutdown()
    deadline = time.monotonic() + WAIT_SECONDS
    while (left := spawned & _descendants(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{fleet}/health/live", timeout=2)


def test_a_replica_runs_the_servers_alpha_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas made their worker without the policy: `--ray --alpha-policy adaptive` ran every call at the first
    alpha. Here one replica is made in this process (Ray Serve's replica context faked), as a replica makes itself."""
    import asyncio
    from types import SimpleNamespace

    import catrt.serve.ray_app as ray_app

    context = SimpleNamespace(replica_id=SimpleNamespace(unique_id="replica-in-test"))
    monkeypatch.setattr(ray_app.serve, "get_replica_context", lambda: context)
    config = ServeConfig(model="reference", steps=6, cat=CATConfig(alpha=0.2, t0=2), alphas=(0.2, 0.9),
                         alpha_policy="adaptive", latency_target=1000.0)
    replica = ray_app.ModelReplica(config.to_dict())
    try:
        assert (replica.worker.alpha_policy, replica.worker.latency_target) == ("adaptive", 1000.0)
        reply = asyncio.run(replica.generate({"prompt": "a red sun", "seed": 1}, "request-1"))
        assert reply["status"] == 200, reply
        assert reply["body"]["catrt"]["alpha"] == 0.9  # a light load within the target: the largest alpha, not the first
    finally:
        replica.worker.drain()


def test_a_replica_hung_in_a_step_or_whose_worker_stopped_fails_its_health_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Serve replaces a replica whose `check_health` raises; it raised only once the worker had died, so a replica
    whose step never returned was kept, answering every request 504. Now a call still in its step --hang-grace after
    its request was given up fails the check, naming why, and passes again once the step returns. One replica is
    made in this process (Ray Serve's replica context faked), as a replica makes itself."""
    import asyncio
    from types import SimpleNamespace

    import catrt.serve.ray_app as ray_app

    context = SimpleNamespace(replica_id=SimpleNamespace(unique_id="replica-in-test"))
    monkeypatch.setattr(ray_app.serve, "get_replica_context", lambda: context)
    config = ServeConfig(model="reference", steps=3, cat=CATConfig(t0=2), timeout=0.2, hang_grace=0.1)
    replica = ray_app.ModelReplica(config.to_dict())
    release = threading.Event()
    replica.worker.served.default.runner.transformer.register_forward_pre_hook(
        lambda *args: release.wait(WAIT_SECONDS) and None)
    try:
        replica.check_health()  # precondition: a ready replica passes
        reply = asyncio.run(replica.generate({"prompt": "a red sun", "seed": 1}, "request-1"))
        assert reply["status"] == 504, reply  # its step is held
        deadline = time.monotonic() + WAIT_SECONDS
        while replica.describe()["status"] != "hung":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(ServiceUnavailableError, match="^replica replica-in-test is hung: the worker is still in one "
                                                          "model call .* past --hang-grace 0.1 s"):
            replica.check_health()
        # what the ingress reads: the reason on /health/ready, the state its router avoids, a refusal before anything ran
        assert "past --hang-grace 0.1 s" in replica.describe()["reason"]
        hung = replica.record_routing_stats()
        assert hung["status"] == "hung" and "past --hang-grace 0.1 s" in hung["reason"], hung
        refused = asyncio.run(replica.generate({"prompt": "a red sun", "seed": 2}, "request-2"))
        assert (refused["status"], refused["unserved"]) == (503, True), refused
        assert "stuck in a model call" in refused["body"]["error"]["message"] and replica.worker.depth == 0
        release.set()
        deadline = time.monotonic() + WAIT_SECONDS
        while replica.describe()["status"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        replica.check_health()
        assert replica.record_routing_stats() == {"status": "ready", "reason": None, "sizes": ["32x32"]}
        assert replica.describe()["reason"] is None
    finally:
        release.set()
        replica.worker.drain()
    replica.worker.join(WAIT_SECONDS)
    with pytest.raises(ServiceUnavailableError, match="^replica replica-in-test is stopped$"):
        replica.check_health()


def test_the_ingress_exports_each_replicas_model_series_under_the_single_servers_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ingress's /metrics had the model series' names with no samples (step seconds by kind, images, alphas)
    and a `catrt_queue_depth` that always read 0; each replica's series now come with its answers, labelled by
    replica. One replica is made in this process (Ray Serve's replica context faked), as a replica makes itself."""
    import asyncio
    from types import SimpleNamespace

    import catrt.serve.ray_app as ray_app
    from catrt.serve.metrics import HttpMetrics

    context = SimpleNamespace(replica_id=SimpleNamespace(unique_id="replica-in-test"))
    monkeypatch.setattr(ray_app.serve, "get_replica_context", lambda: context)
    replica = ray_app.ModelReplica(ServeConfig(model="reference", steps=6, cat=CATConfig(t0=2)).to_dict())
    try:
        reply = asyncio.run(replica.generate({"prompt": "a red sun", "seed": 1}, "request-1"))
    finally:
        replica.worker.drain()
    assert reply["status"] == 200, reply
    metrics = HttpMetrics()
    ray_app.FleetMetrics(metrics).observe(reply)
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(metrics.render().decode()) for sample in family.samples}
    mine = ("replica", "replica-in-test")
    # Each step of the warm-up generation and of the request's (6 steps, t0 = 2: 2 full, 4 pruned); one image, one call.
    for kind, count in (("full", 2 + 2), ("pruned", 4 + 4)):
        assert samples[("catrt_step_seconds_count", (("kind", kind), mine, ("size", "32x32")))] == count
    assert samples[("catrt_images_generated_total", (mine, ("size", "32x32")))] == 1
    assert samples[("catrt_alpha_chosen_total", (("alpha", "0.3"), mine))] == 1
    assert samples[("catrt_queue_depth", (mine,))] == 0
    assert ("catrt_queue_depth", ()) not in samples  # no unlabelled depth that reads 0 whatever the replicas hold
    assert samples[("catrt_replica_answers_total", (mine, ("status", "200")))] == 1  # the ingress's own series stay


def _reply(replica: str, status: int = 200) -> dict:
    """A model replica's answer as `ModelReplica.generate` makes it: one 32x32 image, and its own series."""
    from catrt.serve.metrics import ServerMetrics

    body = {"size": "32x32", "data": [{"b64_json": ""}]} if status == 200 else {"error": {"message": "busy"}}
    return {"status": status, "body": body, "headers": {}, "replica": replica, "depth": 1,
            "metrics": ServerMetrics().render().decode()}


def _labelled(metrics) -> dict[str, set[str]]:
    """replica -> the names of the series labelled with it."""
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if "replica" in sample.labels:
                found.setdefault(sample.labels["replica"], set()).add(sample.name)
    return found


def test_the_series_of_a_replica_ray_serve_no_longer_lists_are_dropped() -> None:
    """A replica that died or was scaled down kept its series on the ingress's /metrics until the ingress restarted:
    phantom replicas on every dashboard. `retain` drops every series of each replica the listing lacks."""
    import catrt.serve.ray_app as ray_app
    from catrt.serve.metrics import HttpMetrics

    metrics = HttpMetrics()
    fleet = ray_app.FleetMetrics(metrics)
    for reply in (_reply("live"), _reply("gone"), _reply("gone", 429)):
        fleet.observe(reply)
    series = _labelled(metrics)
    assert series["gone"] == series["live"] >= {  # the ingress's per-replica series, and the replica's own
        "catrt_replica_answers_total", "catrt_replica_images_generated_total", "catrt_replica_queue_depth",
        "catrt_queue_depth",
    }
    assert fleet.retain({"live"}, time.monotonic()) == ["gone"]
    assert set(_labelled(metrics)) == {"live"} and _labelled(metrics)["live"] == series["live"]
    fleet.observe(_reply("gone"))  # an answer from a replica of that id again: its series come back from zero
    samples = {(sample.name, sample.labels.get("replica"), sample.labels.get("status")): sample.value
               for family in text_string_to_metric_families(metrics.render().decode()) for sample in family.samples}
    assert samples[("catrt_replica_answers_total", "gone", "200")] == 1
    assert ("catrt_replica_answers_total", "gone", "429") not in samples


def test_a_replica_that_answered_after_the_listing_was_asked_for_is_kept() -> None:
    """A replica that started after Ray Serve listed the replicas is not in that listing: its answer since keeps it."""
    import catrt.serve.ray_app as ray_app
    from catrt.serve.metrics import HttpMetrics

    metrics = HttpMetrics()
    fleet = ray_app.FleetMetrics(metrics)
    listed_at = time.monotonic()
    fleet.observe(_reply("new"))
    assert fleet.retain(set(), listed_at) == [] and set(_labelled(metrics)) == {"new"}
    assert fleet.retain(set(), time.monotonic()) == ["new"] and _labelled(metrics) == {}


class _Serve:
    """Ray Serve's controller client as the ingress asks it: `get_serve_details` lists `replicas`, or raises."""

    def __init__(self, replicas: list[str] | None, answer: threading.Event | None = None) -> None:
        self.replicas, self.calls, self.answer = replicas, 0, answer
        self.called = threading.Event()

    def get_serve_details(self) -> dict:
        self.calls += 1
        self.called.set()
        if self.answer is not None:
            self.answer.wait(WAIT_SECONDS)  # a controller that does not answer
        if self.replicas is None:
            raise ConnectionError("the controller is restarting")
        deployment = {"replicas": [{"replica_id": replica, "state": "RUNNING"} for replica in self.replicas]}
        return {"applications": {APP_NAME: {"deployments": {MODEL_DEPLOYMENT: deployment}}}}


def _ingress(monkeypatch: pytest.MonkeyPatch, client: _Serve):
    import catrt.serve.ray_app as ray_app
    from types import SimpleNamespace

    monkeypatch.setattr(ray_app, "_serve_details", client.get_serve_details)
    models = SimpleNamespace(app_name=APP_NAME, deployment_name=MODEL_DEPLOYMENT)
    ingress = ray_app.Ingress(ServeConfig(model="reference").to_dict(), models)
    for replica in ("a", "b"):
        ingress.fleet.observe(_reply(replica))
    return ingress


def test_a_scrape_drops_the_replicas_ray_serve_no_longer_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """/metrics asks Ray Serve which model replicas it lists (as `serve status` shows them); scrapes within
    LISTING_INTERVAL share that listing, so a flood of scrapes does not flood Serve's controller. (The interval is an
    hour here: at 1 s, a machine slow to make the first listing saw the last scrape list again.)"""
    import asyncio

    import catrt.serve.ray_app as ray_app

    monkeypatch.setattr(ray_app, "LISTING_INTERVAL", 3600.0)
    client = _Serve(["a"])
    ingress = _ingress(monkeypatch, client)

    async def scrapes() -> None:
        await asyncio.gather(*(ingress.forget_gone_replicas() for _ in range(5)))
        await ingress.forget_gone_replicas()

    asyncio.run(scrapes())
    assert set(_labelled(ingress.metrics)) == {"a"} and client.calls == 1


def test_when_ray_serve_does_not_list_the_replicas_every_series_is_kept(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A listing that fails (a controller restarting) drops nothing, and says so once, not at every scrape."""
    import asyncio

    import catrt.serve.ray_app as ray_app

    monkeypatch.setattr(ray_app, "LISTING_INTERVAL", 0.0)
    ingress = _ingress(monkeypatch, _Serve(None))

    async def scrapes() -> None:
        for _ in range(3):
            await ingress.forget_gone_replicas()

    with caplog.at_level("WARNING", logger="catrt.serve.ray_app"):
        asyncio.run(scrapes())
    assert set(_labelled(ingress.metrics)) == {"a", "b"}
    assert [record.getMessage() for record in caplog.records] == [
        "could not list the model replicas (ConnectionError('the controller is restarting')): /metrics keeps the "
        "series of every replica that answered until a listing succeeds"
    ]


def test_a_controller_that_does_not_answer_holds_one_thread_and_drops_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past DESCRIBE_TIMEOUT a scrape answers with every series kept; later scrapes start no second call while the
    first is stuck (each would hold a thread), and once it answers the next scrape lists again."""
    import asyncio

    import catrt.serve.ray_app as ray_app

    monkeypatch.setattr(ray_app, "LISTING_INTERVAL", 0.0)
    monkeypatch.setattr(ray_app, "DESCRIBE_TIMEOUT", 0.05)
    answer = threading.Event()
    client = _Serve(["a"], answer)
    ingress = _ingress(monkeypatch, client)

    async def scrapes() -> None:
        for _ in range(3):
            await ingress.forget_gone_replicas()
        assert await asyncio.to_thread(client.called.wait, WAIT_SECONDS)  # the first call is under way (and stuck)
        assert set(_labelled(ingress.metrics)) == {"a", "b"} and client.calls == 1
        answer.set()
        await ingress._asking  # the stuck call returns
        await ingress.forget_gone_replicas()

    try:
        asyncio.run(scrapes())
    finally:
        answer.set()
    assert set(_labelled(ingress.metrics)) == {"a"} and client.calls == 2


# A model replica made in a fresh process, as Ray starts one (its replica context faked).
REPLICA_PROCESS = """
from types import SimpleNamespace
import catrt.serve.ray_app as ray_app
ray_app.serve.get_replica_context = lambda: SimpleNamespace(replica_id=SimpleNamespace(unique_id="r"))
from catrt.config import CATConfig
from catrt.serve.config import ServeConfig
ray_app.ModelReplica(ServeConfig(model="reference", steps=3, cat=CATConfig(t0=2)).to_dict()).worker.drain()
"""


def test_a_replica_prints_none_of_the_notices_the_cli_drops() -> None:
    """transformers' two "requires torchvision (not installed)" notices printed once per replica into
    `catrt serve --ray`'s output, which the CLI keeps free of them."""
    result = subprocess.run([sys.executable, "-c", REPLICA_PROCESS], capture_output=True, text=True, env=server_env(),
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr + result.stdout


# Registered before catrt is imported, so it runs after catrt's own exit hook, just before the interpreter finalizes.
THREADS_AT_EXIT = """
import atexit, threading
atexit.register(lambda: print("threads at exit:", sorted(thread.name for thread in threading.enumerate())))
"""


def test_a_replica_process_ends_its_worker_thread_before_the_interpreter_finalizes() -> None:
    """The worker's daemon thread, which has run torch, still ran when the interpreter finalized: a replica process
    could abort at exit ("terminate called without an active exception"). Not drained here, so without catrt's exit
    hook the thread is sure to be alive then."""
    script = THREADS_AT_EXIT + REPLICA_PROCESS.replace(".worker.drain()", "")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=server_env(),
                            timeout=120)
    assert result.returncode == 0, result.stderr
    threads = [line for line in result.stdout.splitlines() if line.startswith("threads at exit:")]
    assert len(threads) == 1 and "MainThread" in threads[0] and "catrt-" not in threads[0], result.stdout


def test_a_replica_of_a_published_model_offline_prints_no_hub_notice() -> None:
    """diffusers' "Couldn't connect to the Hub ... local cache" lines printed once per replica into `catrt serve
    --ray`'s output, beside the replica's own refusal (the single server drops them)."""
    script = REPLICA_PROCESS.replace('model="reference", steps=3', 'model="sd3", steps=3')
    script = script.replace(".worker.drain()", "") + "\n"
    result = subprocess.run([sys.executable, "-c", f"try:\n    exec({script!r})\nexcept Exception as error:\n    print(type(error).__name__)"],
                            capture_output=True, text=True, env={**server_env(), "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.stdout.strip() == "ServiceUnavailableError", result.stderr
    assert "Couldn't connect to the Hub" not in result.stderr + result.stdout


# -- the CLI around --ray (no Ray started) -------------------------------------------------------

NO_RAY = """
import sys
sys.modules["ray"] = None  # as if the ray extra were not installed
from catrt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ray_flags_are_refused_in_one_line() -> None:
    missing = _run_launcher(NO_RAY, ["serve", "--model", "tiny-sd3", "--ray", "--port", "8123"])
    assert_one_line_refusal(missing, 'pip install "catrt[ray]"')
    for args, needle in (
        (["--replicas", "2"], "--replicas is a Ray Serve setting: add --ray"),
        (["--ray", "--replicas", "2", "--min-replicas", "1", "--max-replicas", "2"], "drop it to autoscale"),
        (["--ray", "--min-replicas", "1"], "give both --min-replicas and --max-replicas"),
        (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 is over --max-replicas 2"),
        (["--ray", "--port", "0"], "--port 0 is not served with --ray"),
    ):
        assert_one_line_refusal(run_cli(["serve", "--model", "tiny-sd3", *args]), needle)


OLD_RAY = """
import sys
from importlib import metadata
sys.modules["ray.serve.request_router"] = None  # as in a Ray older than 2.48: no custom request router to import
installed = metadata.version
metadata.version = lambda name: "2.40.0" if name == "ray" else installed(name)
from catrt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_ray_older_than_the_extra_asks_for_is_named_in_one_line() -> None:
    """With Ray 2.40 installed, importing catrt's Ray Serve application failed on Ray's router API and the refusal said
    Ray Serve was not installed. The version is named, before anything is loaded or Ray imported."""
    old = _run_launcher(OLD_RAY, ["serve", "--model", "tiny-sd3", "--ray", "--port", str(_free_port())])
    line = assert_one_line_refusal(old, '--ray needs Ray >= 2.48 (Ray Serve\'s custom request router) but Ray 2.40.0 '
                                        'is installed: pip install -U "catrt[ray]"')
    assert "not installed" not in line


def test_the_oldest_ray_catrt_accepts_is_the_ray_extras() -> None:
    import tomllib

    from catrt.serve.fleet_start import RAY_MINIMUM

    extra = tomllib.loads((Path(catrt.__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["ray"]
    assert extra == [f"ray[serve]>={'.'.join(map(str, RAY_MINIMUM))}"]


def test_a_busy_port_or_a_cluster_nobody_runs_is_refused_in_one_line_before_ray_starts() -> None:
    """Ray's own errors here were tracebacks with exit 1 (a busy port from inside Serve's proxy actor, after
    Ray had started; a malformed address; no cluster for auto) or minutes of retries (an address nobody
    answers at)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = run_cli(["serve", "--model", "reference", "--ray", "--port", str(port)])
        assert_one_line_refusal(taken, f"port {port} on 127.0.0.1 is already in use")
    free = str(_free_port())
    for address, needle in (
        ("bogus", "--ray-address 'bogus' is not a Ray cluster address: give auto, HOST:PORT"),
        ("127.0.0.1:99999", "is not a Ray cluster address"),
        (f"127.0.0.1:{free}", f"--ray-address 127.0.0.1:{free}: no Ray cluster answers at 127.0.0.1:{free}"),
        (f"ray://127.0.0.1:{free}", f"no Ray cluster answers at 127.0.0.1:{free}"),
    ):
        result = run_cli(["serve", "--model", "reference", "--ray", "--ray-address", address, "--port", free])
        assert_one_line_refusal(result, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_local_cluster_without_cuda_is_refused_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The replicas of a local cluster run here: `--device cuda` failed after Ray had started (~30 s) as
    "Failed to update the deployments ['catrt-model']", naming neither the device nor the fix."""
    import catrt.serve.ray_app
    from catrt.cli import main

    def started(*args: object) -> int:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(catrt.serve.ray_app, "run_fleet", started)
    assert main(["serve", "--model", "reference", "--device", "cuda", "--ray", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: this machine has no CUDA device torch can use; serve with --device cpu" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_an_edited_bundle_is_refused_before_a_local_cluster_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bundle `catrt.load` refuses (files, digests, an edited manifest, versions) made the replicas of a local
    cluster fail after Ray had started (~30 s), as "Failed to update the deployments ['catrt-model']"."""
    import catrt.serve.ray_app as ray_app
    from catrt.build import build_engines
    from catrt.build_config import BuildConfig
    from catrt.cli import main

    bundle = build_engines(BuildConfig("reference", height=32, width=32, batch=1, steps=3, t0=2, backend="eager"),
                           out_dir=tmp_path / "engines", export_dir=tmp_path / "export", progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["alphas"][0]["k"] = 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))

    def started(*args: object) -> int:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_app, "run_fleet", started)
    assert main(["serve", "--engines", str(bundle), "--ray", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert "manifest.json alphas[0].k is 1" in err and "rebuild the engine" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_ray_start_errors_read_as_the_exception_inside_the_task() -> None:
    from catrt.serve.fleet_start import first_line, ray_start_error

    inner = RuntimeError("Failed to bind to address '127.0.0.1:8000'.\n  more detail")
    task_error = ray.exceptions.RayTaskError("ProxyActor.ready", "Traceback (most recent call last):\n ...", inner)
    assert first_line(task_error) == "RuntimeError: Failed to bind to address '127.0.0.1:8000'."
    refused = ray_start_error(ConnectionError("Could not find any running Ray instance.\nPlease ..."), "auto")
    assert isinstance(refused, ConfigError) and refused.field == "ray_address"
    assert str(refused) == ("cannot start or join --ray-address auto: ConnectionError: Could not find any running Ray "
                            "instance. Start one on this machine (ray start --head), or leave out --ray-address to start a "
                            "local one")


def test_auto_without_a_cluster_names_catrts_way_out_not_rays_address_flag() -> None:
    """Ray 2.60 says, on one line, 'Could not find any running Ray instance. Please specify the one to connect to by
    setting `--address` flag or `RAY_ADDRESS` environment variable.': catrt serve has no --address flag, so its line
    keeps Ray's finding and says what to do with catrt's own flags."""
    from catrt.serve.fleet_start import ray_start_error

    said = ("Could not find any running Ray instance. Please specify the one to connect to by setting `--address` flag "
            "or `RAY_ADDRESS` environment variable.")
    message = str(ray_start_error(ConnectionError(said), "auto"))
    assert message.startswith("cannot start or join --ray-address auto: ConnectionError: Could not find any running Ray "
                              "instance.")
    assert "`--address`" not in message and message.endswith("or leave out --ray-address to start a local one")
    elsewhere = str(ray_start_error(ConnectionError(said), "10.0.0.5:6379"))  # an address given: Ray's words whole
    assert elsewhere == f"cannot start or join --ray-address 10.0.0.5:6379: ConnectionError: {said}"


def _signed_bundle(tmp_path: Path, key: bytes) -> Path:
    """A small eager bundle signed with `key`, for the --ray start-up checks (Ray itself is not started)."""
    from catrt.build import build_engines
    from catrt.build_config import BuildConfig

    return build_engines(BuildConfig("reference", height=32, width=32, batch=1, steps=3, t0=2, backend="eager"),
                         out_dir=tmp_path / "engines", export_dir=tmp_path / "export", progress=False, sign_key=key)


def test_the_bundle_key_from_the_environment_is_handed_to_every_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`catrt serve --ray --engines B` with $CATRT_BUNDLE_KEY: replicas on other nodes of a joined cluster lack
    this process's environment, so the key is read here and passed on (replicas loaded unchecked before)."""
    import catrt.serve.ray_app as ray_app
    from catrt.cli import main

    bundle = _signed_bundle(tmp_path, b"fleet-bundle-key")
    handed: list[bytes | None] = []
    monkeypatch.setattr(ray_app, "run_fleet", lambda config, fleet, key=None: handed.append(key) or 0)
    monkeypatch.setenv("CATRT_BUNDLE_KEY", "fleet-bundle-key")
    args = ["serve", "--engines", str(bundle), "--ray", "--port", str(_free_port())]
    assert main(args) == 0
    key_file = tmp_path / "key"
    key_file.write_text("fleet-bundle-key\n")
    monkeypatch.setenv("CATRT_BUNDLE_KEY", "another-key")
    assert main([*args, "--bundle-key-file", str(key_file)]) == 0  # the file wins over the environment
    assert handed == [b"fleet-bundle-key", b"fleet-bundle-key"]


def test_a_wrong_bundle_key_on_a_local_cluster_is_one_line_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The replicas of a local cluster check the signature with the key they are handed; a wrong key was a
    deployment failing about 30 s later, now it is the signature refusal before Ray starts."""
    import catrt.serve.ray_app as ray_app
    from catrt.cli import main

    bundle = _signed_bundle(tmp_path, b"fleet-bundle-key")
    started: list[bytes | None] = []
    monkeypatch.setattr(ray_app, "run_fleet", lambda config, fleet, key=None: started.append(key) or 0)
    monkeypatch.setenv("CATRT_BUNDLE_KEY", "not-the-key")
    assert main(["serve", "--engines", str(bundle), "--ray", "--port", str(_free_port())]) == 2
    error = capsys.readouterr().err
    assert not started and len(error.strip().splitlines()) == 1 and "signature" in error


def test_catrt_and_a_plain_serve_never_import_ray() -> None:
    """At run time for the light modules (no torch import in this test); by the source for the rest: only
    ray_app imports Ray, and only inside `catrt serve --ray`'s handler is ray_app imported."""
    code = ("import sys; import catrt, catrt.cli, catrt.serve, catrt.serve.server, catrt.serve.app, catrt.serve.config; "
            "catrt.cli.build_parser(); print('ray' in sys.modules)")
    result = _run_launcher(code, [])
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
    package = Path(catrt.__file__).parent
    importers, top_level = set(), set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name == "ray" or name.startswith("ray.") for name in names):
                importers.add(path.relative_to(package).as_posix())
            if "catrt.serve.ray_app" in names and node in tree.body:
                top_level.add(path.relative_to(package).as_posix())
    assert importers == {"serve/ray_app.py"} and not top_level, (importers, top_level)


def _run_launcher(code: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=server_env(),
                          timeout=120)


def test_eager_alphas_of_one_k_are_refused_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The replicas would refuse them only once each loaded the model, long after the fleet said it listens."""
    import catrt.serve.ray_app
    from catrt.cli import main

    def started(*args: object) -> int:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(catrt.serve.ray_app, "run_fleet", started)
    argv = ["serve", "--model", "reference", "--alpha", "0.3", "0.2999", "--ray", "--port", str(_free_port())]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--alpha 0.3 and 0.2999 both select k = 77 of the 256 image tokens at 32x32" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_request_ray_cancels_because_its_client_left_counts_499_not_500() -> None:
    """Ray Serve's proxy cancels the ingress's request when its client leaves (uvicorn, in the single server, tells
    the app instead): the cancelled request escaped the metrics middleware unanswered and was counted as a 500,
    so every impatient client raised the fleet's error rate. It is a 499, as in the single server."""
    import asyncio
    from types import SimpleNamespace

    import catrt.serve.ray_app as ray_app

    waiting = asyncio.Event()

    async def never_answers(*args: object) -> dict:
        waiting.set()
        await asyncio.sleep(3600)

    models = SimpleNamespace(app_name=APP_NAME, deployment_name=MODEL_DEPLOYMENT,
                             generate=SimpleNamespace(remote=never_answers))
    ingress = ray_app.Ingress(ServeConfig(model="reference").to_dict(), models)
    app = ray_app.ingress_app(ingress)
    body = json.dumps({"prompt": "a red sun"}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/images/generations", "raw_path": b"/v1/images/generations", "root_path": "",
             "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    sent: list[dict] = []

    async def scenario() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)

        async def send(message: dict) -> None:
            sent.append(message)

        request = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.wait_for(waiting.wait(), WAIT_SECONDS)  # the ingress waits for a model replica
        request.cancel()  # as Ray's proxy does once the client is gone
        with pytest.raises(asyncio.CancelledError):
            await request

    asyncio.run(scenario())
    assert sent == []
    counted = {sample.labels["status"]: sample.value for family in
               text_string_to_metric_families(ingress.metrics.render().decode()) for sample in family.samples
               if sample.name == "catrt_requests_total" and sample.labels["route"] == "/v1/images/generations"}
    assert counted == {"499": 1.0}, counted


def _fake_ray(monkeypatch: pytest.MonkeyPatch, resources: dict[str, float], run) -> tuple[list[str], dict]:
    """`run_fleet`'s Ray and Serve calls recorded, in this process: the cluster has `resources`, `serve.run` is `run`;
    the signal handlers it installs are kept in the dict returned, not installed."""
    import catrt.serve.ray_app as ray_app

    calls: list[str] = []
    handlers: dict = {}
    monkeypatch.setattr(ray_app.ray, "init", lambda **kwargs: calls.append("ray.init"))
    monkeypatch.setattr(ray_app.ray, "cluster_resources", lambda: dict(resources))
    monkeypatch.setattr(ray_app.ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(ray_app.serve, "start", lambda **kwargs: calls.append("serve.start"))
    monkeypatch.setattr(ray_app.serve, "run", run)
    monkeypatch.setattr(ray_app.serve, "shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(ray_app.serve, "status",  # a joined cluster running catrt's application alone
                        lambda: calls.append("serve.status") or SimpleNamespace(applications={APP_NAME: None}))
    monkeypatch.setattr(ray_app.signal, "signal", lambda signum, handler: handlers.__setitem__(signum, handler))
    return calls, handlers


@pytest.mark.parametrize(("fleet", "device", "resources", "message"), [
    (FleetConfig(replicas=3), "cpu", {"CPU": 2.0},
     "--replicas 3 needs 3 CPUs (each model replica holds one) but the local Ray cluster has 2: ask for at most 2, or "
     "join a cluster with room (--ray-address)"),
    (FleetConfig(replicas=None, min_replicas=2, max_replicas=4), "cuda", {"CPU": 16.0, "GPU": 1.0},
     "--min-replicas 2 needs 2 GPUs (each model replica holds one) but the local Ray cluster has 1"),
], ids=["replicas-over-cpus", "min-replicas-over-gpus"])
def test_more_replicas_than_a_local_cluster_has_devices_for_are_refused(
    monkeypatch: pytest.MonkeyPatch, fleet: FleetConfig, device: str, resources: dict[str, float], message: str,
) -> None:
    """A local cluster has no autoscaler: `--replicas 3` on 2 CPUs waited for ever in `serve.run` (Ray's "can't be
    scheduled" warnings every 30 s, no "listening" line, and no signal stopped it). Now one line, and Ray stops."""
    from catrt.serve.ray_app import run_fleet

    def deployed(*args: object, **kwargs: object) -> None:
        raise AssertionError("the application was deployed")

    calls, _ = _fake_ray(monkeypatch, resources, deployed)
    with pytest.raises(ConfigError) as refused:
        run_fleet(ServeConfig(model="reference", device=device, port=_free_port()), fleet)
    assert str(refused.value).startswith(message)
    assert "serve.start" not in calls and calls[-1] == "ray.shutdown"


def test_gpu_replicas_past_a_local_clusters_cpus_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each GPU replica holds a CPU as well (Ray Serve's default `num_cpus=1`): `--device cuda --replicas 2` on 2 GPUs
    and 1 CPU (a container's CPU limit) passed the GPU count, then Serve waited for ever for the second replica."""
    from catrt.serve.ray_app import run_fleet

    def deployed(*args: object, **kwargs: object) -> None:
        raise AssertionError("the application was deployed")

    options = _model_actor_options(application(ServeConfig(model="reference", device="cuda"), FleetConfig(replicas=2),
                                               gpus=True))
    assert (options["num_gpus"], options["num_cpus"]) == (1, 1)  # what a replica holds, as the check counts it
    calls, _ = _fake_ray(monkeypatch, {"CPU": 1.0, "GPU": 2.0}, deployed)
    with pytest.raises(ConfigError, match=r"^--replicas 2 needs 2 CPUs \(each model replica holds one\) but the local "
                                          r"Ray cluster has 1: ask for at most 1"):
        run_fleet(ServeConfig(model="reference", device="cuda", port=_free_port()), FleetConfig(replicas=2))
    assert "serve.start" not in calls and calls[-1] == "ray.shutdown"


def test_a_joined_cluster_without_the_replicas_devices_now_is_named_while_serve_waits(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A joined cluster may add nodes, so it is not refused; but `--device cuda` joined to a cluster with no GPU (and
    no autoscaler) waited in `serve.run` for ever and printed nothing. One warning line says what it waits for; a
    cluster with room prints none."""
    from catrt.serve.ray_app import run_fleet

    handlers: dict = {}

    def deployed(*args: object, **kwargs: object) -> None:
        handlers[signal.SIGTERM](signal.SIGTERM, None)

    calls, handlers = _fake_ray(monkeypatch, {"CPU": 8.0}, deployed)
    config = ServeConfig(model="reference", device="cuda", port=_free_port())
    assert run_fleet(config, FleetConfig(replicas=2, address="auto")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["catrt serve: warning: --replicas 2 needs 2 GPUs (each model replica holds one) and the Ray "
                        "cluster has 0 now: the application runs once its autoscaler adds them (never, where it has "
                        "none; Ctrl-C stops)"]
    calls, handlers = _fake_ray(monkeypatch, {"CPU": 8.0, "GPU": 2.0}, deployed)
    assert run_fleet(config, FleetConfig(replicas=2, address="auto")) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("fleet", [FleetConfig(replicas=2), FleetConfig(replicas=None, min_replicas=1, max_replicas=8),
                                   FleetConfig(replicas=3, address="auto")], ids=["fits", "autoscaled", "joined"])
def test_replicas_a_cluster_has_room_for_or_may_get_are_deployed(monkeypatch: pytest.MonkeyPatch, fleet: FleetConfig,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Within the local cluster's CPUs, autoscaling up past them (Serve scales only as far as it can place), and any
    count on a joined cluster (its autoscaler may add nodes)."""
    from catrt.serve.ray_app import run_fleet

    handlers: dict = {}

    def deployed(*args: object, **kwargs: object) -> None:
        handlers[signal.SIGTERM](signal.SIGTERM, None)  # then serve until this signal

    calls, handlers = _fake_ray(monkeypatch, {"CPU": 2.0}, deployed)
    assert run_fleet(ServeConfig(model="reference", port=_free_port()), fleet) == 0
    assert "catrt serve: listening on" in capsys.readouterr().err
    joined = ["serve.status"] if fleet.address is not None else []  # which applications run there, before stopping
    assert calls == ["ray.init", "serve.start", *joined, "serve.shutdown", "ray.shutdown"]


def test_a_signal_while_the_replicas_load_stops_the_fleet_at_once(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`serve.run` waits until every replica has loaded and warmed up, and ran on the main thread: SIGTERM and Ctrl-C
    only set the flag the serving loop reads after it, so a fleet was unstoppable while a big model loaded, and for
    ever where a replica could not be placed (only SIGKILL ended it, leaving Ray's agents behind)."""
    import catrt.serve.ray_app as ray_app

    loading, loaded, controller_gone = threading.Event(), threading.Event(), threading.Event()

    def slow_replicas(*args: object, **kwargs: object) -> None:
        loading.set()
        if not controller_gone.wait(WAIT_SECONDS):  # replicas still loading; a signal comes meanwhile
            loaded.set()

    calls, handlers = _fake_ray(monkeypatch, {"CPU": 2.0}, slow_replicas)
    monkeypatch.setattr(ray_app.serve, "shutdown", lambda: calls.append("serve.shutdown") or controller_gone.set())

    def terminate_while_loading() -> None:
        assert loading.wait(WAIT_SECONDS)
        handlers[signal.SIGTERM](signal.SIGTERM, None)

    signaller = threading.Thread(target=terminate_while_loading, daemon=True)
    signaller.start()
    assert ray_app.run_fleet(ServeConfig(model="reference", port=_free_port()), FleetConfig(replicas=1)) == 0
    assert not loaded.is_set()  # returned while serve.run still waited (it then returns as Serve shuts down)
    assert calls == ["ray.init", "serve.start", "serve.shutdown", "ray.shutdown"]
    assert "listening" not in capsys.readouterr().err
    signaller.join(WAIT_SECONDS)
    assert not signaller.is_alive()


def test_ctrl_c_while_ray_starts_stops_it_once_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during ray.init (seconds on a local cluster) was a KeyboardInterrupt inside Ray's start-up, which left
    Ray's processes to its exit hook; it is taken once Ray has started, and Ray is shut down as after serving."""
    import catrt.serve.ray_app as ray_app

    def deployed(*args: object, **kwargs: object) -> None:
        raise AssertionError("the application was deployed")

    def reached_ray(*args: object) -> None:
        raise AssertionError("Ctrl-C reached ray.init")

    calls, handlers = _fake_ray(monkeypatch, {"CPU": 2.0}, deployed)

    def starting(**kwargs: object) -> None:
        calls.append("ray.init")
        handlers.get(signal.SIGINT, reached_ray)(signal.SIGINT, None)  # Ctrl-C while Ray starts

    monkeypatch.setattr(ray_app.ray, "init", starting)
    assert ray_app.run_fleet(ServeConfig(model="reference", port=_free_port()), FleetConfig(replicas=1)) == 0
    assert calls == ["ray.init", "serve.shutdown", "ray.shutdown"]


@pytest.mark.parametrize(("address", "running", "stops"), [
    (None, {"catrt", "other"}, ["serve.shutdown"]),  # a local cluster is catrt's own: asked nothing
    ("auto", {"catrt"}, ["serve.status", "serve.shutdown"]),
    ("auto", {"catrt", "other"}, ["serve.status", "serve.delete catrt"]),
], ids=["local", "joined-alone", "joined-shared"])
def test_a_fleet_starts_its_own_local_cluster_and_leaves_a_joined_ones_other_applications(
    monkeypatch: pytest.MonkeyPatch, address: str | None, running: set[str], stops: list[str],
) -> None:
    """Without --ray-address, ray.init(address=None) joined the cluster $RAY_ADDRESS named (or one `ray start` had left
    on this machine), where the checks made for a local cluster do not hold: it starts its own, as README says. And
    its exit shut Serve down whole, deleting every application of a joined cluster: now only catrt's goes where
    others run."""
    import catrt.serve.ray_app as ray_app

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    addresses: list[str | None] = []
    handlers: dict = {}

    def deployed(*args: object, **kwargs: object) -> None:
        handlers[signal.SIGTERM](signal.SIGTERM, None)

    calls, handlers = _fake_ray(monkeypatch, {"CPU": 2.0}, deployed)
    monkeypatch.setattr(ray_app.ray, "init", lambda **kwargs: addresses.append(kwargs["address"]))
    monkeypatch.setattr(ray_app.serve, "status",
                        lambda: calls.append("serve.status") or SimpleNamespace(applications=dict.fromkeys(running)))
    monkeypatch.setattr(ray_app.serve, "delete", lambda name: calls.append(f"serve.delete {name}"))
    fleet = FleetConfig(replicas=1, address=address)
    assert ray_app.run_fleet(ServeConfig(model="reference", port=_free_port()), fleet) == 0
    assert addresses == ["local" if address is None else address]
    assert calls == ["serve.start", *stops, "ray.shutdown"]


def test_the_ingress_lists_the_model_a_replica_serves_where_it_cannot_read_the_builds(tmp_path: Path) -> None:
    """The ingress read the model's name from the builds' manifests on its own node, and answered /v1/models 503 for
    ever where that node lacks the engine folders (a KubeRay head pod without the model volume); it now asks a model
    replica, which loaded them, and still answers 503 while none answers."""
    from fastapi.testclient import TestClient

    import catrt.serve.ray_app as ray_app

    described: list[dict | Exception] = [ConnectionError("no replica yet"),
                                         {"status": "ready", "sizes": ["64x64"], "replica": "r", "model": "tiny-sd3",
                                          "properties": None, "size_rules": None}]

    async def describe() -> dict:
        answer = described.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    models = SimpleNamespace(app_name=APP_NAME, deployment_name=MODEL_DEPLOYMENT, describe=SimpleNamespace(remote=describe))
    elsewhere = str(tmp_path / "engines" / "tiny-sd3-64x64-eager")  # on the replicas' nodes, not here
    ingress = ray_app.Ingress(ServeConfig(engines=(elsewhere,)).to_dict(), models)
    with TestClient(ray_app.ingress_app(ingress)) as http:
        assert_error(http.get("/v1/models"), 503, None)  # no replica answers yet
        assert http.get("/v1/models").json()["data"][0]["id"] == "tiny-sd3"
        assert http.get("/v1/models/tiny-sd3").json()["id"] == "tiny-sd3"  # read once


@pytest.mark.parametrize("level", [logging.WARNING, logging.INFO], ids=["default", "verbose"])
def test_ray_serve_logs_at_catrts_level_without_an_access_log(monkeypatch: pytest.MonkeyPatch, level: int) -> None:
    """Ray Serve's controller, proxy and replicas logged at INFO with an access log: about three lines per request
    (proxy, ingress, replica) flooded the console of `catrt serve --ray`, whatever catrt's level. Its components now
    get catrt's level (WARNING, INFO with -v) and no access log, as the single-process server writes none; so does
    Serve's logger in the CLI's own process."""
    import catrt.serve.ray_app as ray_app
    from ray.serve.schema import LoggingConfig

    given: dict[str, object] = {}
    handlers: dict = {}

    def deployed(*args: object, **kwargs: object) -> None:
        given["serve.run"] = kwargs["logging_config"]
        handlers[signal.SIGTERM](signal.SIGTERM, None)

    calls, handlers = _fake_ray(monkeypatch, {"CPU": 2.0}, deployed)
    monkeypatch.setattr(ray_app.serve, "start", lambda **kwargs: given.__setitem__("serve.start", kwargs["logging_config"]))
    catrt_logger, serve_logger = logging.getLogger("catrt"), logging.getLogger("ray.serve")
    monkeypatch.setattr(catrt_logger, "level", level)  # as `catrt -v` (INFO) or not (WARNING) leaves it
    monkeypatch.setattr(serve_logger, "level", logging.INFO)  # as importing ray.serve leaves it
    assert ray_app.run_fleet(ServeConfig(model="reference", port=_free_port()), FleetConfig(replicas=1)) == 0
    assert set(given) == {"serve.start", "serve.run"}  # the controller and proxies; the application's replicas
    for config in given.values():
        checked = LoggingConfig(**config)  # Ray's own schema takes it
        assert (checked.log_level, checked.enable_access_log) == (logging.getLevelName(level), False)
    assert serve_logger.level == level
    monkeypatch.setattr(catrt_logger, "level", 15)  # between DEBUG and INFO, set from Python: Serve names its levels
    assert LoggingConfig(**logging_config()).log_level == "DEBUG"


def _model_actor_options(app) -> dict:
    """The `ray_actor_options` the application hands Ray for each model replica."""
    return app._bound_deployment.init_args[1]._bound_deployment.ray_actor_options


@pytest.mark.parametrize(("config", "gpus", "holds"), [
    (ServeConfig(model="reference"), True, "num_cpus"),  # --device cpu on a GPU cluster: no GPU held
    (ServeConfig(model="reference", device="mps"), True, "num_cpus"),
    (ServeConfig(model="reference", device="cuda"), True, "num_gpus"),
    (ServeConfig(model="reference", device="cuda"), False, "num_gpus"),  # a joined cluster may add GPU nodes
    (ServeConfig(engines=("/models/a",)), True, "num_gpus"),  # a build's backend takes the GPU it sees
    (ServeConfig(engines=("/models/a",)), False, "num_cpus"),
], ids=["cpu-on-gpus", "mps", "cuda", "cuda-joined-cpu-cluster", "engines-on-gpus", "engines-on-cpus"])
def test_each_model_replica_asks_ray_for_the_device_it_serves_on(config: ServeConfig, gpus: bool, holds: str) -> None:
    """Replicas asked for a GPU whenever the cluster had one, even with --device cpu: a CPU fleet on a GPU node was
    capped at its GPU count and held GPUs it never used."""
    options = _model_actor_options(application(config, FleetConfig(replicas=2), gpus=gpus))
    assert options.get("num_gpus", 0) == (1 if holds == "num_gpus" else 0), options
    assert options["num_cpus"] == 1


def test_a_cpu_fleet_on_a_gpu_node_is_limited_by_its_cpus_not_its_gpus(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """check_local_room counted GPUs for every fleet on a GPU node: --device cpu --replicas 3 on 16 CPUs and one GPU was
    refused; a CUDA fleet there is still refused, naming GPUs."""
    from catrt.serve.ray_app import run_fleet

    handlers: dict = {}

    def deployed(*args: object, **kwargs: object) -> None:
        handlers[signal.SIGTERM](signal.SIGTERM, None)

    calls, handlers = _fake_ray(monkeypatch, {"CPU": 16.0, "GPU": 1.0}, deployed)
    assert run_fleet(ServeConfig(model="reference", port=_free_port()), FleetConfig(replicas=3)) == 0
    assert "3 model replicas, CPU each" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^--replicas 3 needs 3 GPUs \(each model replica holds one\) but the local "
                                          r"Ray cluster has 1"):
        run_fleet(ServeConfig(model="reference", device="cuda", port=_free_port()), FleetConfig(replicas=3))


def test_the_model_replicas_use_catrts_router_fed_by_each_replicas_state() -> None:
    from catrt.serve.ray_app import ROUTING_STATS_PERIOD, ReadyFirstRouter

    app = application(ServeConfig(model="reference"), FleetConfig(replicas=2), gpus=False)
    routing = app._bound_deployment.init_args[1]._bound_deployment._deployment_config.request_router_config
    assert routing.get_request_router_class() is ReadyFirstRouter
    assert routing.request_routing_stats_period_s == ROUTING_STATS_PERIOD


def test_the_router_sends_nothing_to_a_replica_whose_stats_say_it_is_not_ready() -> None:
    """Ray Serve's power of two choices takes the replica with fewer ongoing requests: a hung one, which refuses each
    request at once, drew most new requests (each a 503) until Serve replaced it. Where none is ready, all are
    candidates (each then answers why)."""
    import asyncio

    from catrt.serve.router_states import forget

    def replica(name: str, stats: dict) -> SimpleNamespace:
        return SimpleNamespace(replica_id=ReplicaID(name, DeploymentID(name=MODEL_DEPLOYMENT)), routing_stats=stats)

    hung, ready, fresh = replica("hung", {"status": "hung"}), replica("ready", {"status": "ready"}), replica("new", {})
    router = _router_of(UNIT_APP, {})
    forget(router)  # only its choices are asked here

    def chosen(candidates: list) -> set[str]:
        picks: set[str] = set()
        for _ in range(50):
            (rank,) = asyncio.run(router.choose_replicas(candidates))
            assert 1 <= len(rank) <= 2 and len({id(r) for r in rank}) == len(rank)
            picks |= {r.replica_id.unique_id for r in rank}
        return picks

    assert chosen([hung, ready]) == {"ready"}
    assert chosen([hung, ready, fresh]) == {"ready", "new"}  # no stats yet: a replica Serve lists as running is ready
    assert chosen([hung, replica("dead", {"status": "dead"})]) == {"hung", "dead"}
    assert asyncio.run(router.choose_replicas([])) == []


def test_the_router_backs_off_between_rounds_while_every_replica_is_full() -> None:
    """Ray's routing loop waits between rounds only where the router's choice sets `should_backoff`: without it, while
    every replica held --max-queue requests, the ingress probed the replicas' queue lengths round after round without
    pause (a CPU-bound loop in the ingress and a flood of probes at the replicas, for as long as the fleet stayed
    full). Here Ray's own loop routes one request to two full stand-in replicas, one of which frees a slot on its
    21st probe; the loop's sleep is recorded instead of slept."""
    import asyncio

    from ray.serve._private.common import DeploymentHandleSource, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from catrt.serve.ray_app import ReadyFirstRouter

    deployment = DeploymentID(name=MODEL_DEPLOYMENT, app_name=APP_NAME)
    probes: list[str] = []

    class Full:
        max_ongoing_requests = 1
        routing_stats = {"status": "ready"}

        def __init__(self, name: str) -> None:
            self.replica_id = ReplicaID(name, deployment)

        async def get_queue_len(self, *, deadline_s: float) -> int:
            probes.append(self.replica_id.unique_id)
            return 0 if len(probes) > 40 else 1

    async def route() -> tuple[str, list[int]]:
        router = ReadyFirstRouter(deployment, DeploymentHandleSource.UNKNOWN)
        backoffs: list[int] = []

        async def backoff(attempt: int) -> None:
            backoffs.append(attempt)

        router._backoff = backoff
        router.update_replicas([Full("a"), Full("b")])
        pending = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id="r", internal_request_id="r"))
        chosen = await asyncio.wait_for(router._choose_replica_for_request(pending), 60)
        return chosen.replica_id.unique_id, backoffs

    chosen, backoffs = asyncio.run(route())
    rounds = len(probes) // 2 - 1  # the first probe of each is Ray's ping of a replica it was just handed
    assert chosen in ("a", "b") and rounds >= 19, probes
    # Ray's schedule: the first two rounds at once, then a growing wait before each later one.
    assert backoffs == list(range(rounds - 2)), (rounds, backoffs)


def _described(replica: str, status: str, reason: str | None = None) -> dict:
    return {"status": status, "reason": reason, "sizes": ["64x64"] if status == "ready" else [], "replica": replica,
            "model": "tiny-sd3", "properties": None, "size_rules": None}


UNIT_APP = "catrt-in-test"


def _ingress_with(describes: list, generates: list | None = None):
    """An ingress whose model handle answers `describes` (an exception: no answer) and `generates` in turn."""
    import catrt.serve.ray_app as ray_app

    async def describe() -> dict:
        answer = describes.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def generate(body: dict, request_id: str) -> dict:
        return generates.pop(0)

    # An application name no fleet of this module runs: a handle made here (by a fleet test) made a router of its own.
    models = SimpleNamespace(app_name=UNIT_APP, deployment_name=MODEL_DEPLOYMENT, describe=SimpleNamespace(remote=describe),
                             generate=SimpleNamespace(remote=generate))
    return ray_app.Ingress(ServeConfig(model="reference").to_dict(), models)


def test_readiness_is_the_fleets_a_hung_replica_answering_first_does_not_make_it_503() -> None:
    """/health/ready asked one replica, as Ray routed the question: a hung one (until Serve replaced it) made the
    fleet 503 though another served, with no reason. It asks on while replicas answer not ready."""
    from fastapi.testclient import TestClient

    import catrt.serve.ray_app as ray_app

    describes = [_described("a", "hung", "a step or the device is stuck"), _described("b", "ready")]
    with TestClient(ray_app.ingress_app(_ingress_with(describes))) as http:
        ready = http.get("/health/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "sizes": ["64x64"]}
    assert describes == []


#: /health/ready's answer where replica a is hung and b is draining, asked or read from the states they report.
HUNG_AND_DRAINING = {
    "status": "hung", "sizes": [],
    "replicas": {"a": {"status": "hung", "reason": "a step or the device is stuck"},
                 "b": {"status": "draining", "reason": None}},
    "reason": "no model replica asked is ready: a is hung, b is draining",
}


def test_readiness_503_says_which_replicas_are_not_ready_and_why() -> None:
    """Every replica asked is hung (or stopping): 503, each named with its state and reason, after READY_ASKS
    questions; where none answers, 503 saying so."""
    from fastapi.testclient import TestClient

    import catrt.serve.ray_app as ray_app

    describes = [_described("a", "hung", "a step or the device is stuck"), _described("b", "draining"),
                 _described("a", "hung", "a step or the device is stuck"), _described("b", "ready")]
    with TestClient(ray_app.ingress_app(_ingress_with(describes))) as http:
        refused = http.get("/health/ready")
    assert len(describes) == 4 - ray_app.READY_ASKS == 1  # bounded: the fourth, ready, was not asked
    assert refused.status_code == 503
    assert refused.json() == HUNG_AND_DRAINING
    with TestClient(ray_app.ingress_app(_ingress_with([TimeoutError("no replica yet")]))) as http:
        none = http.get("/health/ready")
    assert none.status_code == 503 and none.json()["status"] == "unavailable" and none.json()["replicas"] == {}
    assert none.json()["reason"].startswith(f"no model replica answered within {ray_app.DESCRIBE_TIMEOUT:g} s")


def _router_of(app: str, stats: dict[str, dict] | None):
    """catrt's router as Ray makes one for a handle (`initialize_state` called), holding replicas that reported
    `stats` (replica id -> routing stats); None: Ray has not handed it the running replicas yet."""
    import asyncio

    from ray.serve._private.common import DeploymentHandleSource

    from catrt.serve.ray_app import ReadyFirstRouter

    deployment = DeploymentID(name=MODEL_DEPLOYMENT, app_name=app)

    async def made() -> ReadyFirstRouter:
        router = ReadyFirstRouter(deployment, DeploymentHandleSource.REPLICA)
        router.initialize_state()
        if stats is not None:
            router.update_replicas([SimpleNamespace(replica_id=ReplicaID(name, deployment), routing_stats=reported,
                                                    max_ongoing_requests=2, get_queue_len=_idle)
                                    for name, reported in stats.items()])
        await asyncio.sleep(0)  # Ray's ping of the replicas it was handed
        return router

    return asyncio.run(made())


async def _idle(*, deadline_s: float) -> int:
    return 0


def test_a_busy_fleet_stays_ready_by_the_states_its_replicas_report() -> None:
    """/health/ready asked a replica, and a question waits for one of its --max-queue slots like any request: with
    every replica busy and more requests waiting in the ingress, Ray refused the question (BackPressureError), or it
    waited past 5 s, and the fleet answered 503 "no model replica answered": a readiness probe took a busy fleet out
    of service. The states the replicas report to the ingress's router are read instead; no replica is asked."""
    from fastapi.testclient import TestClient
    from ray.serve.exceptions import BackPressureError

    import catrt.serve.ray_app as ray_app
    from catrt.serve.router_states import forget

    busy = BackPressureError(num_queued_requests=2, max_queued_requests=2)
    describes = [busy, busy, busy]
    router = _router_of(UNIT_APP, {"a": {"status": "hung", "reason": "stuck", "sizes": ["64x64"]},
                                   "b": {"status": "ready", "reason": None, "sizes": ["64x64"]}})
    try:
        with TestClient(ray_app.ingress_app(_ingress_with(describes))) as http:
            ready = http.get("/health/ready")
    finally:
        forget(router)
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "sizes": ["64x64"]}
    assert len(describes) == 3


def test_readiness_from_the_replicas_states_names_each_and_asks_where_one_has_not_reported() -> None:
    """Every replica reported a state other than ready: 503 naming each with its state and reason, no replica asked. A
    replica that has not reported yet (just started) may be ready: then the replicas are asked."""
    from fastapi.testclient import TestClient

    import catrt.serve.ray_app as ray_app
    from catrt.serve.router_states import forget

    hung = {"status": "hung", "reason": "a step or the device is stuck", "sizes": ["64x64"]}
    router = _router_of(UNIT_APP, {"a": hung, "b": {"status": "draining", "reason": None, "sizes": ["64x64"]}})
    try:
        with TestClient(ray_app.ingress_app(_ingress_with([]))) as http:
            refused = http.get("/health/ready")
    finally:
        forget(router)
    assert refused.status_code == 503
    assert refused.json() == HUNG_AND_DRAINING
    describes = [_described("new", "ready")]
    router = _router_of(UNIT_APP, {"a": hung, "new": {}})
    try:
        with TestClient(ray_app.ingress_app(_ingress_with(describes))) as http:
            asked = http.get("/health/ready")
    finally:
        forget(router)
    assert asked.status_code == 200 and describes == []


def test_readiness_answers_at_once_where_the_router_lists_no_replica() -> None:
    """No replica running (loading, not placed, replaced): the question to one waited 5 s for none, past a readiness
    probe's own timeout (Kubernetes' default is 1 s), so the probe saw a timeout rather than the 503 and its reason.
    The ingress's router lists none: 503 at once, no replica asked."""
    from fastapi.testclient import TestClient

    import catrt.serve.ray_app as ray_app
    from catrt.serve.router_states import forget

    describes = [TimeoutError("no replica yet")]
    router = _router_of(UNIT_APP, {})
    try:
        with TestClient(ray_app.ingress_app(_ingress_with(describes))) as http:
            none = http.get("/health/ready")
    finally:
        forget(router)
    assert none.status_code == 503 and len(describes) == 1
    assert none.json() == {"status": "unavailable", "sizes": [], "replicas": {},
                           "reason": "no model replica is running (loading, not placed, or being replaced)"}


def test_a_request_a_replica_refused_before_anything_ran_is_asked_once_more() -> None:
    """A hung or stopping replica refuses a request at once (503, `unserved`: nothing ran): the ingress asks Ray once
    more, so the client gets the other replica's answer; a 503 after a replica took the request is not retried (it
    may have run), nor is an unserved answer retried twice."""
    from fastapi.testclient import TestClient

    import catrt.serve.ray_app as ray_app

    unserved = {**_reply("hung", 503), "unserved": True}
    generates = [unserved, _reply("ready")]
    ingress = _ingress_with([], generates)
    with TestClient(ray_app.ingress_app(ingress)) as http:
        answered = http.post("/v1/images/generations", json={"prompt": "a red sun"})
        assert answered.status_code == 200 and generates == []
        answers = {(sample.labels["replica"], sample.labels["status"]) for family in
                   text_string_to_metric_families(ingress.metrics.render().decode()) for sample in family.samples
                   if sample.name == "catrt_replica_answers_total"}
        assert answers == {("hung", "503"), ("ready", "200")}  # the refusal is counted against its replica
        generates += [_reply("stopped", 503), _reply("ready")]
        assert http.post("/v1/images/generations", json={"prompt": "a red sun"}).status_code == 503
        assert len(generates) == 1
        generates[:] = [unserved, unserved, _reply("ready")]
        assert http.post("/v1/images/generations", json={"prompt": "a red sun"}).status_code == 503
        assert len(generates) == 1



def test_a_replica_that_refused_a_request_unserved_draws_neither_its_retry_nor_new_requests_for_a_while() -> None:
    """A replica turning hung or stopping refuses at once, so it has no request ongoing, and until its new state reached
    the ingress's router (about a second) the power of two choices picked it over a busy ready one: the ingress's
    one retry went back to it, a 503 again. The ingress tells its router; nothing goes there for REFUSED_HOLD
    seconds (the router's clock stands in here), and then its state decides."""
    import asyncio

    from fastapi.testclient import TestClient

    import catrt.serve.ray_app as ray_app
    from catrt.serve.router_states import forget

    ready = {"status": "ready", "reason": None, "sizes": ["64x64"]}
    router = _router_of(UNIT_APP, {"a": ready, "b": ready})
    now = [100.0]
    router.clock = lambda: now[0]

    def chosen() -> set[str]:
        candidates = list(router.curr_replicas.values())
        return {replica.replica_id.unique_id for _ in range(50)
                for replica in asyncio.run(router.choose_replicas(candidates))[0]}

    generates = [{**_reply("a", 503), "unserved": True}, _reply("b")]
    try:
        assert chosen() == {"a", "b"}  # precondition: both ready
        with TestClient(ray_app.ingress_app(_ingress_with([], generates))) as http:
            assert http.post("/v1/images/generations", json={"prompt": "a red sun"}).status_code == 200
        assert generates == [] and chosen() == {"b"}
        now[0] += ray_app.REFUSED_HOLD - 0.1
        assert chosen() == {"b"}
        now[0] += 0.1
        assert chosen() == {"a", "b"}
    finally:
        forget(router)


READY = {"status": "ready", "reason": None, "sizes": ["64x64"]}


def _admitting(generate=None, replicas: int = 1, **config: object):
    """An ingress of UNIT_APP whose model handle's calls run `generate` (as tasks: Ray's calls can be cancelled)."""
    import catrt.serve.ray_app as ray_app

    def remote(body: dict, request_id: str) -> asyncio.Task:
        return asyncio.ensure_future(generate(body, request_id))

    models = SimpleNamespace(app_name=UNIT_APP, deployment_name=MODEL_DEPLOYMENT, generate=SimpleNamespace(remote=remote))
    return ray_app.Ingress(ServeConfig(model="reference", **config).to_dict(), models, replicas=replicas)


def _gauges(ingress) -> dict[str, float]:
    """The ingress's admission gauges as /metrics shows them."""
    return {sample.name: sample.value for family in text_string_to_metric_families(ingress.metrics.render().decode())
            for sample in family.samples if sample.name in ("catrt_fleet_in_flight", "catrt_fleet_capacity")}


def test_a_burst_of_the_fleets_capacity_is_admitted_and_one_more_is_a_429() -> None:
    """2 replicas of --max-queue 2 take 6 requests at once (2 at each, 2 waiting in the ingress). Ray's own bound
    (`max_queued_requests`) counted requests still being routed as waiting, and on a loaded machine its probes of the
    replicas lagged, so bursts below capacity got 429s (about 2% of 6 clients' requests against 2 replicas of
    --max-queue 4). The ingress counts what it has in flight: a burst of 6 all reach the model handle, held there
    until released; the 7th is a 429 with Retry-After in OpenAI's error body, before any call."""
    import catrt.serve.ray_app as ray_app
    from catrt.serve.router_states import forget

    calls: list[str] = []
    held, release = asyncio.Event(), asyncio.Event()

    async def generate(body: dict, request_id: str) -> dict:
        calls.append(request_id)
        if len(calls) > 6:  # past capacity: a call the ingress should not have made
            return _reply("b")
        if len(calls) == 6:
            held.set()
        await release.wait()
        return _reply("a")

    async def scenario(ingress) -> tuple[httpx.Response, dict[str, float], list[httpx.Response]]:
        transport = httpx.ASGITransport(app=ray_app.ingress_app(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as client:
            def post() -> asyncio.Future:
                return asyncio.ensure_future(client.post("/v1/images/generations", json={"prompt": "a red sun"}))

            burst = [post() for _ in range(6)]
            await asyncio.wait_for(held.wait(), WAIT_SECONDS)  # all 6 admitted and held at the model handle
            gauges = _gauges(ingress)
            refused = await post()
            release.set()
            return refused, gauges, list(await asyncio.gather(*burst))

    router = _router_of(UNIT_APP, {"a": READY, "b": READY})
    try:
        ingress = _admitting(generate, max_queue=2)
        refused, gauges, answered = asyncio.run(scenario(ingress))
    finally:
        forget(router)
    assert gauges == {"catrt_fleet_in_flight": 6.0, "catrt_fleet_capacity": 6.0}
    assert [response.status_code for response in answered] == [200] * 6 and len(calls) == 6
    error = assert_error(refused, 429, None)
    assert error["message"] == "every model replica is busy and 2 requests wait; retry later"
    assert refused.headers["retry-after"] == "1"
    assert _gauges(ingress)["catrt_fleet_in_flight"] == 0


def test_the_fleets_capacity_counts_the_replicas_that_can_take_requests_now() -> None:
    """(replicas + 1) x --max-queue, the replicas those the ingress's router lists that reported ready or have not
    reported yet (just started): a hung or stopping one refuses requests and adds no room, and a fleet that lost
    every replica takes only --max-queue waiting for one. Before Ray has handed the router the running replicas (or
    made it: the ingress's first call does), the replicas the fleet was deployed with."""
    from catrt.serve.router_states import forget

    ingress = _admitting(replicas=3, max_queue=2)
    assert ingress.admission.capacity() == 8  # no router yet
    for stats, capacity in [(None, 8), ({"a": READY, "b": {"status": "hung", "reason": "stuck", "sizes": ["64x64"]},
                                         "c": {"status": "draining", "reason": None, "sizes": ["64x64"]}, "new": {}}, 6),
                            ({}, 2)]:
        router = _router_of(UNIT_APP, stats)
        try:
            assert ingress.admission.capacity() == capacity, stats
        finally:
            forget(router)


def test_a_request_gives_its_place_back_however_it_ends() -> None:
    """A request holds one place from admission to its end, so a place kept by mistake would be a 429 more for good.
    Answered after an unserved refusal and the retry (one place for both calls), its replica dead (503), no answer
    within --timeout (504), its client gone (cancelled while a replica has it): every place is back."""
    from catrt.errors import RequestTimeoutError
    from catrt.serve.router_states import forget
    from catrt.serve.schemas import ImageGenerationRequest

    body = ImageGenerationRequest.model_validate({"prompt": "a red sun"})
    places: list[int] = []  # the places taken as each call was made
    called: list[str] = []
    asked = asyncio.Event()
    answers = [{**_reply("a", 503), "unserved": True}, _reply("b")]

    async def generate(payload: dict, request_id: str) -> dict:
        places.append(ingress.admission.in_flight)
        called.append(request_id)
        if request_id == "answered":
            return answers.pop(0)
        if request_id == "dead":
            raise ray.exceptions.RayActorError()
        asked.set()
        await asyncio.Event().wait()  # never answers

    async def scenario() -> None:
        assert (await ingress.forward(body, "answered"))["replica"] == "b"
        with pytest.raises(ServiceUnavailableError, match="the model replica serving this request stopped"):
            await ingress.forward(body, "dead")
        assert ingress.admission.in_flight == 0
        with pytest.raises(RequestTimeoutError):  # the call never answers: --timeout passes whatever the machine
            await ingress.forward(body, "late")
        assert ingress.admission.in_flight == 0
        asked.clear()
        leaving = asyncio.ensure_future(ingress.forward(body, "left"))
        await asyncio.wait_for(asked.wait(), WAIT_SECONDS)
        assert ingress.admission.in_flight == 1
        leaving.cancel()  # as Ray's proxy does once the client is gone
        with pytest.raises(asyncio.CancelledError):
            await leaving

    router = _router_of(UNIT_APP, {"a": READY})
    try:
        ingress = _admitting(generate, max_queue=1, timeout=0.2)
        asyncio.run(scenario())
    finally:
        forget(router)
    assert called == ["answered", "answered", "dead", "late", "left"] and places == [1, 1, 1, 1, 1]
    assert ingress.admission.in_flight == 0 and ingress.admission.capacity() == 2


def test_the_model_deployment_leaves_the_429_to_the_ingress() -> None:
    """Ray's bound on requests waiting in a handle is off (it refused bursts below capacity); each replica still takes
    --max-queue at once, and the ingress learns how many replicas the fleet is deployed with (the autoscaled: its
    minimum) for the moments before its router has heard."""
    def deployments(fleet: FleetConfig) -> tuple:  # (the ingress's bound deployment, the model deployment)
        ingress = application(ServeConfig(model="reference", max_queue=4), fleet, gpus=False)._bound_deployment
        return ingress, ingress.init_args[1]._bound_deployment

    ingress, model = deployments(FleetConfig(replicas=2))
    assert model._deployment_config.max_ongoing_requests == 4 and model._deployment_config.max_queued_requests == -1
    assert ingress.init_args[3] == 2
    assert deployments(FleetConfig(min_replicas=3, max_replicas=8))[0].init_args[3] == 3


@pytest.mark.parametrize(("max_queue", "target"), [(1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0), (16, 2.0)])
def test_an_autoscaled_fleet_grows_once_its_requests_wait_whatever_its_max_queue(max_queue: int, target: float) -> None:
    """Ray Serve adds a replica above `target_ongoing_requests` per replica (default 2), counting the requests a replica
    took and those waiting in a handle for one; a fleet holds at most (replicas + 1) x --max-queue, so at --max-queue 1
    (1 taken + 1 waiting per replica) Ray's default was never exceeded and the fleet never grew."""
    config = ServeConfig(model="reference", max_queue=max_queue)
    ingress = application(config, FleetConfig(min_replicas=1, max_replicas=4), gpus=False)._bound_deployment
    autoscaling = ingress.init_args[1]._bound_deployment._deployment_config.autoscaling_config
    assert autoscaling.target_ongoing_requests == target


def test_a_ray_whose_router_api_lacks_what_catrts_router_reads_is_refused_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray Serve's request router API is alpha: a Ray without a replica's `routing_stats` ran the fleet, and every
    request failed inside Ray's routing loop (a traceback each) and waited unrouted for --timeout's 504. One line
    before ray.init instead, naming what is missing (and by the KubeRay builder)."""
    from ray.serve.request_router import RunningReplica

    from catrt.serve.ray_app import run_fleet

    def deployed(*args: object, **kwargs: object) -> None:
        raise AssertionError("the application was deployed")

    calls, _ = _fake_ray(monkeypatch, {"CPU": 2.0}, deployed)
    monkeypatch.delattr(RunningReplica, "routing_stats")
    with pytest.raises(ConfigError, match=rf"^--ray cannot run on Ray {ray.__version__}: its Ray Serve request router "
                                          r"API \(alpha\) lacks RunningReplica.routing_stats, which catrt's router "
                                          r"reads; install a Ray catrt runs on: pip install "):
        run_fleet(ServeConfig(model="reference", port=_free_port()), FleetConfig(replicas=1))
    assert calls == []
    with pytest.raises(ConfigError, match="lacks RunningReplica.routing_stats"):
        build({"serve": {"model": "reference"}, "fleet": {"replicas": 1}})


def test_a_cuda_index_is_refused_before_ray_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray shows each model replica only the GPU it assigned, as cuda:0: `--device cuda:1` failed to load in every
    replica after Ray had started. Refused in one line, before ray.init (and by the KubeRay builder)."""
    from catrt.serve.ray_app import run_fleet

    def deployed(*args: object, **kwargs: object) -> None:
        raise AssertionError("the application was deployed")

    calls, _ = _fake_ray(monkeypatch, {"CPU": 2.0, "GPU": 2.0}, deployed)
    message = "--device cuda:1 is not served with --ray: Ray assigns each model replica its GPU; use --device cuda"
    with pytest.raises(ConfigError) as refused:
        run_fleet(ServeConfig(model="reference", device="cuda:1", port=_free_port()), FleetConfig(replicas=1))
    assert str(refused.value) == message and refused.value.field == "device" and calls == []
    with pytest.raises(ConfigError, match="^--device cuda:0 is not served with --ray"):
        build({"serve": {"model": "reference", "device": "cuda:0"}, "fleet": {"replicas": 1}})
