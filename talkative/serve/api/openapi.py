"""An OpenAPI description that documents the statuses the server really answers with.

FastAPI documents a 422 on every operation with parameters, which this server never sends (bad input is 400),
and knows nothing of the statuses that the middleware in front of every route answers with: 400 for a host not
served, 401 without a valid key, 403 for a foreign origin, a non-local client of a keyless server or an
administrator's route, 413 for a body over MAX_REQUEST_BYTES, 429 over a rate limit or the queue's capacity
(with `Retry-After`), 503 while starting or shutting down. `install(app, keyed)` rewrites the generated
description once so that a client (or schemathesis) reading it learns every status it can get. The answers
themselves are `serve/errors.py`'s.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

#: operations open without a key (GET/HEAD): they can still be refused for the host or, without keys, the client
PUBLIC_OPERATIONS = frozenset({"/", "/health", "/ready"})
ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
ERROR_SCHEMA = {
    "title": "ErrorBody",
    "type": "object",
    "properties": {"detail": {"type": "string", "title": "Detail"}},
    "required": ["detail"],
}
RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "string"}}
}
WHY = {
    400: "invalid input (every problem listed under `errors`), or a host the server does not answer to",
    401: "no API key, or a wrong one (the server has keys)",
    403: "a browser page of a foreign origin, a remote client of a keyless local server, or an "
    "administrator's model or route",
    404: "an unknown id (or one of another client's jobs)",
    413: "a body larger than MAX_REQUEST_BYTES",
    429: "over the rate limit, the queue's capacity or the client's share of it",
    503: "the server is starting (its model is loading) or shutting down",
}


def _error(status: int, description: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description or WHY[status],
        "content": {"application/json": {"schema": ERROR_REF}},
    }
    if status in (429, 503):
        out["headers"] = RETRY_AFTER
    if status == 401:
        out["headers"] = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}
    return out


def document_statuses(schema: dict[str, Any], keyed: bool = True) -> dict[str, Any]:
    """The generated description with 422 replaced by 400 and the middleware's statuses added (see the module).
    `keyed`: the server has API keys; without them no operation asks for one (and none answers 401)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if not keyed:
        schema["components"].pop("securitySchemes", None)
    components.setdefault("ErrorBody", ERROR_SCHEMA)
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in ("get", "put", "post", "delete", "patch", "head", "options"):
                continue
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if not keyed:
                operation.pop("security", None)
            statuses = {400}
            if method in ("get", "head") and path in PUBLIC_OPERATIONS:
                statuses |= {403}
                if path == "/ready":
                    statuses |= {503}
            else:
                statuses |= {401, 403, 429, 503} if keyed else {403, 429, 503}
                if "requestBody" in operation:
                    statuses |= {413, 404}
                if "{" in path:
                    statuses |= {404}
            for status in sorted(statuses):
                documented = responses.get(str(status))
                if documented is None:
                    responses[str(status)] = _error(status)
                elif status in (429, 503, 401):
                    documented.setdefault("headers", _error(status)["headers"])
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in components and unused not in str(schema.get("paths")):
            del components[unused]
    return schema


def install(app: FastAPI, *, keyed: bool) -> None:
    """Replace the app's OpenAPI builder with one that documents the real statuses (see the module); `keyed`: the
    server has API keys."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_statuses(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                ),
                keyed=keyed,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
