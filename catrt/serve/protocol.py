"""uvicorn's h11 protocol with a read deadline: a request must arrive whole within `read_timeout`.

uvicorn closes a connection that stays idle `timeout_keep_alive` seconds after an answer, but it
arms no timer on a new connection and cancels its timer on every byte received, so a client that
connects and sends nothing, or sends half a request and stops (or trickles a byte at a time), holds
a connection and its task forever. Here a deadline starts when a connection opens or when the first
byte of a request arrives, is not moved by later bytes, and ends when h11 has the whole request
(headers and body); a request pipelined behind another, whose bytes came while that one was answered, gets its
deadline when it starts. A connection still short of a whole request at the deadline is closed: one whose
request's headers came whole, but not its body (a `Content-Length` longer than the body sent, a chunked
body withheld), is first answered 408 in OpenAI's error body, as long as nothing of an answer has been
written, and its app sees the client leave; one with no whole headers has no request to answer. While
the app works on a complete request there is no deadline: `--timeout` bounds that.

The same bound holds the other way: a client that takes none of its answer for `read_timeout`
seconds while the answer waits in the send buffer (writing paused) is dropped, its unsent bytes
discarded, so an answer nobody takes (big PNGs) does not hold its memory and connection forever. A slow
client that keeps reading is not: each `read_timeout` it must only have taken some bytes.

Bytes a client sends after a whole request, while that request is being answered (pipelining), are
held up to `PIPELINED_BYTES`; past that the connection is not read until the answer is out. uvicorn
resumes reading at every `receive` the app makes, which the server's disconnect poll does ten times a
second, so a client writing on while its request generated piled its bytes up in memory without bound
(a few MB a second for as long as `--timeout`). A client whose pipelined bytes reach the bound is
backpressured by TCP; it loses nothing, but its leaving is seen only once its answer is written.

A request h11 cannot parse (a malformed request line, a `Content-Length` that is not a number) is
answered 400 in OpenAI's error body, as every other refusal, instead of uvicorn's plain-text line.
The server runs without WebSocket support, so a request asking to upgrade (WebSocket, h2c) is
answered as the plain HTTP request it also is (a 405 on the images route, in OpenAI's error body,
instead of a bare 403 from a WebSocket handshake nobody serves).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

from catrt.serve.errors import PROTOCOL_STATUS_KEY, REQUEST_ID_KEY
from catrt.serve.gate import REQUEST_ID_HEADER

logger = logging.getLogger(__name__)

# h11 states of the client side in which more bytes are needed before the request is whole.
_RECEIVING = (h11.IDLE, h11.SEND_BODY)
PIPELINED_BYTES = 64 * 1024  # bytes after a whole request read while it is answered (h11 caps headers at 16 KiB)


class _HeldFlow(FlowControl):
    """uvicorn's flow control, but reading stays paused while `held()` says so."""

    def __init__(self, transport: asyncio.Transport, held: Callable[[], bool]) -> None:
        super().__init__(transport)
        self._held = held

    def resume_reading(self) -> None:
        if not self._held():
            super().resume_reading()


class ReadDeadlineH11Protocol(H11Protocol):
    """`H11Protocol` plus the read deadline; `read_timeout` is set by `read_deadline_protocol`."""

    read_timeout: ClassVar[float] = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self.flow = _HeldFlow(transport, self._pipelined_past_bound)
        self._arm()

    def _pipelined_past_bound(self) -> bool:
        """Whether a request is being answered and the client has sent `PIPELINED_BYTES` or more after it."""
        answering = self.cycle is not None and not self.cycle.response_complete
        return answering and self.conn.their_state is h11.DONE and len(self.conn.trailing_data[0]) >= PIPELINED_BYTES

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in _RECEIVING:
            self._arm()
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        """uvicorn's, which starts a request pipelined behind the one answered from bytes already received (no
        `data_received` follows): its deadline starts now, or one short of its body would hold the connection
        and its app's wait for the body forever."""
        super().on_response_complete()
        their = self.conn.their_state
        if their is h11.SEND_BODY or (their is h11.IDLE and self.conn.trailing_data[0]):
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._end_stall()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The client is not taking the answer as fast as it is written: watch that it takes some of it."""
        super().pause_writing()
        if self._stall is None and not self.transport.is_closing():
            self._watch(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        self._end_stall()
        super().resume_writing()

    def _watch(self, pending: int) -> None:
        self._stall = self.loop.call_later(self.read_timeout, self._check_progress, pending)

    def _check_progress(self, before: int) -> None:
        """Still paused `read_timeout` seconds on: watch on if the client took some bytes since, else drop it.

        (An answer is written in one piece, so a slow client that keeps reading a big one can stay paused
        for long: progress, not the pause, is what counts.)"""
        self._stall = None
        if self.transport.is_closing():
            return
        pending = self.transport.get_write_buffer_size()
        if pending < before:
            self._watch(pending)
        else:
            self._stalled()

    def _end_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        """Reset the connection: abort, as a close would wait to flush bytes the client is not reading, with
        no linger, so the kernel drops its send buffer too instead of trickling it out."""
        self._stall = None
        client = "%s:%d" % self.client if self.client else "a client"
        logger.info("dropping the connection of %s: it read nothing of its answer for %g s", client, self.read_timeout)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes h11 cannot parse, in OpenAI's error body; the connection is closed."""
        self._answer_and_close(
            400, b"Bad Request", "invalid HTTP request: the request line or headers cannot be parsed (a Content-Length "
            "that is not a number, a header without a colon, headers longer than 16 KiB...); send a "
            "well-formed HTTP/1.1 request", "invalid_request_error",
        )

    def _answer_and_close(
        self, status: int, reason: bytes, message: str, type_: str, extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """An answer in OpenAI's error body written by the protocol itself, with `Connection: close`, then the close."""
        body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": str(status)}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *(extra or [])]
        try:
            for event in (h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # an answer was already under way on this connection: just close it
            pass
        self.transport.close()

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn warns of each upgrade request and suggests installing a WebSocket library; here it is one
        info line, as the request is served as plain HTTP on purpose."""
        logger.info("serving a request that asks to upgrade its connection as plain HTTP/1.1")

    def _arm(self) -> None:
        """Start the deadline unless one is running: later bytes of the same request do not extend it."""
        if self._deadline is None and not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.read_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in _RECEIVING:
            return
        client = "%s:%d" % self.client if self.client else "a client"
        logger.info("closing the connection of %s: no whole request within %g s", client, self.read_timeout)
        if self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.SEND_RESPONSE:
            self._time_out_body()
        else:
            self.transport.close()

    def _time_out_body(self) -> None:
        """A 408 to a request whose body did not come whole in time; its app sees the client leave (as uvicorn's
        `connection_lost` tells it), so it writes nothing after the 408 and its wait for the body ends. The answer
        carries the request id the gate gave the request, as its own answers do."""
        extra: list[tuple[bytes, bytes]] = []
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
            self.cycle.scope[PROTOCOL_STATUS_KEY] = 408
            request_id = self.cycle.scope.get(REQUEST_ID_KEY)
            if request_id is not None:
                extra.append((REQUEST_ID_HEADER, request_id.encode()))
        self._answer_and_close(
            408, b"Request Timeout", f"the request did not arrive whole within the read timeout of {self.read_timeout:g} s "
            "(--read-timeout) of its first byte: its body is shorter than its Content-Length or came too slowly; "
            "send the whole body at once", "timeout_error", extra,
        )


def read_deadline_protocol(read_timeout: float) -> type[ReadDeadlineH11Protocol]:
    """The protocol class to give `uvicorn.Config(http=...)` for a deadline of `read_timeout` seconds."""
    attributes: dict[str, Any] = {"read_timeout": float(read_timeout)}
    return type("ReadDeadlineH11Protocol", (ReadDeadlineH11Protocol,), attributes)
