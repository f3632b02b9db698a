"""The composition root: `build_app(settings)` builds the FastAPI application, and its lifespan the serving objects.

Every object is built here, explicitly and in order, each given what it uses in its constructor; nothing is
attached or registered afterwards. Two steps, because two lifetimes:

* `build_app` (when the app is made): the catalogue (a bad `model_groups.json` or default group stops here), the
  access policy (a bad `API_KEYS` stops here, with a message that names no key), the rate limiter and the
  metrics, the middleware (`protect`), error handlers, OpenAPI and the routes.
* `build_serving` (in the lifespan, on the event loop, so an app built only to read its routes opens no store and
  starts no thread): residency, job store, job queue, WebSocket hub, token logs, the metrics' sink, the job
  kinds, one worker per device, the scheduler, the service and the generations front.

Routes: the public root, `/health` and `/ready`; the API (`/analyze`, `/status/{id}`, `/cancel/{id}`,
`/api/v2/models`, `/api/v2/models/switch`, the UI's `/api/history`) behind `api.deps.client_identity`; the
WebSocket `/ws`; the MCP tools at `/mcp` (its session manager runs in the lifespan); `/docs` when ENABLE_DOCS;
and the web UI's static files at `/` when `talkative/web/index.html` exists.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from . import errors
from .api import mcp, openapi
from .api.routes import include_routes
from .api.routes.batches import BATCHES_PATH
from .api.ws.hub import Hub
from .auth.middleware import Guard
from .auth.policy import AccessPolicy
from .auth.ratelimit import RateLimiter
from .catalog.registry import Registry, load_registry
from .catalog.residency import Residency
from .jobs.analysis import AnalysisKind
from .jobs.batches import Batches, BatchStore
from .jobs.cache import ResultCache
from .jobs.choices import ModelChoices
from .jobs.database import Database, open_database
from .jobs.generation import GenerateKind, Generations, TokenLogs
from .jobs.kinds import JobKind, final_message
from .jobs.shares import ShareStore
from .jobs.store import LOCAL_RUNNER, JobStore
from .jobs.vectors import VectorKind
from .observability.metrics import Metrics, TelemetrySink
from .observability.request_context import RequestContext
from .observability.system import SystemStats
from .scheduling.leases import Leases, runner_id
from .scheduling.policy import DEFAULT_POLICY
from .scheduling.queue import JobQueue
from .scheduling.scheduler import Scheduler
from .scheduling.workers import LocalWorker, Worker
from .service import Service
from .settings import Settings

log = logging.getLogger("talkative.serve")

DESCRIPTION = """Natural language autoencoders as a service: every token's activation explained in words, with
the reconstruction error (MSE, relative RMSE), the KL divergence of the patched prediction and per-word salience.

Analyses are jobs: `POST /analyze` queues one, `GET /status/{request_id}` returns its state and result, and the
WebSocket `/ws` streams progress and results. Errors are `{"detail": "..."}` with 400 for invalid input."""


@dataclass
class Serving:
    """What the lifespan built: the service the routes use, the generations front and the batches."""

    service: Service
    generations: Generations
    logs: TokenLogs
    batches: Batches
    shares: ShareStore
    choices: ModelChoices
    database: Database  # every store's; closed after them

    async def start(self) -> None:
        await self.service.start()
        await self.batches.start()  # after the scheduler has recovered the jobs of unfinished batch items
        await self.shares.purge_orphans()

    async def stop(self) -> None:
        await self.batches.stop()
        self.shares.close()
        await self.generations.close()
        self.logs.close()
        await self.service.stop()
        self.choices.close()  # after the scheduler, which reads and writes it
        self.database.close()


def build_serving(settings: Settings, registry: Registry, access: AccessPolicy, metrics: Metrics) -> Serving:
    """Every serving object, in order, each given its parts (call on the event loop, before starting)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)  # this process's engine work, on the local backend
    residency = Residency(registry, settings)
    database = open_database(settings)
    store = JobStore(database)
    cache = (
        ResultCache(
            database,
            max_bytes=int(settings.result_cache_max_mb * 2**20),
            shared=settings.result_cache_shared,
            monitor=metrics,
            retention_seconds=settings.result_retention_days * 86400,
        )
        if settings.result_cache
        else None
    )
    queue = JobQueue()
    hub = Hub(queue, registry, settings)
    logs = TokenLogs(hub)
    policy = DEFAULT_POLICY()
    kinds: list[JobKind] = [
        AnalysisKind(settings, registry, policy, cache),
        GenerateKind(settings),
        VectorKind(settings, registry),
    ]
    by_name = {name: kind for kind in kinds for name in kind.names}
    sink = TelemetrySink(logs, metrics, partial(final_message, kinds=by_name))
    workers: list[Worker]
    if settings.backend == "ray":  # the engines are Serve worker deployments (ray is imported only here)
        from .cluster.wiring import remote_backend

        remote = remote_backend(settings, registry, kinds)
        workers, scheduler_kinds, scheduler_settings = remote.workers, remote.kinds, remote.settings
    else:
        workers = [
            LocalWorker(
                device,
                slots=settings.num_workers_per_gpu,
                residency=residency,
                max_tokens=settings.max_tokens,
                row_token_budget=settings.row_token_budget,
            )
            for device in settings.resolved_devices()
        ]
        scheduler_kinds, scheduler_settings = kinds, settings
    # replicas of a cluster share the store: each runs the jobs and feeds the batches it holds a lease on, and
    # adopts dead ones'; one runner id names the replica in both
    runner = runner_id() if settings.backend == "ray" else LOCAL_RUNNER
    choices = ModelChoices(database)  # current models, in the store: every replica resolves requests alike
    scheduler = Scheduler(
        scheduler_settings,
        registry,
        store,
        workers=workers,
        kinds=scheduler_kinds,
        queue=queue,
        sink=sink,
        monitor=metrics,
        policy=policy,
        client_cap=access.client_cap,
        choices=choices,
        leases=Leases(store, runner, settings.lease_seconds) if settings.backend == "ray" else None,
    )
    service = Service(settings, registry, residency, store, scheduler, hub, cache)
    generations = Generations(scheduler, registry, settings, logs, service.submit_analysis)
    batches = Batches(
        settings,
        BatchStore(database),
        scheduler,
        service.submit_analysis,
        service.delete_job,
        devices=len(workers),
        runner=runner,
        lease_seconds=settings.lease_seconds,
    )
    metrics.bind(service)
    return Serving(service, generations, logs, batches, ShareStore(database), choices, database)


def protect(
    app: FastAPI, settings: Settings, access: AccessPolicy, limiter: RateLimiter, metrics: Metrics
) -> None:
    """The middleware, outermost first: request context (request id, HTTP metrics, access log), CORS (so that even
    a refusal carries CORS headers and a page of an allowed origin can read why it was refused), then the gate."""
    app.add_middleware(
        Guard,
        policy=access,
        limiter=limiter,
        metrics=metrics,
        max_body=settings.max_request_bytes,
        body_limits={BATCHES_PATH: (settings.max_batch_bytes, "MAX_BATCH_BYTES")},
    )
    origins = access.origins
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_credentials="*" not in origins,
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=["Retry-After", "X-Request-ID"],
    )
    app.add_middleware(RequestContext, metrics=metrics)


def log_access(access: AccessPolicy) -> None:
    log.info("access: %s", access.describe())
    short = access.keys.short_keys()
    if short:
        log.warning("API keys shorter than 16 characters (%s): use long random keys", ", ".join(short))
    if access.check_hosts:
        log.info("serving the host names %s (ALLOWED_HOSTS)", ", ".join(access.allowed_hosts))


def _limiter_and_metrics(settings: Settings) -> tuple[RateLimiter, Metrics]:
    """In one process, both count there; the replicas of a cluster count rate limits in one shared place and post
    their metrics to one board, so that any replica answers for all of them."""
    if settings.backend != "ray":
        return RateLimiter(settings.rate_limit_per_minute), Metrics()
    from .cluster.metrics_board import ClusterMetrics, replica_label
    from .cluster.shared_limits import SharedRateStorage

    limiter = RateLimiter(settings.rate_limit_per_minute, SharedRateStorage())
    return limiter, Metrics(ClusterMetrics(replica_label("ingress")))


def build_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.load()
    registry = load_registry(settings.model_groups_file)
    registry.bind_environment(settings.environment_overrides)
    registry.default_group(settings)  # a default group the file does not define fails here, at startup
    access = AccessPolicy(settings)
    limiter, metrics = _limiter_and_metrics(settings)
    mcp_endpoint = mcp.build_endpoint(max_body=settings.max_request_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        serving = build_serving(settings, registry, access, metrics)
        app.state.service = serving.service
        app.state.generations = serving.generations
        app.state.batches = serving.batches
        app.state.shares = serving.shares
        log_access(access)
        await serving.start()
        metrics.start()  # a cluster's replicas post their metrics to the shared board from now on
        log.info(
            "serving %d model groups on %s; data in %s",
            len(registry.groups),
            ", ".join(d.name for d in serving.service.scheduler.devices),
            settings.data_dir,
        )
        try:
            async with mcp_endpoint.running():
                yield
        finally:
            await metrics.stop()
            await serving.stop()

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
    app.state.access_policy = access
    app.state.metrics = metrics
    app.state.rate_limiter = limiter
    errors.register(app)
    protect(app, settings, access, limiter, metrics)
    openapi.install(app, keyed=bool(access.keys))
    app.router.routes.append(mcp.route(mcp_endpoint))  # before include_routes' catch-all web UI
    include_routes(app)
    return app


#: the name the CLI, the tests and `talkative.serve` call
create_app = build_app
