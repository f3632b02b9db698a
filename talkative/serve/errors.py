"""Every expected failure as one answer, written once: domain exceptions -> (status, Retry-After, body).

A request can fail in four layers, and each answers in its own place, never as a 500:

1. **The gate** (`auth/middleware.py`) refuses before any route runs: host, origin, key, rate limit, body size,
   shutdown. Its refusals never reach the handlers here.
2. **Validation.** FastAPI's `RequestValidationError` becomes 400 (not its 422), with one readable `detail` line
   and the `errors` list; a pydantic `ValidationError` raised later (a WebSocket message validated by hand) is the
   same 400.
3. **Domain refusals**, raised by the service, the scheduler, the catalogue and the engine: `REPLIES` below maps
   each exception type to its status, its `Retry-After` and its `detail`. `register(app)` installs one FastAPI
   handler per row, once, so routes just raise; the WebSocket protocol turns the same rows into its `error`
   frames (`reply_for`), so both APIs answer a refusal alike.
4. **Anything else** is a bug: FastAPI answers 500, the WebSocket protocol an `error` frame with code 500.

Routes still raise `HTTPException` for checks that only a route makes (a body's shape, a job's kind).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..nla.analysis import AnalysisError
from .auth.middleware import Refusal
from .catalog.registry import UnknownGroup, UnknownModel
from .jobs.record import UnknownRequest
from .scheduling.types import SchedulerError


@dataclass(frozen=True)
class ErrorReply:
    """What a client is told about one failure, over HTTP or as a WebSocket `error` frame."""

    status: int
    detail: str
    retry_after: int | None = None
    #: why a refusal for room or rate happened (queue_full, client_busy, rate_limited, ...)
    kind: str | None = None

    def headers(self) -> dict[str, str] | None:
        """A refusal that knows when room comes back says so (`Retry-After`, seconds)."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after else None

    def frame_fields(self) -> dict[str, Any]:
        """What a WebSocket `error` frame adds to `error` and `code`: the refusal's kind and when to retry."""
        if not self.retry_after:
            return {}
        return {"kind": self.kind, "retry_after": self.retry_after}


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


def _unknown_request(exc: UnknownRequest) -> ErrorReply:
    return ErrorReply(404, f"unknown request_id {exc.args[0]!r}")


#: domain exception -> its answer; the first row whose type matches wins (subclasses before their bases)
REPLIES: tuple[tuple[type[Exception], Callable[[Any], ErrorReply]], ...] = (
    (SchedulerError, lambda e: ErrorReply(e.status, e.detail, e.retry_after, e.reason)),
    (Refusal, lambda e: ErrorReply(e.status, e.detail, e.retry_after, e.reason)),
    (UnknownModel, lambda e: ErrorReply(404, str(e))),
    (UnknownGroup, lambda e: ErrorReply(404, str(e))),
    (UnknownRequest, _unknown_request),
    (AnalysisError, lambda e: ErrorReply(400, str(e))),
    (ValidationError, lambda e: ErrorReply(400, describe_validation_error(e.errors()))),
)


def reply_for(exc: Exception) -> ErrorReply | None:
    """The answer to an expected failure, or None for a bug."""
    for kind, reply in REPLIES:
        if isinstance(exc, kind):
            return reply(exc)
    return None


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    reply = reply_for(exc)
    assert reply is not None  # registered only for the types of REPLIES
    return JSONResponse({"detail": reply.detail}, status_code=reply.status, headers=reply.headers())


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


def register(app: FastAPI) -> None:
    """Install the handlers of layers 2 and 3 (see the module); called once, by `create_app`."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    for kind, _ in REPLIES:
        app.add_exception_handler(kind, _domain_error)


def failure_status(error: str | None) -> int:
    """The HTTP status of a job that failed: the scheduler words its own failures ("internal error: …", a group
    or model that "could not be loaded"); every other failure is the engine refusing the input."""
    text = error or ""
    if text.startswith("internal error"):
        return 500
    if "could not be loaded" in text or "is not loaded" in text:
        return 503
    return 400
