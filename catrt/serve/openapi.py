"""The OpenAPI document states what this server serves, not just the request's types.

FastAPI writes the types from the pydantic models; once the model is loaded, the served values (the
served sizes as an enum, `n` up to the batch, the guidance range, prompt length, the formats) are
written over them from the same `RoutedRules` that check requests, so a schema-driven client's
valid requests are served (with builds that differ per size, a request `anyOf` holds each size's own
`n`, steps and alphas). Before the model is loaded the document has the types only and is not
cached. With an API key, the protected paths carry an HTTP bearer security requirement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

if TYPE_CHECKING:
    from catrt.serve.routing import RoutedRules

REQUEST_SCHEMA = "ImageGenerationRequest"
SECURITY_SCHEME = "bearer"


def describe_served(
    app: FastAPI, rules: Callable[[], RoutedRules | None], *, api_key: bool, metrics_auth: bool
) -> None:
    """Replace `app.openapi` with one that adds the served values and the key requirement."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes,
            openapi_version=app.openapi_version,
        )
        if api_key:
            _require_key(schema, metrics_auth)
        current = rules()
        if current is None:
            return schema
        properties = schema["components"]["schemas"][REQUEST_SCHEMA]["properties"]
        for name, fragment in current.properties().items():
            title = properties.get(name, {}).get("title", name.replace("_", " ").title())
            properties[name] = {"title": title, **fragment}
        alternatives = current.size_rules()
        if alternatives is not None:  # builds of several sizes that take other n, steps or alphas
            schema["components"]["schemas"][REQUEST_SCHEMA]["anyOf"] = alternatives
        app.openapi_schema = schema  # the loaded model's rules do not change
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _require_key(schema: dict[str, Any], metrics_auth: bool) -> None:
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "http", "scheme": "bearer", "description": "the server's API key (--api-key-file or CATRT_API_KEY)",
    }
    for path, operations in schema.get("paths", {}).items():
        if path.startswith("/v1/") or (metrics_auth and path == "/metrics"):
            for operation in operations.values():
                operation["security"] = [{SECURITY_SCHEME: []}]
                operation.setdefault("responses", {}).setdefault(
                    "401", {"description": "missing or wrong API key", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}},
                )
