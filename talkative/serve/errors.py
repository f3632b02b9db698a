"""Refusals as HTTP errors for the issue-5 routers: every expected failure has its status, never a 500."""

from __future__ import annotations

from fastapi import HTTPException

from ..nla.analysis import AnalysisError
from .catalog.registry import UnknownGroup, UnknownModel
from .scheduling.types import SchedulerError

Refusal = SchedulerError | UnknownModel | UnknownGroup | AnalysisError | KeyError


def http_error(exc: Refusal) -> HTTPException:
    """SchedulerError carries its status; unknown models, groups and request ids are 404; bad input is 400."""
    if isinstance(exc, SchedulerError):
        retry = getattr(exc, "retry_after", None)  # refusals for room say when to come back
        return HTTPException(exc.status, exc.detail, headers={"Retry-After": str(retry)} if retry else None)
    if isinstance(exc, AnalysisError):
        return HTTPException(400, str(exc))
    if isinstance(exc, UnknownModel | UnknownGroup):
        return HTTPException(404, str(exc))
    return HTTPException(404, f"unknown request_id {exc.args[0]!r}")


def failure_status(error: str | None) -> int:
    """The HTTP status of a job that failed: the scheduler words its own failures ("internal error: …", a group
    or model that "could not be loaded"); every other failure is the engine refusing the input."""
    text = error or ""
    if text.startswith("internal error"):
        return 500
    if "could not be loaded" in text or "is not loaded" in text:
        return 503
    return 400
