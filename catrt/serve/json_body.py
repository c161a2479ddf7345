"""JSON request bodies parsed once, as UTF-8 only, refusing an object that names a key twice.

Python's parser keeps the last of two equal keys, other parsers the first, so a body with
`"prompt"` twice can mean one thing to a proxy or a log and another to this server. Here it is a
400 naming the key. FastAPI parses a route's body through `Request.json`; `UniqueKeysRoute` hands
its routes a request whose `json` makes that check while parsing, so the body is still parsed once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from catrt.serve.echo import echo
from catrt.serve.json_numbers import parse_float


NO_POSITION = -1  # a `JSONDecodeError.pos` that points at nothing: a repeated key is found once its object is parsed


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """One JSON object as a dict; raises `_RepeatedKey` for a key it names twice."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _RepeatedKey(key)
        result[key] = value
    return result


def loads_unique(body: bytes) -> Any:
    """`json.loads(body)`, but a repeated key in any object is a `json.JSONDecodeError` naming it.

    The body must be UTF-8 (RFC 8259; a leading byte order mark is skipped): `json.loads` would also
    guess UTF-16 and UTF-32 from the bytes. Other bytes raise `UnicodeDecodeError`. A number whose float is a whole
    number it does not write (`9007199254740993.0`) keeps its text (`catrt.serve.json_numbers`)."""
    text = body.decode("utf-8-sig")
    try:
        return json.loads(text, object_pairs_hook=_unique_object, parse_float=parse_float)
    except _RepeatedKey as repeated:
        raise json.JSONDecodeError(
            f"the key {echo(repeated.key)} appears twice in one object; send each field once", text, NO_POSITION,
        ) from None


class UniqueKeysRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_unique(await self.body())
        return self._json


class UniqueKeysRoute(APIRoute):
    """An `APIRoute` whose body is parsed by `loads_unique`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_unique(request: Request) -> Response:
            return await handle(UniqueKeysRequest(request.scope, request.receive))

        return handle_unique
