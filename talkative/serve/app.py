"""`create_app(settings)`: the FastAPI application of the analysis server.

Routes: the public root, `/health` and `/ready`; the API (`/analyze`, `/status/{id}`, `/cancel/{id}`,
`/api/v2/models`, `/api/v2/models/switch`, the UI's `/api/history`) behind `api.deps.client_identity`; the
WebSocket `/ws`; `/docs` when ENABLE_DOCS; and the web UI's static files at `/` when `talkative/web/index.html`
exists.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .api import errors
from .api.routes import analyses as rest
from .api.routes import generation as generate_api
from .api.routes import history
from .api.routes import metrics as observability
from .api.routes import models as v2_api
from .api.routes import slim as slim_api
from .api.routes import vectors as vectors_api
from .api.ws import protocol as ws
from .auth import install as protection
from .catalog.registry import load_registry
from .jobs.generation import Generations
from .jobs.vectors import VectorJobs
from .observability.system import SystemStats
from .service import Service
from .settings import Settings

log = logging.getLogger("talkative.serve")

DESCRIPTION = """Natural language autoencoders as a service: every token's activation explained in words, with
the reconstruction error (MSE, relative RMSE), the KL divergence of the patched prediction and per-word salience.

Analyses are jobs: `POST /analyze` queues one, `GET /status/{request_id}` returns its state and result, and the
WebSocket `/ws` streams progress and results. Errors are `{"detail": "..."}` with 400 for invalid input."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.load()
    registry = load_registry(settings.model_groups_file)
    registry.bind_environment(settings.environment_overrides)
    registry.default_group(settings)  # a default group the file does not define fails here, at startup

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service(settings, registry)
        app.state.service = service
        protection.attach(app, service)  # issue 4: per-client cap, metrics, before anything starts
        app.state.generations = Generations(service)  # job kinds are registered before recovered jobs run
        VectorJobs(service)
        await service.start()
        log.info(
            "serving %d model groups on %s; data in %s",
            len(registry.groups),
            ", ".join(d.name for d in service.scheduler.devices),
            settings.data_dir,
        )
        try:
            yield
        finally:
            await app.state.generations.close()
            await service.stop()

    docs = settings.enable_docs
    app = FastAPI(
        title="Talkative",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.settings = settings
    app.state.system_stats = SystemStats()
    errors.install(app)
    protection.install(app, settings)  # issue 4: keys, origins, hosts, rate limits, body limit, metrics, CORS
    app.include_router(rest.public)
    app.include_router(rest.api)
    app.include_router(history.router)
    app.include_router(generate_api.router)
    app.include_router(slim_api.router)
    app.include_router(vectors_api.router)
    app.include_router(v2_api.router)
    app.include_router(ws.router)
    app.include_router(observability.router)
    if (rest.WEB_DIR / "index.html").is_file():
        app.mount("/", StaticFiles(directory=rest.WEB_DIR, html=True), name="web")
    return app
