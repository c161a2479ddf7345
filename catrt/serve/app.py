"""The HTTP routes: images (OpenAI schema), health, metrics; FastAPI serves /docs and /openapi.json.

The event loop only moves bytes: request checks that touch the model's tokenizers run on one
admission thread, generation and PNG encoding on the worker thread, so `/health/live` answers while
any request is being checked or generated.

The model side (routing, worker, torch) is imported where it is first used, so a Ray Serve ingress
built on `base_app` imports no torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from catrt.errors import CatrtError, QueueFullError, RequestTimeoutError, ServiceUnavailableError
from catrt.serve.auth import BearerCheck
from catrt.serve.config import ServeConfig
from catrt.serve.echo import echo
from catrt.serve.errors import PROTOCOL_STATUS_KEY, REQUEST_ID_KEY, error_response, install_error_handlers
from catrt.serve.gate import RequestGate
from catrt.serve.json_body import UniqueKeysRoute
from catrt.serve.metrics import CONTENT_TYPE, HttpMetrics, ServerMetrics
from catrt.serve.openapi import describe_served
from catrt.serve.schemas import (
    CatrtInfo,
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
    ModelCard,
    ModelListResponse,
    Timings,
)

if TYPE_CHECKING:
    from catrt.serve.model import BatchOptions, Row, ServedSpec
    from catrt.serve.routing import RoutedRules
    from catrt.serve.worker import Job, JobResult, Worker

logger = logging.getLogger(__name__)

GENERATIONS_PATH = "/v1/images/generations"
DISCONNECT_POLL_SECONDS = 0.1
# Requests that may wait for the admission thread: twice what the worker's queue may hold, and at least
# MIN_CHECKING, so a burst is checked while earlier requests are and a flood is refused before tokenizing.
CHECKING_PER_QUEUED = 2
MIN_CHECKING = 64
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 413, 415, 429, 500, 503, 504)
}
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format 0.0.4"},
}


def base_app(metrics: HttpMetrics, config: ServeConfig,
             liveness_fault: Callable[[], dict[str, str] | None] = lambda: None, body_deadline: bool = False,
             served_model: Callable[[], Awaitable[str | None]] | None = None) -> FastAPI:
    """The app every serving mode starts from: error bodies, the request gate (id, key, body limit,
    encoding), request metrics, `/health/live` and the model list (`/v1/models`).

    `liveness_fault`: the body of a 503 once this process can no longer serve (its worker died or is hung in a
    call, `Worker.liveness_fault`), so a liveness probe restarts it instead of leaving a process that answers 503 or
    504 forever; None while it can. `body_deadline`: the gate
    answers 408 to a body not whole within `config.read_timeout` (for an HTTP server without a read
    deadline of its own: Ray Serve's proxy). `served_model`: where the model list asks the served model's name when
    the builds' manifests cannot be read here (a Ray ingress on a node without the engine folders)."""
    app = FastAPI(title="catrt", summary="CAT Pruning text-to-image server (OpenAI images API)")
    app.router.route_class = UniqueKeysRoute  # every route added below and by the serving modes
    install_error_handlers(app)
    app.add_middleware(
        RequestGate,
        max_body_bytes=config.max_body_bytes,
        authorized=BearerCheck(config.api_key) if config.api_key is not None else None,
        protect_metrics=config.metrics_auth,
        json_paths=(GENERATIONS_PATH,),
        router=app.router,
        body_timeout=config.read_timeout if body_deadline else None,
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, router=app.router)
    listed = ModelList(config, served_model)

    @app.get("/health/live", responses={503: {"description": "the worker died or is hung: restart the process"}})
    async def live(response: Response) -> dict[str, str]:
        """200 while the process answers and can serve; 503 once its worker died, or while it is hung in a call."""
        fault = liveness_fault()
        if fault is not None:
            response.status_code = 503
            return fault
        return {"status": "live"}

    @app.get("/v1/models", response_model=ModelListResponse, responses=ERROR_RESPONSES)
    async def list_models() -> ModelListResponse:
        """The served model (OpenAI's `models.list`); a request's `model` field is ignored whatever it names."""
        return ModelListResponse(data=[await listed.card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={**ERROR_RESPONSES, 404: {"model": ErrorResponse}})
    async def retrieve_model(model_id: str) -> Any:
        """The served model by its id (OpenAI's `models.retrieve`); another id is a 404 naming `model`."""
        card = await listed.card()
        if model_id != card.id:
            return error_response(
                404, f"the model {echo(model_id)} is not served here: this server serves {echo(card.id)}",
                "invalid_request_error", "model",
            )
        return card

    return app


class ModelList:
    """The served model's OpenAI model card; its name is read once (from the build's manifest for engines, else from
    `served_model`, which asks the process that loaded it)."""

    def __init__(self, config: ServeConfig, served_model: Callable[[], Awaitable[str | None]] | None = None) -> None:
        self.config = config
        self.created = int(time.time())
        self._name: str | None = config.model
        self._served_model = served_model

    async def card(self) -> ModelCard:
        if self._name is None:
            from catrt.serve.builds import check_builds

            try:
                self._name = check_builds(self.config.engines or ())[0].model
            except (CatrtError, IndexError) as error:
                self._name = await self._served_model() if self._served_model is not None else None
                if self._name is None:
                    raise ServiceUnavailableError(
                        "the served model's name cannot be read from its build; retry later"
                    ) from error
        return ModelCard(id=model_id(self._name), created=self.created)


def model_id(name: str) -> str:
    """The served model's id: its name without a trailing slash (a folder given as `DIR/`), since the request
    gate drops a path's trailing slash and `models.retrieve` of the listed id would otherwise never match."""
    return name.rstrip("/") or name


class ImageService:
    """An images request from checked body to response, over one worker: the single-process server's
    route and each Ray Serve model replica run this same code."""

    def __init__(self, worker: Worker, metrics: ServerMetrics, config: ServeConfig) -> None:
        self.worker = worker
        self.metrics = metrics
        self.config = config
        self._admission = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catrt-admit")
        self._checking = 0  # requests in or waiting for the admission thread (read and written on the event loop)
        self._rules: RoutedRules | None = None

    def rules(self) -> RoutedRules | None:
        """The loaded builds' rules, made once they are loaded."""
        from catrt.serve.routing import RoutedRules

        served = self.worker.served
        if served is not None and self._rules is None:
            self._rules = RoutedRules(served, self.config.max_prompt_chars)
        return self._rules

    async def generate(self, body: ImageGenerationRequest, request: Request) -> ImageGenerationResponse | None:
        """The response, or None if the client left; raises a CatrtError (400, 429, 503, 504...) otherwise."""
        from catrt.serve.worker import Job

        worker, config = self.worker, self.config
        arrived = time.perf_counter()  # the timeout and queue_wait count the checks below too
        checks = self.rules()
        if checks is None or worker.state != "ready":
            raise ServiceUnavailableError(f"the server is {worker.state}; retry later")
        rows, options = await self._admit(checks, body)
        if await request.is_disconnected():  # left while its request waited for its checks: nobody to generate for
            self.metrics.cancelled.labels(reason="disconnect").inc()
            logger.info("request %s: client left during its checks; request dropped", request.scope[REQUEST_ID_KEY])
            return None
        job = Job(rows, options, deadline=arrived + config.timeout, request_id=request.scope[REQUEST_ID_KEY], arrived=arrived)
        worker.submit(job)
        try:
            result = await _wait_for(job, request, config.timeout, self.metrics)
        except asyncio.CancelledError:  # the caller was cancelled (a Ray Serve request whose client left)
            job.abandon()
            raise
        if result is None:
            return None
        return _response(result, checks.spec_for(options), [row.seed for row in rows], job.arrived)


    async def _admit(self, checks: RoutedRules, body: ImageGenerationRequest) -> tuple[list[Row], BatchOptions]:
        """`checks.admit(body)` on the admission thread, if the queue has room and fewer than
        max(64, 2 x `max_queue`) requests wait to be checked: else a 429 at once, so a flood of costly
        prompts (tokenized one at a time) makes no request wait behind it past its deadline."""
        self.worker.check_room()
        limit = max(MIN_CHECKING, CHECKING_PER_QUEUED * self.config.max_queue)
        if self._checking >= limit:
            raise QueueFullError(
                f"the server is busy checking {self._checking} requests (at most {limit} wait for their checks); "
                "retry later", retry_after=1,
            )
        self._checking += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._admission, checks.admit, body)
        finally:
            self._checking -= 1


def build_app(worker: Worker, metrics: ServerMetrics, config: ServeConfig) -> FastAPI:
    """Routes over `worker`; every request is counted and timed into `metrics` by route and status."""
    app = base_app(metrics, config, liveness_fault=worker.liveness_fault)
    service = ImageService(worker, metrics, config)

    @app.post(GENERATIONS_PATH, response_model=ImageGenerationResponse, responses=ERROR_RESPONSES)
    async def generate_images(body: ImageGenerationRequest, request: Request) -> Any:
        """Images for one prompt, batched with compatible queued requests."""
        response = await service.generate(body, request)
        return Response(status_code=CLIENT_CLOSED_REQUEST) if response is None else response

    @app.get("/health/ready", responses={503: {"description": "loading, draining, hung or dead"}})
    async def ready(response: Response) -> dict[str, Any]:
        """200 once every build is loaded and warmed up; 503 before, while shutting down, while the worker is hung in
        a call (with the reason), or if it died."""
        served = worker.served
        status, reason = worker.condition()
        answer: dict[str, Any] = {"status": status, "sizes": served.sizes if served is not None else []}
        if reason is not None:
            answer["reason"] = reason
        if status != "ready":
            response.status_code = 503
        return answer

    @app.get("/metrics", response_class=PlainTextResponse, responses=METRICS_RESPONSES)
    async def metrics_text() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    describe_served(app, service.rules, api_key=config.api_key is not None, metrics_auth=config.metrics_auth)
    return app


async def _wait_for(job: Job, request: Request, timeout: float, metrics: ServerMetrics) -> JobResult | None:
    """The job's result; gives the job up (dropped if queued, its call stopped) on timeout or when the client leaves."""
    future = asyncio.wrap_future(job.future)
    # An abandoned job's outcome arrives after this returns; taking it keeps asyncio from logging
    # "Future exception was never retrieved" at ERROR for every timeout and disconnect.
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    while True:
        remaining = job.deadline - time.perf_counter()
        if remaining <= 0:
            job.abandon()
            metrics.cancelled.labels(reason="timeout").inc()
            raise RequestTimeoutError(f"no answer within the server's timeout of {timeout:g} s")
        done, _ = await asyncio.wait({future}, timeout=min(DISCONNECT_POLL_SECONDS, remaining))
        if done:
            try:
                return future.result()
            except RequestTimeoutError:  # the worker found it past its deadline, or stopped its call
                job.abandon()
                metrics.cancelled.labels(reason="timeout").inc()
                raise RequestTimeoutError(f"no answer within the server's timeout of {timeout:g} s") from None
        if await request.is_disconnected():
            job.abandon()
            metrics.cancelled.labels(reason="disconnect").inc()
            logger.info("request %s: client left; request dropped", job.request_id)
            return None


def _response(result: JobResult, spec: ServedSpec, seeds: list[int], arrived: float) -> ImageGenerationResponse:
    timings = Timings(queue_wait=result.queue_wait, total=time.perf_counter() - arrived, **result.phases)
    return ImageGenerationResponse(
        created=int(time.time()),
        data=[ImageData(b64_json=image) for image in result.images],
        size=spec.size,
        catrt=CatrtInfo(timings=timings, alpha=result.alpha, steps=spec.steps, seeds=seeds, batch_rows=result.batch_rows),
    )


class RequestMetricsMiddleware:
    """Counts and times every HTTP request by route template and status (pure ASGI: disconnects still reach routes).

    Outermost, so answers the gate gives before routing (401, 413) are counted under their route too.
    """

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, router: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None
        started = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        failed = True
        try:
            await self.app(scope, receive, send_and_record)
            failed = False
        except asyncio.CancelledError:
            # Cancelled unanswered: Ray Serve's proxy cancels the ingress's request when its client leaves (uvicorn
            # tells the app by `http.disconnect` instead); nothing answers it, so it is no 500.
            failed = False
            raise
        finally:
            if status is None:
                # An exception escaped unanswered: Starlette's outermost handler answers 500. Returned (or cancelled)
                # unanswered: the client left mid-request (the gate answers nobody who is gone).
                status = 500 if failed else CLIENT_CLOSED_REQUEST
            status = scope.get(PROTOCOL_STATUS_KEY, status)  # what the client was answered (the protocol's 408)
            name = self._route(scope)
            self.metrics.requests.labels(route=name, status=str(status)).inc()
            self.metrics.latency.labels(route=name).observe(time.perf_counter() - started)

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.router.routes if r.matches(scope)[0] != Match.NONE), None)
        return route.path if route is not None else "unmatched"
