"""Every route of the server, included in one place: `include_routes(app)` is all `create_app` calls.

One module per resource (analyses, models, generation, vectors, diff, history, admin, health, metrics and the
metric legend), plus the slim
API (a contract of its own, see `slim.py`) and the WebSocket protocol (`api/ws/protocol.py`). The web UI's static
files are mounted last, at `/`, so that every API path is matched before them.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles

from ..ws import protocol
from . import (
    admin,
    analyses,
    batches,
    diff,
    generation,
    health,
    history,
    legend,
    metrics,
    models,
    shares,
    slim,
    vectors,
)

#: in the order of the OpenAPI description: public routes first, then the resources
ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    analyses.router,
    models.router,
    history.router,
    batches.router,
    shares.router,
    generation.router,
    slim.router,
    vectors.router,
    diff.router,
    legend.router,
    admin.router,
    metrics.router,
    protocol.router,
)


def include_routes(app: FastAPI) -> None:
    """Every router, then the web UI's files when the package has them (`talkative/web/index.html`)."""
    for router in ROUTERS:
        app.include_router(router)
    if (health.WEB_DIR / "index.html").is_file():
        app.mount("/", StaticFiles(directory=health.WEB_DIR, html=True), name="web")
