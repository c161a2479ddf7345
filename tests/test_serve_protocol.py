"""The server's HTTP protocol (catrt/serve/protocol.py) in-process, over a real socket: a client that stops
reading its answer is dropped after the read timeout, not held (with its unsent bytes) forever."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvicorn

from catrt.serve.protocol import PIPELINED_BYTES, read_deadline_protocol

TIMEOUT = 0.5
# The bound of each wait on the server thread: only a hang reaches it, as each wait ends once its condition holds.
WAIT = 60.0
CHUNK = 1 << 20
CHUNKS = 16  # 16 MiB: far more than the socket buffers hold
BODY = CHUNK * CHUNKS


class _BigAnswer:
    """An ASGI app answering every request with BODY bytes: in CHUNKS sends (each waits while the client does
    not read: uvicorn's flow control) for a path of /chunks, else in one, as the server's answers go;
    `sent` is set once the last send returns."""

    def __init__(self) -> None:
        self.sent = threading.Event()

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(BODY).encode())]})
        chunks = CHUNKS if scope["path"] == "/chunks" else 1
        for index in range(chunks):
            await send({"type": "http.response.body", "body": bytes(BODY // chunks), "more_body": index < chunks - 1})
        self.sent.set()


def _start(server: uvicorn.Server, sock: socket.socket) -> threading.Thread:
    """`server` running on `sock` in a thread of its own, once it has started."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return thread


def _stop(server: uvicorn.Server, thread: threading.Thread, sock: socket.socket) -> None:
    server.should_exit = True
    thread.join(WAIT)
    sock.close()
    assert not thread.is_alive(), "the server did not stop"


@pytest.fixture()
def served(request: pytest.FixtureRequest) -> Iterator[tuple[_BigAnswer, int]]:
    """A `_BigAnswer` served with a read timeout of TIMEOUT s, or of the test's indirect parameter."""
    app = _BigAnswer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    timeout = getattr(request, "param", TIMEOUT)
    server = uvicorn.Server(uvicorn.Config(app, http=read_deadline_protocol(timeout), log_config=None, lifespan="off"))
    thread = _start(server, sock)
    yield app, sock.getsockname()[1]
    _stop(server, thread, sock)


def test_a_client_that_stops_reading_its_answer_is_dropped(served: tuple[_BigAnswer, int]) -> None:
    app, port = served
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(b"GET /chunks HTTP/1.1\r\nHost: test\r\n\r\n")
        # Never reading, the answer stalls; the server drops the connection, which frees the app's sends
        # (they waited for the client for ever).
        assert app.sent.wait(WAIT)
        received = 0
        client.settimeout(WAIT)
        try:
            while chunk := client.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < BODY  # the rest was discarded, not delivered


SLOW_READ_TIMEOUT = 2.0  # the client reads every 0.3 s: a machine that stalls it for less than this still passes


@pytest.mark.parametrize("served", [SLOW_READ_TIMEOUT], indirect=True)
def test_a_slow_client_that_keeps_reading_gets_the_whole_answer(served: tuple[_BigAnswer, int]) -> None:
    """An answer written in one piece stays paused until nearly all of it is read: reading 1 MiB per 0.3 s
    takes over two read timeouts, and each of them sees progress."""
    app, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            received += client.recv(65536)
        body = len(received.split(b"\r\n\r\n", 1)[1])
        started = time.monotonic()
        while body < BODY:
            taken = 0
            while taken < CHUNK and body + taken < BODY:
                chunk = client.recv(CHUNK - taken)
                assert chunk, f"dropped after {body + taken} of {BODY} bytes"
                taken += len(chunk)
            body += taken
            time.sleep(0.3)
        assert body == BODY and app.sent.wait(WAIT)
        assert time.monotonic() - started > 2 * SLOW_READ_TIMEOUT  # precondition: slower than the timeout


POLLS = 200  # the app's disconnect checks while it works on one request, as the server's route makes them
READ_SIZE = 256 * 1024  # the most asyncio reads from a socket at once


class _Polling:
    """An ASGI app that, as the images route does while a request generates, asks `receive` whether its client
    left, until `written()` says the client wrote past the bound and POLLS times more, then answers."""

    def __init__(self, written: Callable[[], bool]) -> None:
        self.done = threading.Event()
        self.written = written

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        await receive()  # the (empty) body
        deadline = time.monotonic() + WAIT
        while not self.written() and time.monotonic() < deadline:  # however long this machine lets the client write
            try:
                await asyncio.wait_for(receive(), 0.002)
            except asyncio.TimeoutError:
                pass
        for _ in range(POLLS):
            try:
                await asyncio.wait_for(receive(), 0.002)
            except asyncio.TimeoutError:
                pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        self.done.set()


def test_bytes_pipelined_behind_a_request_in_work_are_held_up_to_a_bound() -> None:
    """Every disconnect poll resumed reading, so a client writing on while its request generated had its bytes
    piled up in the server's memory without bound; past `PIPELINED_BYTES` the connection is now not read until
    the answer is out (the client is held back by TCP, and loses nothing)."""
    held: list[int] = []

    class Recording(read_deadline_protocol(5.0)):  # type: ignore[misc, valid-type]
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            held.append(len(self.conn.trailing_data[0]))

    app = _Polling(lambda: max(held, default=0) > PIPELINED_BYTES)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, http=Recording, log_config=None, lifespan="off"))
    thread = _start(server, sock)
    try:
        with socket.create_connection(("127.0.0.1", sock.getsockname()[1])) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            client.setblocking(False)
            pipelined = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n" * 4096
            while not app.done.is_set():
                try:
                    client.send(pipelined)
                except BlockingIOError:
                    time.sleep(0.001)
        assert max(held) > PIPELINED_BYTES  # precondition: the client wrote past the bound
        assert max(held) < PIPELINED_BYTES + READ_SIZE
    finally:
        _stop(server, thread, sock)


class _Echo:
    """An ASGI app answering each request, once its whole body came, with that body."""

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        body, message = b"", {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def test_a_pipelined_request_short_of_its_body_is_answered_408_at_the_read_timeout() -> None:
    """A request pipelined behind another starts from bytes received while that one was answered, so no
    `data_received` armed its deadline: one short of its body held the connection (and its app's wait) forever."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(_Echo(), http=read_deadline_protocol(TIMEOUT), log_config=None, lifespan="off"))
    thread = _start(server, sock)
    try:
        with socket.create_connection(("127.0.0.1", sock.getsockname()[1]), timeout=WAIT) as client:
            client.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\nok"
                           b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\nshort")
            answer = b""
            while chunk := client.recv(65536):  # a socket.timeout here: the connection was held
                answer += chunk
        first, _, second = answer.partition(b"HTTP/1.1 408 Request Timeout\r\n")
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\nok"), answer
        assert b'"type": "timeout_error"' in second and b"connection: close" in second, answer
    finally:
        _stop(server, thread, sock)


def test_a_slow_reader_holds_a_shutdown_no_longer_than_its_grace(caplog: pytest.LogCaptureFixture) -> None:
    """Once drained, uvicorn waited for every connection to flush: a client reading a big answer slowly, with progress
    enough for the stall check, held the server's exit for as long as it kept reading (here ~50 s). Its connection is
    dropped after the grace, and its app returns: nothing is logged at ERROR (a cancelled app logs a traceback)."""
    from types import SimpleNamespace

    from catrt.serve.server import DrainingServer

    app = _BigAnswer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    config = uvicorn.Config(app, http=read_deadline_protocol(TIMEOUT), log_config=None, lifespan="off")
    server = DrainingServer(config, SimpleNamespace(start=lambda: None), "test", grace=TIMEOUT)
    thread = _start(server, sock)
    received, dropped = 0, False
    with socket.create_connection(("127.0.0.1", sock.getsockname()[1])) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        received += len(client.recv(65536))
        server.should_exit = True
        stop = time.monotonic() + 30  # 64 KiB per 0.2 s: 16 MiB would take 50 s, so the client is still reading then
        client.settimeout(1)
        while thread.is_alive() and time.monotonic() < stop:
            try:
                chunk = client.recv(65536)
            except TimeoutError:  # nothing came this second: a loaded machine, not a drop
                continue
            except OSError:
                dropped = True
                break
            if not chunk:
                dropped = True
                break
            received += len(chunk)
            time.sleep(0.2)
        if dropped:  # the server dropped the connection: its exit follows
            thread.join(WAIT)
        exited = not thread.is_alive()
        server.force_exit = True
        thread.join(WAIT)
    sock.close()
    assert exited and received < BODY and app.sent.is_set()
    assert not [record for record in caplog.records if record.levelname == "ERROR"], caplog.text
