"""Error bodies: the contract's `{"detail": "<what went wrong>"}`, with 400 (not FastAPI's 422) for bad input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def describe_validation_error(errors: Sequence[Any]) -> str:
    """One readable line per problem: `options.optimize_explanations_config.best_of_k: Input should be ≤ 64`."""
    parts = []
    for err in errors:
        if err.get("type") == "json_invalid":
            parts.append("the body is not valid JSON")
            continue
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        msg = str(err.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    return JSONResponse(
        {
            "detail": describe_validation_error(errors),
            "errors": [
                {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors
            ],
        },
        status_code=400,
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
