"""What every HTTP request passes before any route sees it: a request id, the API key, the body limit.

Pure ASGI, so it runs before FastAPI reads or parses a byte of the body: an oversized body is
refused from its `Content-Length` alone, and a chunked one as soon as the bytes received pass the
limit; nothing over the limit is ever held in memory or handed to the JSON parser. Bytes a client
keeps sending after the refusal are discarded by the HTTP protocol layer until the connection's
read timeout, so the client still reads the 413 instead of a reset connection.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from catrt.serve.errors import REQUEST_ID_KEY, error_response

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"


class RequestGate:
    """Request id on every answer; 401 without the key on protected paths; 413 over `max_body_bytes`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        authorized: Callable[[bytes | None], bool] | None = None,
        protect_metrics: bool = False,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.authorized = authorized
        self.protect_metrics = protect_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope[REQUEST_ID_KEY] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())]}
            await send(message)

        headers = dict(scope.get("headers", []))
        if self._needs_key(scope["path"]) and not self.authorized(headers.get(b"authorization")):
            response = error_response(
                401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                "invalid_request_error", headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send_with_id)
            return
        declared = _content_length(headers.get(b"content-length"))
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(scope, receive, send_with_id, f"is {declared} bytes")
            return
        try:
            body = await _read_body(receive, self.max_body_bytes)
        except _BodyTooLarge:
            await self._too_large(scope, receive, send_with_id, f"passed {self.max_body_bytes} bytes")
            return
        if body is None:  # the client left (or the read timeout closed the connection) mid-body
            return
        await self.app(scope, _replay(body, receive), send_with_id)

    def _needs_key(self, path: str) -> bool:
        if self.authorized is None:
            return False
        return path == "/v1" or path.startswith("/v1/") or (self.protect_metrics and path == "/metrics")

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        logger.info("request %s refused: its body %s", scope[REQUEST_ID_KEY], size)
        response = error_response(
            413, f"the request body {size}; this server takes at most {self.max_body_bytes} bytes",
            "invalid_request_error",
        )
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    """The body passed the limit while it was being received."""


def _content_length(value: bytes | None) -> int | None:
    """The declared length, or None when absent (chunked) or unreadable (h11 has refused those already)."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None if the client left; raises `_BodyTooLarge` once it passes `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the buffered body to the app once, then reads the connection again."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
