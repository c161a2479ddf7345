"""The HTTP routes: images (OpenAI schema), health, metrics; FastAPI serves /docs and /openapi.json."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from catrt.errors import RequestTimeoutError, ServiceUnavailableError
from catrt.serve.errors import install_error_handlers
from catrt.serve.metrics import CONTENT_TYPE, ServerMetrics
from catrt.serve.schemas import CatrtInfo, ErrorResponse, ImageData, ImageGenerationRequest, ImageGenerationResponse, Timings
from catrt.serve.validation import admit
from catrt.serve.worker import Job, JobResult, Worker

logger = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.1
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 429, 500, 503, 504)
}


def build_app(worker: Worker, metrics: ServerMetrics, timeout: float) -> FastAPI:
    """Routes over `worker`; every request is counted and timed into `metrics` by route and status."""
    app = FastAPI(title="catrt", summary="CAT Pruning text-to-image server (OpenAI images API)")
    install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    @app.post("/v1/images/generations", response_model=ImageGenerationResponse, responses=ERROR_RESPONSES)
    async def generate_images(body: ImageGenerationRequest, request: Request) -> Any:
        """Images for one prompt, batched with compatible queued requests."""
        if worker.served is None or worker.state != "ready":
            raise ServiceUnavailableError(f"the server is {worker.state}; retry later")
        rows, options = admit(body, worker.served)
        job = Job(rows, options)
        worker.submit(job)
        result = await _wait_for(job, request, timeout, metrics)
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return _response(result, worker, [row.seed for row in rows], job.arrived)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        """200 whenever the process answers."""
        return {"status": "live"}

    @app.get("/health/ready", responses={503: {"description": "loading, draining or dead"}})
    async def ready(response: Response) -> dict[str, str]:
        """200 once the model is loaded and warmed up; 503 before, while shutting down, or if the worker died."""
        if worker.state != "ready":
            response.status_code = 503
        return {"status": worker.state}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


async def _wait_for(job: Job, request: Request, timeout: float, metrics: ServerMetrics) -> JobResult | None:
    """The job's result; cancels it (dropping it from the queue) on timeout or when the client leaves."""
    future = asyncio.wrap_future(job.future)
    deadline = job.arrived + timeout
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            job.future.cancel()
            metrics.cancelled.labels(reason="timeout").inc()
            raise RequestTimeoutError(f"no answer within the server's timeout of {timeout:g} s")
        done, _ = await asyncio.wait({future}, timeout=min(DISCONNECT_POLL_SECONDS, remaining))
        if done:
            return future.result()
        if await request.is_disconnected():
            job.future.cancel()
            metrics.cancelled.labels(reason="disconnect").inc()
            logger.info("client left; request dropped")
            return None


def _response(result: JobResult, worker: Worker, seeds: list[int], arrived: float) -> ImageGenerationResponse:
    spec = worker.served.spec
    timings = Timings(queue_wait=result.queue_wait, total=time.perf_counter() - arrived, **result.phases)
    return ImageGenerationResponse(
        created=int(time.time()),
        data=[ImageData(b64_json=base64.b64encode(image).decode("ascii")) for image in result.images],
        catrt=CatrtInfo(timings=timings, alpha=spec.alpha, steps=spec.steps, seeds=seeds, batch_rows=result.batch_rows),
    )


class RequestMetricsMiddleware:
    """Counts and times every HTTP request by route template and status (pure ASGI: disconnects still reach routes)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            name = route.path if route is not None else "unmatched"
            self.metrics.requests.labels(route=name, status=str(status)).inc()
            self.metrics.latency.labels(route=name).observe(time.perf_counter() - started)
