"""`run_server`: uvicorn over the app, with vllm-style SIGTERM handling.

On SIGTERM (or Ctrl-C) the server stops taking requests (503), answers the queued ones 503, lets
the model call in flight finish and its answers go out, then exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from catrt.serve.app import build_app
from catrt.serve.config import ServeConfig
from catrt.serve.metrics import ServerMetrics
from catrt.serve.model import load_served_model
from catrt.serve.worker import Worker, WorkerState

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first signal drains the worker before uvicorn's own graceful exit."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(config)
        self.worker = worker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.worker.start()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        # Runs as a signal handler: hand over to the event loop, take no locks here.
        self._draining = True
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        logger.info("shutting down: finishing the request in flight, refusing the rest")
        self.worker.drain()
        if not self.worker.alive:
            self.should_exit = True

    def worker_exited(self, state: WorkerState) -> None:
        """Called on the worker thread: exit after a drain or a failed load; a crash keeps answering 503."""
        if state == "dead" and self.worker.served is not None and not self._draining:
            return
        if self._loop is not None:
            self._loop.call_soon_threadsafe(setattr, self, "should_exit", True)


def run_server(config: ServeConfig) -> int:
    """Load the model on the worker thread while uvicorn starts, then serve until signalled.

    Returns 0 after a drain; raises the load error if the model could not be loaded.
    """
    metrics = ServerMetrics()
    # The worker reports its exit to the server made below; it only can once the server runs.
    worker = Worker(
        lambda: load_served_model(config), config.max_queue, metrics, on_exit=lambda state: server.worker_exited(state)
    )
    metrics.watch_queue(lambda: worker.depth)
    app = build_app(worker, metrics, config.timeout)
    uvicorn_config = uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False)
    server = DrainingServer(uvicorn_config, worker)
    logger.info("catrt serve on http://%s:%d", config.host, config.port)
    asyncio.run(server.serve())
    if worker.served is None and worker.error is not None:
        raise worker.error
    return 0
