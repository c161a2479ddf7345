"""`run_server`: bind, start uvicorn, load the model on the worker thread, serve until signalled.

The listening socket is bound first, before anything is loaded, so a port in use is a one-line
refusal in a second instead of a failure after minutes of loading. On SIGTERM (or Ctrl-C) the
server stops taking requests (503), answers the queued ones 503, lets the model call in flight
finish and its answers go out, then exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from catrt.errors import CatrtError, ConfigError, ServiceUnavailableError
from catrt.model_cards import MODEL_CARDS, check_image_size, check_model_source, size_limits
from catrt.serve.config import ServeConfig, check_distinct_ks
from catrt.serve.protocol import read_deadline_protocol

if TYPE_CHECKING:
    from catrt.serve.worker import Worker, WorkerState

logger = logging.getLogger(__name__)

BACKLOG = 2048  # uvicorn's default
HANG_POLL_SECONDS = 0.5  # while draining: how often to ask whether the call in flight is hung


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first signal drains the worker before uvicorn's own graceful exit."""

    def __init__(self, config: uvicorn.Config, worker: Worker, address: str, grace: float | None = None) -> None:
        super().__init__(config)
        self.worker = worker
        self.address = address
        self.grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.worker.start()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"catrt serve: listening on {self.address}", file=sys.stderr, flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's, but the answers still going out once the drain is done get `grace` seconds to leave, then their
        connections are dropped: uvicorn waited for every one to flush, so a client reading a big answer slowly (enough
        progress for the protocol's stall check) held the exit for as long as it kept reading."""
        dropping = None if self.grace is None else asyncio.get_running_loop().call_later(self.grace, self._drop_connections)
        try:
            await super().shutdown(sockets)
        finally:
            if dropping is not None:
                dropping.cancel()

    def _drop_connections(self) -> None:
        """Abort the connections still open: each one's app sees its client leave and returns (cancelling it instead,
        as uvicorn's `timeout_graceful_shutdown` does, logs a traceback per request)."""
        for connection in list(self.server_state.connections):
            logger.info("shutting down: dropping a connection whose answer is still going out after %g s", self.grace)
            connection.transport.abort()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            # A second signal (SIGTERM as well as Ctrl-C): stop now, without waiting for the call in flight.
            self.force_exit = True
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
        else:
            self._exit_if_hung()

    def _exit_if_hung(self) -> None:
        """While draining, exit without the call in flight once it is hung (`Worker.hang`): it would never finish, and
        the SIGTERM a failed liveness probe brings waited for it until the second signal, or Kubernetes' SIGKILL a
        grace period later. The worker thread is a daemon: it ends with the process."""
        if self.should_exit or not self.worker.alive:
            return
        reason = self.worker.hang()
        if reason is not None:
            logger.error("shutting down without the call in flight: %s", reason)
            self.should_exit = True
            return
        if self._loop is not None:
            self._loop.call_later(HANG_POLL_SECONDS, self._exit_if_hung)

    def worker_exited(self, state: WorkerState) -> None:
        """Called on the worker thread: exit after a drain or a failed load; after a crash the process keeps
        answering (503, /health/live included) for its supervisor to restart it."""
        if state == "dead" and self.worker.served is not None and not self._draining:
            return
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(setattr, self, "should_exit", True)
        except RuntimeError:  # closed: the server already stopped (the worker ends at exit, worker.py); asking
            pass  # is_closed() first left a moment for `asyncio.run` to close the loop before the call


def run_server(config: ServeConfig) -> int:
    """Serve `config` until signalled; returns 0 after a drain.

    Raises a CatrtError, before anything is loaded, for a port in use, a device this machine lacks,
    a folder that is not a bundle, a bundle `catrt.load` would refuse (files, digests, an edited manifest) or an
    unknown model; and one naming the cause if the model cannot be loaded.
    """
    check_source_of(config)
    key = bundle_key(config.bundle_key_file) if config.engines is not None else None
    sock = listening_socket(config.host, config.port)
    try:
        check_device(config)
        # Files, digests and manifest checked as `catrt.load` will: a bundle refused there is one line here, never
        # after "listening" (the worker loads after the server started). The port is bound first: it is quick.
        verify_bundles_here(config, key)
        # Imported after the cheap refusals: FastAPI, torch and diffusers take seconds to import.
        from catrt.serve.app import build_app
        from catrt.serve.metrics import ServerMetrics
        from catrt.serve.routing import load_router
        from catrt.serve.worker import Worker
    except BaseException:
        sock.close()
        raise
    metrics = ServerMetrics()
    # The worker reports its exit to the server made below; it only can once the server runs.
    worker = Worker(
        lambda: load_router(config, key), config.max_queue, metrics, on_exit=lambda state: server.worker_exited(state),
        alpha_policy=config.alpha_policy, latency_target=config.latency_target, hang_grace=config.hang_grace,
    )
    metrics.watch_queue(lambda: worker.depth, worker.depth_by_size)
    app = build_app(worker, metrics, config)
    uvicorn_config = uvicorn.Config(
        app, http=read_deadline_protocol(config.read_timeout), timeout_keep_alive=config.keep_alive,
        ws="none",  # no WebSocket routes: an Upgrade request is answered as the HTTP request it also is
        log_config=None, access_log=False, backlog=BACKLOG,
    )
    server = DrainingServer(uvicorn_config, worker, _address(sock), grace=config.read_timeout)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
    if worker.served is None and worker.error is not None:
        raise _load_failure(worker.error)
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening socket; the port's owner is refused here, before any model is loaded."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise ConfigError(f"cannot listen on host {host!r}: {error.strerror}", field="host", value=host) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: no wait after a restart
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as error:
        sock.close()
        reason = "is already in use" if error.errno == errno.EADDRINUSE else f"cannot be bound ({error.strerror})"
        raise ConfigError(f"port {port} on {host} {reason}; pick another with --port", field="port", value=port) from None
    sock.set_inheritable(True)
    return sock


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def check_device(config: ServeConfig) -> None:
    """A CUDA device asked for on a machine without one is refused before binding or loading (or, with --ray,
    before a local cluster starts: its replicas run here)."""
    if config.model is None or not config.device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {config.device}: this machine has no CUDA device torch can use; serve with --device cpu",
            field="device", value=config.device,
        )


def check_source_of(config: ServeConfig) -> None:
    """Is each build a bundle at all (its manifest's shape), all of one model, one per size, with alphas for the
    policy to choose from; or is the eager model a catrt name or a diffusers folder, and do its alphas select
    distinct k's at its size (a model with a card): refused before the port is bound and "listening" is printed.

    `catrt.load` where the model loads checks the rest (signature, files, digests, versions, device).
    """
    if config.engines is None:
        check_model_source(config.model)
        card = MODEL_CARDS.get(config.model)
        if card is not None:  # else the size's tokens are known once the model loads (`catrt.serve.model`)
            multiple, largest = size_limits(card)
            height, width = config.height or card.default_size, config.width or card.default_size
            check_image_size(height, width, multiple, largest, config.model)  # as the CLI does: tokens of a real size
            check_distinct_ks(config.served_alphas, height, width, multiple)
        return
    from catrt.serve.alpha_policy import check_choice
    from catrt.serve.builds import check_builds

    for folder, build in zip(config.engines, check_builds(config.engines), strict=True):
        check_choice(config.alpha_policy, build.alphas, f"{folder} ({build.model} at {build.width}x{build.height})")


def verify_bundles_here(config: ServeConfig, key: bytes | None) -> None:
    """Each build's check on this machine (files and digests, signature with the `key` the replicas are handed,
    versions, device, and that its model still loads here), as `catrt.load` runs it first: by the single server
    before it says it listens (its worker loads after), and for `--ray` on a local cluster, whose replicas load these
    folders here, so a corrupt, mismatched or wrongly keyed bundle is one line before Ray starts rather than a
    deployment that fails half a minute later without saying why."""
    from catrt.bundle import model_source_problems, verify_bundle

    for folder in config.engines or ():
        problems = model_source_problems(Path(folder), verify_bundle(Path(folder), key=key))
        if problems:  # a model folder gone since the build
            raise problems[0]


def bundle_key(path: str | None) -> bytes | None:
    """The signing key in `--bundle-key-file`, else $CATRT_BUNDLE_KEY read where `catrt serve` starts (so Ray
    replicas on other nodes, which lack this environment, get it too), else None (no signature check)."""
    if path is None:
        from catrt.signing import resolve_key

        return resolve_key(None)
    from catrt.key_files import read_key_file

    return read_key_file(path)


def _load_failure(error: BaseException) -> CatrtError:
    """A load error as one line: catrt's own errors as they are, anything else named with its type."""
    if isinstance(error, CatrtError):
        return error
    first_line = next(iter(str(error).splitlines()), "")
    return ServiceUnavailableError(
        f"could not load the model: {type(error).__name__}: {first_line} (run with -v for the traceback)"
    )
