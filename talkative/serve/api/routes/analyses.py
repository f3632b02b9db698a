"""REST routes of the seed's contract: analysis jobs, their status, cancellation, model groups and switching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse

from ...catalog import visibility
from ...catalog.registry import UnknownModel
from ...jobs.record import Job
from ...scheduling.types import SchedulerError
from ...service import Service
from ..deps import ClientIdentity, client_identity, service_of
from ..schemas import (
    AnalyzeAccepted,
    AnalyzeRequest,
    CancelResponse,
    ErrorBody,
    RootResponse,
    SwitchRequest,
    SwitchResponse,
)

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "invalid input"},
    404: {"model": ErrorBody, "description": "unknown id"},
}

public = APIRouter()
api = APIRouter(dependencies=[Depends(client_identity)], responses=ERRORS)


def _http(exc: SchedulerError | KeyError) -> HTTPException:
    """SchedulerError carries its status; an unknown model or request id is a 404."""
    if isinstance(exc, SchedulerError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return HTTPException(exc.status, exc.detail, headers=headers)
    return HTTPException(
        404, str(exc) if isinstance(exc, UnknownModel) else f"unknown request_id {exc.args[0]!r}"
    )


# -- public: root, health, readiness ---------------------------------------------------------------------------------
@public.get("/", response_model=RootResponse, summary="Name and status (the web UI for browsers)")
async def root(request: Request) -> Any:
    """JSON `{name, version, status}` for API clients; a browser (Accept: text/html) gets the web UI when the
    package has one (`talkative/web/index.html`). `Accept: application/json` always gets the JSON."""
    index = WEB_DIR / "index.html"
    if "text/html" in request.headers.get("accept", "") and index.is_file():
        return FileResponse(index, media_type="text/html")
    return RootResponse()


@public.get("/health", summary="Liveness, loaded model, devices and queue size")
async def health(request: Request) -> dict[str, Any]:
    svc = service_of(request)
    return visibility.public_health(svc.health(), svc.registry)


@public.get("/ready", summary="Readiness: 200 once the startup model group is loaded, 503 before")
async def ready(request: Request) -> JSONResponse:
    svc = service_of(request)
    sched = svc.scheduler
    ok = sched.ready and sched.startup_error is None and not sched.draining
    body = {
        "ready": ok,
        "error": "the server is shutting down" if sched.draining else sched.startup_error,
        "current_model": sched.current_model,
    }
    return JSONResponse(body, status_code=200 if ok else 503)


# -- analysis jobs --------------------------------------------------------------------------------------------------
@api.post("/analyze", response_model=AnalyzeAccepted, summary="Queue an analysis of a text or chat")
async def analyze(
    body: AnalyzeRequest, request: Request, who: ClientIdentity = Depends(client_identity)
) -> dict[str, Any]:
    """Queues the analysis and answers at once; read the outcome from `GET /status/{request_id}`. `options` are
    the engine's `AnalyzeOptions` (the seed's, nested `optimize_explanations_config` included)."""
    svc = service_of(request)
    try:
        visibility.resolve(svc.scheduler, body.model_id, who)
        job = await svc.submit_analysis(body, owner=who.key)
    except (SchedulerError, UnknownModel) as exc:
        raise _http(exc) from None
    return svc.accepted(job)


@api.get("/status/{request_id}", summary="State and result of a request")
async def job_status(request_id: str, request: Request) -> dict[str, Any]:
    """The seed's fields (`request_id, status, created_at, started_at, completed_at, processing_time, result,
    error`; `result` = `{tokens, metadata}` once completed) plus `kind, model_id, client_request_id,
    queue_position, progress`. Works for WebSocket jobs too, and across restarts."""
    svc = service_of(request)
    job: Job | None = await svc.scheduler.get(request_id)
    if job is None:
        raise HTTPException(404, f"unknown request_id {request_id!r}")
    return job.status_body(svc.scheduler.queue_position(request_id))


@api.post("/cancel/{request_id}", response_model=CancelResponse, responses={409: {"model": ErrorBody}})
async def cancel(request_id: str, request: Request) -> dict[str, Any]:
    """Cancel a queued or running request; a running one stops at its next chunk and keeps no partial result.
    409 when the request has already finished."""
    svc = service_of(request)
    try:
        job = await svc.scheduler.cancel(request_id)
    except (SchedulerError, KeyError) as exc:
        raise _http(exc) from None
    return {"request_id": job.id, "status": "cancelled", "message": job.error or "Cancelled"}


# -- models ---------------------------------------------------------------------------------------------------------
@api.get("/api/v2/models", summary="Model groups, their models, and what is loaded")
async def list_models(request: Request, who: ClientIdentity = Depends(client_identity)) -> dict[str, Any]:
    svc = service_of(request)
    return client_listing(svc, who)


def client_listing(svc: Service, who: ClientIdentity) -> dict[str, Any]:
    """The listing as this client sees it; its current model is its own choice, shown even when hidden (it
    named it), else the server's default unless hidden from it."""
    listing = visibility.filter_listing(svc.models_listing(who.key), svc.registry, who)
    own = svc.scheduler.client_models.get(who.key)
    if own is not None:
        listing["current_model"] = own
        listing["current_group"] = svc.registry.model(own).group_id
    return listing


@api.post("/api/v2/models/switch", response_model=SwitchResponse, responses={503: {"model": ErrorBody}})
async def switch_model(
    body: SwitchRequest, request: Request, who: ClientIdentity = Depends(client_identity)
) -> dict[str, Any]:
    """Make a model this client's current one (the model of its requests that name none); the administrator's
    switch sets the server's default instead, for every client that has not chosen its own. A switch to another
    group is queued behind the work running on the device and answered when the group is loaded (or after
    REQUEST_TIMEOUT with `status: "queued"`; follow it with `GET /status/{request_id}`). A switch counts against
    MAX_QUEUE_SIZE and MAX_JOBS_PER_CLIENT; a later switch of the same client replaces a queued one (409 for
    the replaced request)."""
    svc = service_of(request)
    try:
        visibility.check_model(svc.registry, body.model_id, who)
        job = await svc.submit_switch(
            body.model_id,
            client_request_id=body.client_request_id,
            owner=who.key,
            server_default=who.is_admin,
        )
    except (SchedulerError, UnknownModel) as exc:
        raise _http(exc) from None
    job = await svc.scheduler.wait(job.id, timeout=svc.settings.request_timeout or None)
    if job.status == "failed":
        raise HTTPException(503, job.error or "the switch failed")
    if job.status == "cancelled":  # a later switch of this client replaced it while it waited
        raise HTTPException(409, job.error or "the switch was cancelled")
    if job.status == "completed" and job.result is not None:
        info = job.result["model_info"]
        return {
            "status": "success",
            **job.result,
            "model_info": {k: info[k] for k in ("model_id", "group_id", "is_loaded")},
            "request_id": job.id,
        }
    model = svc.registry.model(body.model_id)
    return {
        "status": "queued",
        "model_id": model.id,
        "group_id": model.group_id,
        "message": f"the switch to {model.id} is still waiting (status: {job.status})",
        "group_switched": True,
        "model_info": {"model_id": model.id, "group_id": model.group_id, "is_loaded": False},
        "request_id": job.id,
    }
