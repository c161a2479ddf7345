"""What every HTTP request passes before any route sees it: a request id, the API key, the body limit,
the body's encoding and media type, the body's deadline, and the path's spelling.

Pure ASGI, so it runs before FastAPI reads or parses a byte of the body: an oversized body is
refused from its `Content-Length` alone, and a chunked one as soon as the bytes received pass the
limit; nothing over the limit is ever held in memory or handed to the JSON parser. Bytes a client
keeps sending after the refusal are discarded by the HTTP protocol layer until the connection's
read timeout, so the client still reads the 413 instead of a reset connection.

With `body_timeout` (Ray Serve's ingress, whose HTTP proxy has no read deadline of its own), a body
must arrive whole within that many seconds of the request reaching the app: a slower one (a client
that sends its headers, then trickles or withholds the body) is a 408 with `Connection: close`, so
the proxy closes the connection. The single server needs none: its protocol's read deadline
(`catrt.serve.protocol`), which runs from the request's first byte, answers such a request 408 itself and
closes the connection, the app seeing the client leave.

A gzip or deflate body (`Content-Encoding`) is decoded here, its decoded bytes held to the same
limit (a small body that inflates past it is a 413, and inflating stops there); another encoding is
a 415; a gzip body may be several members (RFC 1952). Repeated `Content-Encoding` lines are one list, as
HTTP defines them. A JSON route's body must be JSON (`application/json` or `application/*+json`; no
`Content-Type` at all is read as JSON; lines that disagree are a 400) and not empty. A trailing slash
is dropped from the path (`/v1/images/generations/` is served, never redirected), as is the scheme
and host of a request line that names the whole URL; another target that is not a path is a 400
(`OPTIONS *` is answered with every method served), and `HEAD` is answered as `GET` without
the body. A request no route takes (method and path) goes to the app unread, for its 404 or 405: an
upload to a route this server lacks is told that, not that its body is too large.
"""

from __future__ import annotations

import asyncio
import email.message
import logging
import re
import uuid
import zlib
from collections.abc import Callable, Collection
from typing import Any

from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from catrt.serve.echo import echo
from catrt.serve.errors import REQUEST_ID_KEY, error_response

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
# Content-Encoding -> zlib's wbits for it: gzip, and deflate as HTTP means it (zlib-wrapped).
GZIP_WBITS = 31
DECODABLE = {"gzip": GZIP_WBITS, "x-gzip": GZIP_WBITS, "deflate": 15}
ABSOLUTE_FORM = re.compile(r"https?://[^/?#]*(/.*)?", re.IGNORECASE | re.DOTALL)  # a request target naming the URL
UNSUPPORTED_MEDIA_TYPE = 415
REQUEST_TIMEOUT = 408


class RequestGate:
    """Request id on every answer; 401 without the key on protected paths; 413 over `max_body_bytes`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        authorized: Callable[[bytes | None], bool] | None = None,
        protect_metrics: bool = False,
        json_paths: Collection[str] = (),
        router: Any = None,
        body_timeout: float | None = None,
    ) -> None:
        self.app = app
        self.body_timeout = body_timeout
        self.router = router
        self.max_body_bytes = max_body_bytes
        self.authorized = authorized
        self.protect_metrics = protect_metrics
        self.json_paths = frozenset(json_paths)

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

        scope["path"] = _without_trailing_slash(_origin_form(scope["path"]))
        if scope["path"] == "*" and scope["method"] == "OPTIONS":  # RFC 9110 9.3.7: about the server as a whole
            await Response(status_code=204, headers={"Allow": self._server_methods()})(scope, receive, send_with_id)
            return
        if not scope["path"].startswith("/"):
            response = error_response(
                400, f"the request target {echo(scope['path'])} is not a path: write it from the root, as in "
                "'POST /v1/images/generations'", "invalid_request_error",
            )
            await response(scope, receive, send_with_id)
            return
        if scope["method"] == "HEAD":  # as GET, headers only
            scope["method"] = "GET"
            send_with_id = _headers_only(send_with_id)
        authorization = [value for name, value in scope.get("headers", []) if name == b"authorization"]
        if self._needs_key(scope["path"]) and (len(authorization) != 1 or not self.authorized(authorization[0])):
            several = " (once: this request has several Authorization headers)" if len(authorization) > 1 else ""
            response = error_response(
                401, f"missing or wrong API key: send the header 'Authorization: Bearer <key>'{several}",
                "invalid_request_error", headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send_with_id)
            return
        if self.router is not None and not _routed(self.router, scope):
            # No route takes this method and path: the app answers 404 or 405 without reading the body, so
            # an upload to a route this server lacks (the SDK's images.edit) is told so, not 413.
            await self.app(scope, receive, send_with_id)
            return
        declared = _content_length(dict(scope.get("headers", [])).get(b"content-length"))
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(scope, receive, send_with_id, f"is {declared} bytes")
            return
        try:
            body = await asyncio.wait_for(_read_body(receive, self.max_body_bytes), self.body_timeout)
        except _BodyTooLarge:
            await self._too_large(scope, receive, send_with_id, f"passed {self.max_body_bytes} bytes")
            return
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            await self._too_slow(scope, receive, send_with_id)
            return
        if body is None:  # the client left (or the read timeout closed the connection) mid-body
            return
        try:
            body = self._decoded(scope, body)
        except _BodyTooLarge:
            await self._too_large(scope, receive, send_with_id, f"decodes past {self.max_body_bytes} bytes")
            return
        except _Refused as refusal:
            logger.info("request %s refused: %s", scope[REQUEST_ID_KEY], refusal.message)
            response = error_response(refusal.status, refusal.message, "invalid_request_error", refusal.param)
            await response(scope, receive, send_with_id)
            return
        await self.app(scope, _replay(body, receive), send_with_id)

    def _decoded(self, scope: Scope, body: bytes) -> bytes:
        """The body with its Content-Encoding undone, checked as JSON's where the route reads JSON; the
        scope's headers then describe the decoded body. Raises `_Refused` or `_BodyTooLarge`."""
        # Repeated lines of a list header are one list (RFC 9110 5.3): two `Content-Encoding: gzip` lines are gzip twice.
        encodings = ", ".join(_header_text(value, "Content-Encoding") for value in _values(scope, b"content-encoding"))
        for encoding in reversed([part.strip().lower() for part in encodings.split(",") if part.strip()]):
            if body:  # no body, nothing encoded (a GET whose client sets the header on every request)
                body = _decode(body, encoding, self.max_body_bytes)
        replaced = {b"content-encoding", b"content-length"}
        extra = [(b"content-length", str(len(body)).encode())]
        if scope["method"] == "POST" and scope["path"] in self.json_paths:
            media = _one_media_type(_values(scope, b"content-type"))
            if not media.strip():
                replaced.add(b"content-type")
                extra.append((b"content-type", b"application/json"))
            elif not _is_json(media):
                raise _Refused(
                    UNSUPPORTED_MEDIA_TYPE,
                    f"Content-Type {echo(media.strip())} is not served: send the body as JSON, with "
                    "'Content-Type: application/json'", "Content-Type",
                )
            if not body.strip():
                raise _Refused(400, 'the request body is empty: send a JSON object, e.g. {"prompt": "a red circle"}', None)
        scope["headers"] = [(name, value) for name, value in scope.get("headers", []) if name not in replaced] + extra
        return body

    def _server_methods(self) -> str:
        """Every method some route serves (HEAD wherever GET is), then OPTIONS: an `OPTIONS *` answer's Allow."""
        methods = {method for route in getattr(self.router, "routes", ()) for method in getattr(route, "methods", None) or ()}
        if "GET" in methods:
            methods.add("HEAD")
        methods.discard("OPTIONS")
        return ", ".join([*sorted(methods), "OPTIONS"])

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

    async def _too_slow(self, scope: Scope, receive: Receive, send: Send) -> None:
        logger.info("request %s refused: its body did not arrive within %g s", scope[REQUEST_ID_KEY], self.body_timeout)
        response = error_response(
            REQUEST_TIMEOUT, f"the request body did not arrive whole within {self.body_timeout:g} s of its headers; "
            "send the body at once", "timeout_error", headers={"Connection": "close"},
        )
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    """The body passed the limit while it was being received or decoded."""


class _Refused(Exception):
    """A body the gate answers itself: `status`, the message, the header or field it is about."""

    def __init__(self, status: int, message: str, param: str | None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _routed(router: Any, scope: Scope) -> bool:
    """Whether a route of `router` takes this request's method and path."""
    return any(route.matches(scope)[0] == Match.FULL for route in router.routes)


def _origin_form(path: str) -> str:
    """`http://host:port/v1/models` -> `/v1/models`: a request line may name the whole URL (absolute form, as
    clients write it to a proxy), which a server must take (RFC 9112 3.2.2); uvicorn hands it on as the path."""
    match = ABSOLUTE_FORM.fullmatch(path)
    if match is None:
        return path
    return match.group(1) or "/"


def _without_trailing_slash(path: str) -> str:
    """`/v1/models/` -> `/v1/models`: a client's trailing slash reaches the same route, never a redirect."""
    stripped = path.rstrip("/")
    return stripped or "/"


def _headers_only(send: Send) -> Send:
    """A `send` that drops the response body (a HEAD answer); the headers, Content-Length included, go out."""

    async def send_headers(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_headers


def _header_text(value: bytes, name: str) -> str:
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise _Refused(400, f"the {name} header is not ASCII", name) from None


def _values(scope: Scope, name: bytes) -> list[bytes]:
    """Every value of header `name`, in the order sent (a dict of the headers keeps only the last)."""
    return [value for key, value in scope.get("headers", []) if key == name]


def _one_media_type(values: list[bytes]) -> str:
    """The body's Content-Type ("" if none); lines that disagree are refused, as the body cannot be two types."""
    media = [_header_text(value, "Content-Type") for value in values]
    if len({value.strip().lower() for value in media}) > 1:
        raise _Refused(400, f"the Content-Type header is sent {len(media)} times with different values "
                       f"({', '.join(echo(value.strip()) for value in media)}): send it once", "Content-Type")
    return media[0] if media else ""


def _is_json(media: str) -> bool:
    """`application/json` or `application/<anything>+json`, any parameters (charset...)."""
    message = email.message.Message()
    message["content-type"] = media
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _decode(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` with one Content-Encoding undone; inflating stops at `limit` bytes (`_BodyTooLarge` past it)."""
    if encoding == "identity":
        return body
    if encoding not in DECODABLE:
        raise _Refused(
            UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {echo(encoding)} is not served: send the body as is, or with gzip or deflate",
            "Content-Encoding",
        )
    decoded, rest = b"", body
    while rest:  # gzip: members one after another (RFC 1952 2.2), as `gzip -c a b` writes; deflate: one stream
        inflater = zlib.decompressobj(wbits=DECODABLE[encoding])
        try:
            decoded += inflater.decompress(rest, limit + 1 - len(decoded))
        except zlib.error:
            # Bytes after a whole member that start no other one are junk after the stream, not bad data.
            problem = f"not valid {encoding} data" if rest is body else f"not one whole {encoding} stream"
            raise _Refused(400, f"the body is {problem}, as its Content-Encoding says", "Content-Encoding") from None
        if len(decoded) > limit:
            raise _BodyTooLarge
        if not inflater.eof or (inflater.unused_data and DECODABLE[encoding] != GZIP_WBITS):
            raise _Refused(400, f"the body is not one whole {encoding} stream, as its Content-Encoding says", "Content-Encoding")
        rest = inflater.unused_data
    return decoded


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
