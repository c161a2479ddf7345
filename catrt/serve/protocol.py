"""uvicorn's h11 protocol with a read deadline: a request must arrive whole within `read_timeout`.

uvicorn closes a connection that stays idle `timeout_keep_alive` seconds after an answer, but it
arms no timer on a new connection and cancels its timer on every byte received, so a client that
connects and sends nothing, or sends half a request and stops (or trickles a byte at a time), holds
a connection and its task forever. Here a deadline starts when a connection opens or when the first
byte of a request arrives, is not moved by later bytes, and ends when h11 has the whole request
(headers and body). A connection still short of a whole request at the deadline is closed. While
the app works on a complete request there is no deadline: `--timeout` bounds that.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

# h11 states of the client side in which more bytes are needed before the request is whole.
_RECEIVING = (h11.IDLE, h11.SEND_BODY)


class ReadDeadlineH11Protocol(H11Protocol):
    """`H11Protocol` plus the read deadline; `read_timeout` is set by `read_deadline_protocol`."""

    read_timeout: ClassVar[float] = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in _RECEIVING:
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

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
        self.transport.close()


def read_deadline_protocol(read_timeout: float) -> type[ReadDeadlineH11Protocol]:
    """The protocol class to give `uvicorn.Config(http=...)` for a deadline of `read_timeout` seconds."""
    attributes: dict[str, Any] = {"read_timeout": float(read_timeout)}
    return type("ReadDeadlineH11Protocol", (ReadDeadlineH11Protocol,), attributes)
