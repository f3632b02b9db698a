"""Analysis jobs: queue one (`POST /analyze`), read any job's state and result (`GET /status/{id}`), cancel any
job (`POST /cancel/{id}`).

`/status` and `/cancel` serve every kind of job (analyses, generations, switches, vector jobs), as the seed's API
does; they live here because analysis is the job kind they were made for.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from ...jobs.record import UnknownRequest
from ..deps import Identity, ServiceDep, client_identity, model_for, refund_cache_hit
from ..schemas import AnalyzeAccepted, AnalyzeRequest, CancelResponse, ErrorBody, JobDeleted
from .shares import SharesDep

router = APIRouter(
    dependencies=[Depends(client_identity)],
    responses={
        400: {"model": ErrorBody, "description": "invalid input"},
        404: {"model": ErrorBody, "description": "unknown id"},
    },
)


@router.post("/analyze", response_model=AnalyzeAccepted, summary="Queue an analysis of a text or chat")
async def analyze(body: AnalyzeRequest, svc: ServiceDep, who: Identity, request: Request) -> dict[str, Any]:
    """Queues the analysis and answers at once; read the outcome from `GET /status/{request_id}`. `options` are
    the engine's `AnalyzeOptions` (the seed's, nested `optimize_explanations_config` included). A request the
    result cache answers whole is already completed (`metadata.cached`) and costs no rate-limit budget."""
    await model_for(svc, body.model_id, who)
    job = await svc.submit_analysis(
        body.engine_request(), model_id=body.model_id, client_request_id=body.client_request_id, owner=who.key
    )
    await refund_cache_hit(request, who, job)
    return svc.accepted(job)


@router.delete(
    "/api/v1/jobs/{request_id}",
    response_model=JobDeleted,
    summary="Delete a request, its result and its cached rows",
)
async def delete_job(request_id: str, svc: ServiceDep, shares: SharesDep) -> dict[str, Any]:
    """Cancels the request if it has not finished, then removes it for good: its result, the rows it added to the
    result cache, and its shares (their links answer 404). 404 for an unknown id (or another caller's)."""
    await svc.delete_job(request_id)
    await shares.forget_request(request_id)
    return {"request_id": request_id, "deleted": True}


@router.get("/status/{request_id}", summary="State and result of a request")
async def job_status(request_id: str, svc: ServiceDep) -> dict[str, Any]:
    """The seed's fields (`request_id, status, created_at, started_at, completed_at, processing_time, result,
    error`; `result` = `{tokens, metadata}` once completed) plus `kind, model_id, client_request_id,
    queue_position, progress`. Works for WebSocket jobs too, and across restarts."""
    job = await svc.scheduler.get(request_id)
    if job is None:
        raise UnknownRequest(request_id)
    return job.status_body(svc.scheduler.queue_position(request_id))


@router.post("/cancel/{request_id}", response_model=CancelResponse, responses={409: {"model": ErrorBody}})
async def cancel(request_id: str, svc: ServiceDep) -> dict[str, Any]:
    """Cancel a queued or running request; a running one stops at its next chunk and keeps no partial result.
    409 when the request has already finished."""
    job = await svc.scheduler.cancel(request_id)
    return {"request_id": job.id, "status": "cancelled", "message": job.error or "Cancelled"}
