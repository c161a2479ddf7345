"""`catrt serve --ray`: the OpenAI images routes as a Ray Serve application, for a fleet of devices.

Two deployments. `Ingress` (one replica, no device) answers HTTP with the single-process server's
own app pieces (`base_app`: OpenAI error bodies, the request gate with API key and body limit,
request metrics, `/health/live`; the strict request schema) and hands each parsed body to a
`ModelReplica`. Each model replica owns one device (`num_gpus=1` where it serves on CUDA: `replica_device`) and
runs the single-process server's `Worker` and `ImageService`: the same admission checks (they need
the model's tokenizers, so they run where the model is), queue, batching, deadlines and response.
The worker batches rather than `@serve.batch` because it groups only requests of one size,
guidance and negative prompt, drops requests past their deadline before they run and stops a call
nobody waits for; a time-window batcher does none of that. The ingress's calls are routed by `ReadyFirstRouter`, to
the replicas whose latest routing stats say ready, so a hung replica (refusing at once until Serve replaces it) does
not draw the requests. The ingress, not Ray, decides which requests are a 429 (`FleetAdmission`): those past the live
replicas' --max-queue each plus --max-queue waiting.

Imported only by `catrt serve --ray` (and Ray itself): importing catrt never imports Ray.
For KubeRay, a RayService's `serveConfigV2` can name the builder `catrt.serve.ray_app:build` with
`args` as `build` takes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Collection
from typing import Any

import ray
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import Counter, Gauge
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from catrt.errors import CatrtError, ConfigError, GenerationError, RequestTimeoutError, ServiceUnavailableError
from catrt.notices import hub_notices_dropped, quiet_known_notices
from catrt.serve.app import ERROR_RESPONSES, GENERATIONS_PATH, METRICS_RESPONSES, ImageService, base_app
from catrt.serve.config import FleetConfig, ServeConfig, check_known_fields
from catrt.serve.errors import REQUEST_ID_KEY, catrt_error_response, internal_error_message
from catrt.serve.fleet_admission import FleetAdmission
from catrt.serve.fleet_start import (LOCAL, check_fleet_device, check_local_room, first_line, joined_room_warning,
                                     ray_start_error, replica_device)
from catrt.serve.metrics import CONTENT_TYPE, HttpMetrics, ReplicaSnapshots, ServerMetrics
from catrt.serve.openapi import describe_served
from catrt.serve.router_states import refused, register, replica_states, routable
from catrt.serve.schemas import ErrorResponse, ImageGenerationRequest, ImageGenerationResponse

logger = logging.getLogger(__name__)

APP_NAME = "catrt"
MODEL_DEPLOYMENT = "catrt-model"
INGRESS_DEPLOYMENT = "catrt-ingress"
DESCRIBE_TIMEOUT = 5.0  # seconds the ingress waits for a replica to say how it is
# Replicas one readiness probe may ask while those that answer are not ready (each answers at once; one that does
# not answer within DESCRIBE_TIMEOUT ends the probe).
READY_ASKS = 3
# Seconds between two of a model replica's routing stats (its condition, `ModelReplica.record_routing_stats`), as
# Serve's controller asks each replica for them and hands them to the ingress's router (`ReadyFirstRouter`).
ROUTING_STATS_PERIOD = 1.0
# Seconds the ingress's router sends nothing to a replica that refused a request before anything ran (`Ingress.forward`)
# while its routing stats still say ready: its new state reaches the router within about ROUTING_STATS_PERIOD.
REFUSED_HOLD = 3 * ROUTING_STATS_PERIOD
# Seconds one listing of the live model replicas serves /metrics scrapes: a flood of scrapes asks Serve's controller
# at most once a second.
LISTING_INTERVAL = 1.0
# Seconds Ray's proxy waits past the ingress's own deadlines (body, then answer) before its own 408: the
# ingress answers first, in OpenAI's error body; the proxy's timeout is the backstop for a stuck ingress.
PROXY_GRACE_SECONDS = 5.0
# Seconds a shutdown waits for `serve.run`, interrupted by a signal, to return once Serve's controller is gone.
DEPLOY_JOIN_SECONDS = 10.0
SERVE_LOGGER = "ray.serve"  # Ray Serve's logger, set to INFO with a console handler when `ray.serve` is imported


class _Detached:
    """What `ImageService` reads of a request inside a replica: its id. A client that leaves cancels the
    Ray call instead (the service then gives the job up)."""

    def __init__(self, request_id: str) -> None:
        self.scope = {REQUEST_ID_KEY: request_id}

    async def is_disconnected(self) -> bool:
        return False


class ModelReplica:
    """One device: loads every build of `config`, warms each up, then answers checked bodies.

    The constructor returns once the model is warm, so Ray Serve routes nothing to a replica that is
    still loading; `check_health` fails once its worker has died or while it is hung in a call (`Worker.hang`), and
    Ray Serve replaces it.
    """

    def __init__(self, config: dict[str, Any], bundle_key: bytes | None = None) -> None:
        quiet_known_notices()  # this replica is a process of `catrt serve --ray`: its output is the CLI's
        from catrt.serve.routing import load_router
        from catrt.serve.worker import Worker

        serve_config = ServeConfig.from_dict(config)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = metrics = ServerMetrics()
        self.worker = Worker(lambda: load_router(serve_config, bundle_key), serve_config.max_queue, metrics,
                             on_exit=lambda state: None, alpha_policy=serve_config.alpha_policy,
                             latency_target=serve_config.latency_target, hang_grace=serve_config.hang_grace)
        metrics.watch_queue(lambda: self.worker.depth, self.worker.depth_by_size)
        with hub_notices_dropped():  # the model loads on the worker's thread; a failed load is reported below
            self.worker.start()
            while self.worker.state == "loading":
                time.sleep(0.05)
        if self.worker.served is None:
            raise ServiceUnavailableError(f"replica {self.replica} could not load the model: {self.worker.error!r}")
        self.service = ImageService(self.worker, metrics, serve_config)
        logger.info("replica %s serves %s", self.replica, self.worker.served.sizes)

    async def generate(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        """`{"status", "body", "headers", "replica", "depth", "metrics"}`: the answer the ingress sends, as the
        single server would, and this replica's series in the text format (for `ReplicaSnapshots`)."""
        try:
            self.worker.check_room()  # hung, stopped or draining: refused before anything runs (or a full queue, 429)
        except ServiceUnavailableError as error:
            return {**self._reply(catrt_error_response(error)), "unserved": True}  # the ingress may ask another replica
        except CatrtError as error:
            return self._reply(catrt_error_response(error))
        try:
            response = await self.service.generate(ImageGenerationRequest.model_validate(body), _Detached(request_id))
        except CatrtError as error:
            return self._reply(catrt_error_response(error))
        except Exception:  # noqa: BLE001 - a bug answers 500 with the request id; the replica log has it
            logger.exception("request %s: unexpected error in replica %s", request_id, self.replica)
            return self._reply(catrt_error_response(GenerationError(internal_error_message(request_id))))
        payload = response.model_dump(mode="json")
        payload["catrt"]["replica"] = self.replica
        return self._answer(200, payload, {})

    def _reply(self, answer: JSONResponse) -> dict[str, Any]:
        headers = {key: value for key, value in answer.headers.items() if key.lower() == "retry-after"}
        return self._answer(answer.status_code, json.loads(answer.body), headers)

    def _answer(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        return {"status": status, "body": body, "headers": headers, "replica": self.replica, "depth": self.worker.depth,
                "metrics": self.metrics.render().decode()}

    def describe(self) -> dict[str, Any]:
        """The replica's state (and why, where it is hung), sizes and the request fields' OpenAPI description."""
        rules = self.service.rules()
        return {**self.record_routing_stats(), "replica": self.replica, "model": self.worker.served.default.spec.model,
                "properties": rules.properties() if rules is not None else None,
                "size_rules": rules.size_rules() if rules is not None else None}

    def record_routing_stats(self) -> dict[str, Any]:
        """What Serve's controller hands the ingress's router every ROUTING_STATS_PERIOD: this replica's state (and why,
        where it is hung) and sizes, which the router routes by and /health/ready reports (`replica_states`)."""
        status, reason = self.worker.condition()
        return {"status": status, "reason": reason, "sizes": self.worker.served.sizes}

    def check_health(self) -> None:
        """Ray Serve's health check (every `health_check_period_s`): raising makes the controller kill this replica
        and start another; a dead worker or one hung in a call (a stuck step holds the device for good) raises."""
        status, reason = self.worker.condition()
        if status != "ready":
            raise ServiceUnavailableError(f"replica {self.replica} is {status}" + ("" if reason is None else f": {reason}"))


class _Described:
    """The request fields' description (and per-size alternatives) a replica gave, for `describe_served`."""

    def __init__(self, properties: dict[str, dict[str, Any]], size_rules: list[dict[str, Any]] | None) -> None:
        self._properties = properties
        self._size_rules = size_rules

    def properties(self) -> dict[str, dict[str, Any]]:
        return self._properties

    def size_rules(self) -> list[dict[str, Any]] | None:
        return self._size_rules


class FleetMetrics:
    """Per-replica series the ingress records from each replica's answers (its own registry: `metrics`), and the
    replicas' own series as their answers bring them (`ReplicaSnapshots`); `retain` drops those of replicas that
    are gone (killed, replaced, scaled down), which would otherwise show on dashboards until the ingress restarts."""

    def __init__(self, metrics: HttpMetrics) -> None:
        self.answers = Counter("catrt_replica_answers", "answers by model replica and status",
                               ["replica", "status"], registry=metrics.registry)
        self.images = Counter("catrt_replica_images_generated", "images generated by model replica and size",
                              ["replica", "size"], registry=metrics.registry)
        self.depth = Gauge("catrt_replica_queue_depth", "requests waiting at a model replica when it last answered",
                           ["replica"], registry=metrics.registry)
        self.snapshots = ReplicaSnapshots()
        metrics.registry.register(self.snapshots)
        self.answered: dict[str, float] = {}  # replica id -> monotonic time of its latest answer
        self._labels: dict[str, set[tuple[Counter | Gauge, tuple[str, ...]]]] = {}  # replica id -> its series here

    def observe(self, reply: dict[str, Any]) -> None:
        replica = reply["replica"]
        self.answered[replica] = time.monotonic()
        self.snapshots.update(replica, reply["metrics"])
        self._series(self.answers, replica, str(reply["status"])).inc()
        self._series(self.depth, replica).set(reply["depth"])
        if reply["status"] == 200:
            self._series(self.images, replica, reply["body"]["size"]).inc(len(reply["body"]["data"]))

    def _series(self, metric: Counter | Gauge, replica: str, *labels: str) -> Any:
        """`metric`'s child for (replica, *labels), remembered so that `retain` can remove it."""
        self._labels.setdefault(replica, set()).add((metric, (replica, *labels)))
        return metric.labels(replica, *labels)

    def retain(self, live: Collection[str], listed_at: float) -> list[str]:
        """Drop every series of each replica not in `live` (the replicas Ray Serve listed, asked at monotonic time
        `listed_at`) that has not answered since; the replicas dropped. A replica that answered after the listing
        was asked for may have started after it, and is kept."""
        gone = sorted(replica for replica, at in self.answered.items() if replica not in live and at < listed_at)
        for replica in gone:
            del self.answered[replica]
            self.snapshots.forget(replica)
            for metric, labels in self._labels.pop(replica, ()):
                metric.remove(*labels)
        return gone


class ReadyFirstRouter(FIFOMixin, RequestRouter):
    """Routes the ingress's calls to the model replicas: two chosen at random among those whose latest routing stats
    say ready and that refused no request lately (`refused_by`; all where none is, so each still answers why), the
    one with fewer ongoing requests taken, as Ray Serve's own power of two choices. That one preferred a hung replica
    (it refuses each request at once, so it had none ongoing) and sent it most new requests until Serve replaced it,
    three failed health checks later.

    Each choice is a whole round, so the request waits (Ray's exponential backoff) before the next: Ray's loop backs off
    only where the router says so (`should_backoff`, else it expects a narrower choice to widen next round), and
    without it a fleet whose replicas were all full had the ingress probe their queue lengths without pause."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = time.monotonic
        self.refusals: dict[str, float] = {}  # replica id -> when (`clock`) it last refused a request unserved
        self.listed = False  # whether Ray has handed this router the running replicas yet (`routable`)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        now = self.clock()
        ready = [replica for replica in candidate_replicas if replica.routing_stats.get("status", "ready") == "ready"
                 and self.refusals.get(replica.replica_id.unique_id, -math.inf) + REFUSED_HOLD <= now]
        pool = ready or candidate_replicas
        return [random.sample(pool, min(2, len(pool)))] if pool else []

    def initialize_state(self, **kwargs: Any) -> None:
        """Called by Ray once it has made this router (a handle's, at the handle's first call): listed for
        `/health/ready` and `Ingress.forward` (`router_states`)."""
        register(self)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray hands the running replicas (at first, then at each change): until it has, `curr_replicas` is empty
        whether or not replicas run, and the ingress's admission counts the replicas it was deployed with."""
        super().update_replicas(replicas)
        self.listed = True

    def refused_by(self, replica: str) -> None:
        """`replica` refused a request before anything ran (hung, stopping): nothing more goes there for REFUSED_HOLD
        seconds, by when its state says why. Its stats said ready until then, and it had no request ongoing (it
        refuses at once), so the power of two choices sent it the ingress's retry too, and most new requests."""
        now = self.clock()
        self.refusals = {**{held: at for held, at in self.refusals.items() if at + REFUSED_HOLD > now}, replica: now}


def check_router_api() -> None:
    """Refuse, before Ray starts, a Ray whose request router API (alpha: any release may change it) lacks what
    `ReadyFirstRouter` and `router_states` read. Ray calls the router from its own routing loop: a missing attribute
    failed there for every request (a traceback each in the ingress's log), which then waited unrouted for --timeout's
    504, while the fleet said it was listening."""
    gaps = [f"RunningReplica.{name}" for name in ("replica_id", "routing_stats") if not hasattr(RunningReplica, name)]
    gaps += [f"RequestRouter.{name}" for name in ("app_name", "curr_replicas", "initialize_state", "update_replicas")
             if not hasattr(RequestRouter, name)]
    if "unique_id" not in getattr(ReplicaID, "__dataclass_fields__", {}):
        gaps.append("ReplicaID.unique_id")
    context = getattr(PendingRequest, "__dataclass_fields__", {}).get("routing_context")
    if context is None or not hasattr(context.default_factory(), "should_backoff"):
        gaps.append("PendingRequest.routing_context.should_backoff")
    if gaps:
        raise ConfigError(
            f"--ray cannot run on Ray {ray.__version__}: its Ray Serve request router API (alpha) lacks "
            f"{', '.join(gaps)}, which catrt's router reads; install a Ray catrt runs on: "
            'pip install "ray[serve]==2.60.0"',
            field="ray", value=ray.__version__,
        )


class Ingress:
    """HTTP in front of the model replicas; see the module docstring.

    It decides which requests the fleet takes (`admission`): the model replicas that can take requests now, as its
    router last heard them (`routable`; `replicas`, the count it was deployed with, until the router has heard), each
    take --max-queue and --max-queue more wait here. The deployment has one replica, so its count is the fleet's."""

    def __init__(self, config: dict[str, Any], models: DeploymentHandle, api_key: str | None = None,
                 replicas: int = 1) -> None:
        self.config = ServeConfig.from_dict({**config, "api_key": api_key})
        self.models = models
        self.metrics = HttpMetrics()
        self.fleet = FleetMetrics(self.metrics)
        self.deployed_replicas = replicas
        self.admission = FleetAdmission(self.config.max_queue, self._routable)
        Gauge("catrt_fleet_in_flight", "requests the ingress has admitted and not yet answered",
              registry=self.metrics.registry).set_function(lambda: self.admission.in_flight)
        Gauge("catrt_fleet_capacity", "requests the fleet takes at once; one more is a 429",
              registry=self.metrics.registry).set_function(self.admission.capacity)
        self.described: dict[str, _Described] = {}
        self._listing: asyncio.Future[set[str] | None] | None = None  # the latest listing of the live replicas
        self._listed_at = -math.inf  # when it was asked for (monotonic)
        self._asking: asyncio.Future[dict[str, Any]] | None = None  # the call to Serve's controller, on a thread
        self._listing_failed = False

    def _routable(self) -> int:
        replicas = routable(self.models.app_name)
        return self.deployed_replicas if replicas is None else replicas

    async def describe(self) -> dict[str, Any] | None:
        """A replica's description (cached for the OpenAPI document), or None if none answers in time."""
        try:
            state = await asyncio.wait_for(self.models.describe.remote(), DESCRIBE_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - no replica, a dying one, a timeout: all "not ready"
            logger.info("no model replica answered: %r", error)
            return None
        if state["properties"] is not None:
            self.described.setdefault("rules", _Described(state["properties"], state["size_rules"]))
        return state

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        """/health/ready's status and body: 200 while a model replica is ready; the 503 body names each replica heard
        from, with its state and why.

        The states are those the replicas last reported to the ingress's router (`replica_states`), which asks no
        replica: a question waited for one of a replica's --max-queue slots, behind its requests, so a busy fleet (every
        slot taken, more requests waiting in the ingress) answered 503 "no model replica answered", and a readiness
        probe took a busy fleet out of service.
        A router that lists no replica answers at once (a question waited DESCRIBE_TIMEOUT for one, past a probe's
        own timeout). Until every replica the router lists has reported (the ingress's first call makes its router),
        replicas are asked: Ray routes each question to one replica, so while those that answer are not ready (hung,
        stopping) up to READY_ASKS are."""
        states = replica_states(self.models.app_name)
        if states == {}:
            return 503, {"status": "unavailable", "sizes": [], "replicas": {},
                         "reason": "no model replica is running (loading, not placed, or being replaced)"}
        if states:
            ready = next((state for state in states.values() if state.get("status") == "ready"), None)
            if ready is not None:
                return 200, {"status": "ready", "sizes": ready["sizes"]}
            if all(states.values()):
                return self._not_ready({replica: {"status": state["status"], "reason": state.get("reason")}
                                        for replica, state in states.items()})
        heard: dict[str, dict[str, Any]] = {}
        for _ in range(READY_ASKS):
            state = await self.describe()
            if state is None:
                break
            if state["status"] == "ready":
                return 200, {"status": "ready", "sizes": state["sizes"]}
            heard[state["replica"]] = {"status": state["status"], "reason": state.get("reason")}
        if not heard:
            return 503, {"status": "unavailable", "sizes": [], "replicas": {},
                         "reason": f"no model replica answered within {DESCRIBE_TIMEOUT:g} s (none running yet: loading, "
                                   "not placed, or being replaced)"}
        return self._not_ready(heard)

    @staticmethod
    def _not_ready(heard: dict[str, dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        states = ", ".join(f"{replica} is {state['status']}" for replica, state in heard.items())
        return 503, {"status": next(iter(heard.values()))["status"], "sizes": [], "replicas": heard,
                     "reason": f"no model replica asked is ready: {states}"}

    async def served_model(self) -> str | None:
        """The model name a replica describes (None if none answers): the ingress may run on a node without the
        engine folders whose manifests name it (a KubeRay head pod without the model volume)."""
        state = await self.describe()
        return None if state is None else state["model"]

    async def forget_gone_replicas(self) -> None:
        """Drop the series of the model replicas Ray Serve no longer lists (`FleetMetrics.retain`), before a scrape.
        Concurrent scrapes, and those within LISTING_INTERVAL of the last listing, share one listing."""
        if self._listing is None or time.monotonic() - self._listed_at >= LISTING_INTERVAL:
            self._listed_at = time.monotonic()
            self._listing = asyncio.ensure_future(self._live_replicas())
        listing, listed_at = self._listing, self._listed_at
        live = await asyncio.shield(listing)  # a scraper that leaves does not cancel the listing others wait for
        if live is not None:
            for replica in self.fleet.retain(live, listed_at):
                logger.info("model replica %s is gone: its series are dropped from /metrics", replica)

    async def _live_replicas(self) -> set[str] | None:
        """The ids of the model deployment's replicas Ray Serve lists now (starting, running or stopping: a replica
        leaves the list once it has stopped or died), or None where Serve's controller does not say in time (every
        series is then kept). The list is `serve status`'s and Serve's REST API's (the documented schema
        `ray.serve.schema.ServeInstanceDetails`, whose `ReplicaDetails.replica_id` is the id a replica reports),
        read through the client `serve.status()` reads it with: Ray has no other Python call that names replicas."""
        if self._asking is not None and not self._asking.done():
            return None  # the last call is still stuck: at most one thread waits on the controller
        self._asking = asyncio.ensure_future(asyncio.to_thread(_serve_details))
        try:
            # shielded: past the timeout the thread runs on, and `_asking` stays pending until it returns
            details = await asyncio.wait_for(asyncio.shield(self._asking), DESCRIBE_TIMEOUT)
            deployment = details["applications"][self.models.app_name]["deployments"][self.models.deployment_name]
            live = {str(replica["replica_id"]) for replica in deployment["replicas"]}
        except Exception as error:  # noqa: BLE001 - a timeout, a controller restarting, another Ray: keep the series
            if not self._listing_failed:
                logger.warning("could not list the model replicas (%r): /metrics keeps the series of every replica "
                               "that answered until a listing succeeds", error)
            self._listing_failed = True
            return None
        self._listing_failed = False
        return live

    async def forward(self, body: ImageGenerationRequest, request_id: str) -> dict[str, Any]:
        """The replica's reply; a full fleet is a 429, a replica that dies mid-request a 503, none in time a 504.

        A replica that refused the request before anything ran (hung or stopping: `unserved`) is recorded and the
        request asked once more, within the same --timeout: Ray routes it again, away from that replica
        (`ReadyFirstRouter.refused_by`). Nothing else is retried: a request a replica took may have run.
        The request holds its place in `admission` throughout, given back however it ends (answered, timed out, its
        replica dead, cancelled because its client left)."""
        with self.admission.admitted():
            deadline = time.monotonic() + self.config.timeout
            reply = await self._ask(body, request_id, deadline)
            if reply.get("unserved"):
                logger.info("request %s: replica %s refused it unserved (%s); asking again", request_id,
                            reply["replica"], reply["body"]["error"]["message"])
                self.fleet.observe(reply)
                refused(self.models.app_name, reply["replica"])
                reply = await self._ask(body, request_id, deadline)
            return reply

    async def _ask(self, body: ImageGenerationRequest, request_id: str, deadline: float) -> dict[str, Any]:
        """One call to a model replica, answered by `deadline` (monotonic)."""
        call = self.models.generate.remote(body.model_dump(exclude_unset=True), request_id)
        try:
            return await asyncio.wait_for(call, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            call.cancel()
            raise RequestTimeoutError(f"no answer within the server's timeout of {self.config.timeout:g} s") from None
        except ray.exceptions.RayError as error:
            logger.warning("request %s: the model replica failed: %r", request_id, error)
            raise ServiceUnavailableError("the model replica serving this request stopped; retry") from None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return ingress_app(self)


def _serve_details() -> dict[str, Any]:
    """`serve status`'s details, through the private client `serve.status()` uses; imported here, so a Ray that
    moves it breaks only the listing (a logged warning), never the ingress's import."""
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def ingress_app(ingress: Ingress) -> FastAPI:
    """The single server's app (`base_app`) with routes that forward to the model replicas."""
    config, metrics = ingress.config, ingress.metrics
    # Ray's proxy has no read deadline of its own: the ingress keeps one on bodies.
    app = base_app(metrics, config, body_deadline=True, served_model=ingress.served_model)

    @app.post(GENERATIONS_PATH, response_model=ImageGenerationResponse,
              responses={**ERROR_RESPONSES, 408: {"model": ErrorResponse}})
    async def generate_images(body: ImageGenerationRequest, request: Request) -> Any:
        """Images for one prompt, made by one model replica (its id in `catrt.replica`)."""
        reply = await ingress.forward(body, request.scope[REQUEST_ID_KEY])
        ingress.fleet.observe(reply)
        return JSONResponse(reply["body"], status_code=reply["status"], headers=reply["headers"])

    @app.get("/health/ready", responses={503: {"description": "no model replica is ready; the body says why"}})
    async def ready(response: Response) -> dict[str, Any]:
        """200 while a model replica answers ready (Ray Serve routes only to replicas that finished loading)."""
        response.status_code, body = await ingress.readiness()
        return body

    @app.get("/metrics", response_class=PlainTextResponse, responses=METRICS_RESPONSES)
    async def metrics_text() -> Response:
        """Prometheus text format: the ingress's requests and the per-replica series of the replicas Ray Serve lists."""
        await ingress.forget_gone_replicas()
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.middleware("http")
    async def described_first(request: Request, call_next: Any) -> Any:
        """The OpenAPI document states the served values once a replica has described them."""
        if request.url.path == app.openapi_url and "rules" not in ingress.described:
            await ingress.describe()
        return await call_next(request)

    describe_served(app, lambda: ingress.described.get("rules"), api_key=config.api_key is not None,
                    metrics_auth=config.metrics_auth)
    return app


def scaling_target(max_queue: int) -> float:
    """The requests per replica (taken, or waiting in a handle for one) above which Ray Serve adds a replica: its default
    2, or half of --max-queue where that is less. A fleet holds (replicas + 1) x --max-queue at most, so at
    --max-queue 1 the default was never exceeded and the fleet never grew however long its requests waited."""
    return min(2.0, max_queue / 2)


def application(config: ServeConfig, fleet: FleetConfig, gpus: bool, bundle_key: bytes | None = None) -> Any:
    """The Ray Serve application: the ingress bound to `fleet`'s model replicas, one device each (`gpus`: the cluster
    has GPUs; which device a replica holds: `replica_device`, as `check_local_room` counts them)."""
    device = {"num_gpus": 1} if replica_device(config, gpus) == "GPU" else {"num_cpus": 1}
    scaling: dict[str, Any] = (
        {"num_replicas": fleet.replicas} if fleet.replicas is not None
        else {"autoscaling_config": {"min_replicas": fleet.min_replicas, "max_replicas": fleet.max_replicas,
                                     "target_ongoing_requests": scaling_target(config.max_queue)}}
    )
    model = serve.deployment(ModelReplica, name=MODEL_DEPLOYMENT).options(
        # A replica takes up to --max-queue requests (its worker's queue); the ingress admits --max-queue more to wait
        # in its handle for a free replica, and answers one more 429 (`Ingress.admission`). Ray's own bound is off: it
        # counted requests still being routed as waiting, and refused bursts below capacity on a loaded machine.
        ray_actor_options=device, max_ongoing_requests=config.max_queue, max_queued_requests=-1,
        health_check_period_s=2.0, request_router_config=RequestRouterConfig(
            request_router_class=ReadyFirstRouter, request_routing_stats_period_s=ROUTING_STATS_PERIOD,
            request_routing_stats_timeout_s=DESCRIBE_TIMEOUT),
        **scaling,
    )
    ingress = serve.deployment(serve.ingress()(Ingress), name=INGRESS_DEPLOYMENT).options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000,
    )
    settings = config.to_dict()  # without the API key, which only the ingress gets
    # Replicas answer no HTTP: the key and whether /metrics needs it are the ingress's alone.
    replica_settings = {**settings, "metrics_auth": False}
    deployed = fleet.replicas if fleet.replicas is not None else fleet.min_replicas
    return ingress.bind(settings, model.bind(replica_settings, bundle_key), config.api_key, deployed)


def _stop_serve(local: bool) -> None:
    """Shut Ray Serve down, unless this joined a cluster where other applications run: then only catrt's application
    goes (`serve.shutdown` deleted every application on the cluster, a colleague's too)."""
    if not local:
        try:
            others = sorted(set(serve.status().applications) - {APP_NAME})
        except Exception as error:  # noqa: BLE001 - a cluster gone or unreachable: nothing of it to stop
            logger.warning("could not ask Ray Serve which applications run (%r); leaving it as it is", error)
            return
        if others:
            logger.info("deleting application %r; Ray Serve keeps running for %s", APP_NAME, ", ".join(others))
            serve.delete(APP_NAME)
            return
    serve.shutdown()


class _Deploying:
    """`serve.run(app)` on a thread of its own. `serve.run` waits until every replica has loaded and warmed up (minutes
    for a big model) and takes no signal meanwhile: on the main thread it held a SIGTERM or Ctrl-C for that long, and
    for ever where a replica could not be placed."""

    def __init__(self, app: Any) -> None:
        self.failed: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(app,), name="catrt-serve-run", daemon=True)
        self.thread.start()

    def _run(self, app: Any) -> None:
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", logging_config=logging_config())
        except BaseException as error:  # noqa: BLE001 - raised on the main thread by `wait`, unless a signal came first
            self.failed.append(error)

    def wait(self, stop: threading.Event) -> bool:
        """True once the application runs, False if `stop` is set first; raises what `serve.run` raised."""
        while self.thread.is_alive():
            if stop.wait(0.2):
                return False
        if self.failed and isinstance(self.failed[0], RuntimeError):
            raise ServiceUnavailableError(f"the Ray Serve application did not start: {self.failed[0]}") from None
        if self.failed:
            raise self.failed[0]
        return True


def http_options(config: ServeConfig) -> dict[str, Any]:
    """Ray Serve's `HTTPOptions` for `config`: where to listen, and the time limits its proxy can apply.

    The proxy (plain uvicorn) has no read deadline; what Ray offers is an end-to-end limit per request
    (`request_timeout_s`, a 408 once it passes; a client may lower or lift it with the
    `x-request-timeout-seconds` header) and the idle keep-alive time (`keep_alive_timeout_s`, whole
    seconds). The body deadline and the answer's deadline are the ingress's own (`base_app`'s
    `body_deadline`, `Ingress.forward`), which no header changes; the proxy's limit is set past both."""
    return {
        "host": config.host, "port": config.port,
        "request_timeout_s": config.read_timeout + config.timeout + PROXY_GRACE_SECONDS,
        "keep_alive_timeout_s": max(1, math.ceil(config.keep_alive)),
    }


def logging_config() -> dict[str, Any]:
    """Ray Serve's `LoggingConfig` for its controller, proxies and catrt's replicas: catrt's own log level (WARNING,
    INFO with -v) and, as the single-process server, no access log. Ray's default (INFO, access log on) printed
    about three lines per request (proxy, ingress, replica) on the console of `catrt serve --ray`."""
    level = logging.getLogger("catrt").getEffectiveLevel()
    # Serve takes only the named levels: one set between them (15, from Python) logs as the named one below it
    named = max(known for known in (logging.NOTSET, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                    logging.CRITICAL) if known <= level)
    return {"log_level": logging.getLevelName(named), "enable_access_log": False}


def build(args: dict[str, Any]) -> Any:
    """Application builder for `serve run` / KubeRay: `args` = `{"serve": ServeConfig fields, "fleet": FleetConfig
    fields}`; the API key comes from $CATRT_API_KEY, the bundle key from $CATRT_BUNDLE_KEY (as `catrt.load` reads)."""
    from catrt.serve.auth import load_api_key

    if not isinstance(args, dict) or set(args) - {"serve", "fleet"}:
        shown = sorted(map(str, args)) if isinstance(args, dict) else type(args).__name__
        raise ConfigError(f'the builder\'s args are {{"serve": {{...}}, "fleet": {{...}}}}, got {shown}', field="args")
    check_known_fields(ServeConfig, args.get("serve", {}), "serve")
    config = ServeConfig.from_dict({**args.get("serve", {}), "api_key": load_api_key(None)})
    check_known_fields(FleetConfig, args.get("fleet", {}), "fleet")
    fleet = FleetConfig(**args.get("fleet", {}))
    check_fleet_device(config)
    check_router_api()
    return application(config, fleet, gpus=ray.cluster_resources().get("GPU", 0) > 0)


def run_fleet(config: ServeConfig, fleet: FleetConfig, bundle_key: bytes | None = None) -> int:
    """Start (or join) a Ray cluster, run the application on `config.host:config.port` until signalled, shut down.

    A signal while Ray starts or the replicas load stops it too (exit 0, as after serving)."""
    check_fleet_device(config)
    check_router_api()
    stop = threading.Event()
    # Serve's logger in this process ("Started Serve", "Deployed app") logs at INFO whatever catrt's level is.
    logging.getLogger(SERVE_LOGGER).setLevel(logging.getLogger("catrt").getEffectiveLevel())
    # Ctrl-C while Ray starts (seconds) was a KeyboardInterrupt inside ray.init, which left Ray to its exit hook (once
    # seen to crash there, SIGSEGV): it is taken once Ray has started, which then stops as after serving. (SIGTERM
    # there is Ray's own: ray.init installs a handler.)
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    local = fleet.address in (None, LOCAL)
    try:
        # "local", not None: ray.init(address=None) joins the cluster $RAY_ADDRESS names, or one `ray start` left on
        # this machine, where catrt's checks for a local cluster (port, bundles, device, room) do not hold.
        ray.init(address=LOCAL if local else fleet.address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, TimeoutError, RuntimeError) as error:
        raise ray_start_error(error, fleet.address) from None
    for signum in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(signum, lambda *_: stop.set())
    deploying: _Deploying | None = None
    try:
        if stop.is_set():
            logger.info("shutting down before the Ray Serve application was deployed")
            return 0
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0) > 0
        device = replica_device(config, gpus)
        if local:
            check_local_room(fleet, resources, device)
        elif (warning := joined_room_warning(fleet, resources, device)) is not None:
            print(warning, file=sys.stderr, flush=True)
        try:
            serve.start(http_options=http_options(config), logging_config=logging_config())
        except (RuntimeError, ray.exceptions.RayError) as error:
            raise ServiceUnavailableError(
                f"Ray Serve's HTTP proxy did not start on {config.host}:{config.port}: {first_line(error)}; "
                "pick another --port or --host"
            ) from None
        deploying = _Deploying(application(config, fleet, gpus, bundle_key))
        if not deploying.wait(stop):
            logger.info("shutting down before the Ray Serve application was running")
            return 0
        replicas = fleet.replicas if fleet.replicas is not None else f"{fleet.min_replicas}-{fleet.max_replicas}"
        print(f"catrt serve: Ray Serve application {APP_NAME!r}: {replicas} model replicas, "
              f"{'one GPU' if device == 'GPU' else 'CPU'} each", file=sys.stderr, flush=True)
        print(f"catrt serve: listening on http://{config.host}:{config.port}", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
        return 0
    finally:
        _stop_serve(local)
        if deploying is not None:  # its wait ends with Serve's controller; past that it would start Ray anew
            deploying.thread.join(DEPLOY_JOIN_SECONDS)
        ray.shutdown()
