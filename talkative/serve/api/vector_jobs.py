"""Running a job that its request waits for, and answering it: the vector endpoints (`routes/vectors.py`) and the
diff (`routes/diff.py`) are answered with their job's result, not with a request id to poll.

Why a wait with a limit: such a job is usually done in seconds, and a pipeline wants the answer in one round trip;
but a request held open without bound ties up a connection (and hits proxies' timeouts), so one still running
after `REQUEST_TIMEOUT` (or `DEFAULT_WAIT`) is answered 202 with its `request_id`, for `GET /status/{id}`. A
failed job is answered with the status its error deserves (`errors.failure_status`), a cancelled one with 409.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse

from ..auth.policy import ClientIdentity
from ..errors import failure_status
from ..jobs.record import CANCELLED, COMPLETED, FAILED
from ..service import Service
from .deps import client_identity
from .schemas import ErrorBody

#: how long a request waits for its job when REQUEST_TIMEOUT is off, before answering 202 with its id
DEFAULT_WAIT = 300.0


def vector_router() -> APIRouter:
    """A router of `/api/v1` vector routes: keyed, and documented with the refusals every vector job can meet."""
    return APIRouter(
        prefix="/api/v1",
        tags=["vectors"],
        dependencies=[Depends(client_identity)],
        responses={
            400: {"model": ErrorBody},
            403: {"model": ErrorBody},
            404: {"model": ErrorBody},
            503: {"model": ErrorBody},
        },
    )


async def run_vector_job(
    svc: Service, who: ClientIdentity, kind: str, job_request: dict[str, Any], model_id: str
) -> Any:
    """Queue a job of `kind` for the caller and answer with its result (`request_id`, `model_id` and the result's
    fields); a job still running after the wait is answered 202 with its `request_id` and status."""
    job = await svc.scheduler.submit(kind, job_request, model_id=model_id, owner=who.key)
    job = await svc.scheduler.wait(job.id, timeout=svc.settings.request_timeout or DEFAULT_WAIT)
    if job.status == COMPLETED:
        return {"request_id": job.id, "model_id": job.model_id, **(job.result or {})}
    if job.status == FAILED:
        raise HTTPException(failure_status(job.error), job.error or "failed")
    if job.status == CANCELLED:
        raise HTTPException(409, job.error or "the request was cancelled")
    return JSONResponse(
        {
            "request_id": job.id,
            "status": job.status,
            "message": f"still {job.status}; follow it with GET /status/{job.id}",
        },
        status_code=202,
    )
