"""The public routes: the root (JSON, or the web UI for a browser), `/health` (liveness) and `/ready` (readiness).

They answer without a key (the gate lets GET/HEAD of these paths through), so a load balancer or an orchestrator
can probe the server; what they show is therefore what anyone may know (`visibility.public_health`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

import talkative

from ...catalog import visibility
from ..deps import ServiceDep
from ..schemas import RootResponse

WEB_DIR = Path(talkative.__file__).resolve().parent / "web"  # the UI ships inside the package

router = APIRouter()


@router.get("/", response_model=RootResponse, summary="Name and status (the web UI for browsers)")
async def root(request: Request) -> Any:
    """JSON `{name, version, status}` for API clients; a browser (Accept: text/html) gets the web UI when the
    package has one (`talkative/web/index.html`). `Accept: application/json` always gets the JSON."""
    index = WEB_DIR / "index.html"
    if "text/html" in request.headers.get("accept", "") and index.is_file():
        return FileResponse(index, media_type="text/html")
    return RootResponse()


@router.get("/health", summary="Liveness, loaded model, devices and queue size")
async def health(svc: ServiceDep) -> dict[str, Any]:
    return visibility.public_health(await svc.health(), svc.registry)


@router.get("/ready", summary="Readiness: 200 once the startup model group is loaded, 503 before")
async def ready(svc: ServiceDep) -> JSONResponse:
    sched = svc.scheduler
    ok = sched.ready and sched.startup_error is None and not sched.draining
    body = {
        "ready": ok,
        "error": "the server is shutting down" if sched.draining else sched.startup_error,
        "current_model": await sched.server_model(),
    }
    return JSONResponse(body, status_code=200 if ok else 503)
