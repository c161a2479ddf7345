"""Every error the server answers, mapped to an HTTP status and OpenAI's error body in one place."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from catrt.errors import (
    CatrtError,
    GenerationError,
    QueueFullError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from catrt.serve.echo import echo, echo_json, shorten
from catrt.serve.schemas import ImageGenerationRequest

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "catrt.request_id"  # set on the ASGI scope by `catrt.serve.gate.RequestGate`
# Set on the ASGI scope by `catrt.serve.protocol` to the status it answered a request with itself (its 408 to a
# body short at the read deadline; the app's own answer is never written), so the request metrics count that one.
PROTOCOL_STATUS_KEY = "catrt.protocol_status"
# FastAPI's whole message for a body its JSON decoder raised on with anything but a JSONDecodeError (bytes
# that are not UTF-8, a number past Python's 4300-digit limit, nesting past the recursion limit) ...
FASTAPI_BODY_ERROR = "There was an error parsing the body"
# ... and what a client is told instead.
BODY_NOT_JSON = ("the body is not valid JSON: send one JSON object encoded as UTF-8, with numbers of at most 4300 "
                 "digits and shallow nesting")


UNAVAILABLE_RETRY_AFTER = 5  # seconds a client is told to wait after a 503


@dataclass(frozen=True)
class ErrorKind:
    """How one exception class is answered: HTTP status and OpenAI `type`."""

    status: int
    type: str


# Most specific first: the first class an exception is an instance of decides.
ERROR_KINDS: dict[type[Exception], ErrorKind] = {
    QueueFullError: ErrorKind(429, "rate_limit_error"),
    RequestTimeoutError: ErrorKind(504, "timeout_error"),
    ServiceUnavailableError: ErrorKind(503, "service_unavailable_error"),
    GenerationError: ErrorKind(500, "server_error"),
    CatrtError: ErrorKind(400, "invalid_request_error"),
}


def error_response(status: int, message: str, type_: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    """OpenAI's `{"error": {message, type, param, code}}`; `code` is the HTTP status as text."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": str(status)}}
    return JSONResponse(body, status_code=status, headers=headers)


def catrt_error_response(error: CatrtError) -> JSONResponse:
    """The answer to a catrt error: its status, OpenAI's body naming its field, Retry-After on a 429 (the
    queue's estimate) and a 503 (loading, draining: `UNAVAILABLE_RETRY_AFTER`; the SDK waits that long)."""
    kind = next(kind for cls, kind in ERROR_KINDS.items() if isinstance(error, cls))
    headers = None
    if isinstance(error, QueueFullError):
        headers = {"Retry-After": str(error.retry_after)}
    elif isinstance(error, ServiceUnavailableError):
        headers = {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)}
    return error_response(kind.status, str(error), kind.type, error.field, headers)


async def _catrt_error(request: Request, error: CatrtError) -> JSONResponse:
    return catrt_error_response(error)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """Pydantic's first complaint, with the body field it is about as `param` and the value it got."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        message = f"the body is not valid JSON: {_with_position(first.get('ctx', {}).get('error', first.get('msg')), location)}"
        return error_response(400, message, "invalid_request_error")
    if not location and first.get("type") == "string_unicode":  # a key pydantic cannot read as text
        message = (f"the field name {echo_json(first.get('input'))} is not valid Unicode text (a lone surrogate); "
                   "send field names as plain text")
        return error_response(400, message, "invalid_request_error")
    if not location:  # the body as a whole: JSON, but not an object
        message = f"the body must be one JSON object, not {_json_kind(first.get('input'))}"
        return error_response(400, message, "invalid_request_error")
    param = shorten(".".join(location))  # a field name the client made up may be of any length
    if first.get("type") == "missing":
        message = f"{param} is required"
    elif first.get("type") == "extra_forbidden":
        known = ", ".join(ImageGenerationRequest.model_fields)
        message = f"unknown field {echo(location[0])}: this endpoint takes {known}"
    else:
        message = f"{param}: {first.get('msg')}, got {echo_json(first.get('input'))}"
    return error_response(400, message, "invalid_request_error", shorten(location[0]))


def _with_position(reason: str, location: list[str]) -> str:
    """The JSON parser's reason with where it stopped ("Unterminated string starting at" says where only with it)."""
    if not location or not location[0].isdigit():  # NO_POSITION (a repeated key), or none given
        return reason
    return f"{reason}{'' if reason.endswith(' at') else ' at'} character {location[0]} of the body"


def _json_kind(value: object) -> str:
    """How JSON calls the kind of `value`, for a body that is not an object."""
    kinds = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"), (list, "an array"))
    if value is None:
        return "null"
    return next((name for kind, name in kinds if isinstance(value, kind)), "that")


async def _http_error(request: Request, error: HTTPException) -> Response:
    message = str(error.detail)
    if error.status_code == 400 and message == FASTAPI_BODY_ERROR:
        message = BODY_NOT_JSON
    elif error.status_code == 404 and message == "Not Found":
        asked = shorten(f"{request.method} {request.url.path}")
        message = f"Invalid URL ({asked}): this server serves {_served_routes(request)}"
    elif error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        served = _with_head(allowed)
        if request.method == "OPTIONS":  # what the route allows, as RFC 9110 has OPTIONS answer
            return Response(status_code=204, headers={"Allow": f"{served}, OPTIONS"})
        message = (f"{shorten(request.method)} is not allowed on {shorten(request.url.path)}: use "
                   f"{allowed.replace(', ', ' or ')}")
        return error_response(405, message, "invalid_request_error", headers={**(error.headers or {}), "Allow": served})
    return error_response(error.status_code, message, "invalid_request_error", headers=error.headers)


def _with_head(allowed: str) -> str:
    """A route's Allow list with HEAD beside GET: the gate answers HEAD wherever GET is served (as `OPTIONS *` says),
    and the router's own list leaves it out."""
    methods = [method.strip() for method in allowed.split(",") if method.strip()]
    if "GET" in methods and "HEAD" not in methods:
        methods.insert(methods.index("GET") + 1, "HEAD")
    return ", ".join(methods)


def _served_routes(request: Request) -> str:
    """The documented routes, as `METHOD /path`, for a client that asked for another."""
    routes = []
    for route in request.app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            routes.extend(f"{method} {route.path_format}" for method in sorted(route.methods))
    return ", ".join(routes) + " (the API's description: GET /openapi.json, /docs)"


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """A bug: the log gets the traceback under the request id, the client only the id."""
    request_id = request.scope.get(REQUEST_ID_KEY, "unknown")
    logger.error("request %s: unexpected error answering %s", request_id, request.url.path, exc_info=error)
    return error_response(500, internal_error_message(request_id), "server_error")


def internal_error_message(request_id: str) -> str:
    """What a client is told about a failure inside the server: never the exception's own text."""
    return f"internal error (request id {request_id}; the server log has the details)"


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(CatrtError, _catrt_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
