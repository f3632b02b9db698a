"""What a route needs, named as types: `who: Identity`, `svc: ServiceDep`, `state: Catalog`, `gens: GenerationsDep`.

The gate middleware (`auth/middleware.py`) has already authenticated the request, checked its origin and host
and charged its rate limit before any route runs, and left the caller's `ClientIdentity` in the scope;
`client_identity` hands it to the routes. What only a route can know is checked here:

* **Ownership.** A route with a `{request_id}` (or `{job_id}`) path parameter serves only the caller's own job:
  another caller gets the same 404 as for an id that does not exist, so ids cannot be probed. WebSocket
  messages naming a `request_id` (`subscribe`, `status`, `cancel_request`, and any type added later) pass the same
  check in `message_gate`.
* **WebSocket messages** are rate limited like REST requests (`ping` is free) in `message_gate`, which the
  protocol handler calls for every well-formed message before its handler.

Jobs record `identity.key` as their owner; `identity.is_admin` marks the admin (the key named `admin`, or the
local user of a server without keys). Without the gate in front (an app assembled by hand), the dependencies
authenticate by themselves, so a route is never open by accident.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security, WebSocket, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from ..auth.middleware import Refusal
from ..auth.policy import IDENTITY_SCOPE_KEY, AccessPolicy, ClientIdentity, bearer, client_address, owns
from ..auth.ratelimit import RateLimiter
from ..catalog import visibility
from ..catalog.listing import CatalogState
from ..jobs.generation import Generations
from ..jobs.record import Job, UnknownRequest
from ..observability.metrics import Metrics
from ..observability.system import SystemStats
from ..service import Service
from .ws.hub import Connection

#: path parameters that name a job, checked for ownership on every route that has one
JOB_PARAMS = ("request_id", "job_id")
#: WebSocket message types that cost nothing against the rate limit
FREE_MESSAGES = frozenset({"ping"})
#: documents the Bearer scheme in the OpenAPI description (the gate does the checking)
bearer_scheme = HTTPBearer(auto_error=False, description="An API key, when the server has them (API_KEY(S)).")


# -- the app's objects, as built by create_app ----------------------------------------------------------------------
def service_of(conn: HTTPConnection) -> Service:
    svc: Service = conn.app.state.service
    return svc


def generations_of(conn: HTTPConnection) -> Generations:
    gens: Generations = conn.app.state.generations
    return gens


def system_stats(request: Request) -> SystemStats:
    stats: SystemStats = request.app.state.system_stats
    return stats


def metrics_of(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def _policy(conn: HTTPConnection) -> AccessPolicy:
    policy: AccessPolicy = conn.app.state.access_policy
    return policy


# -- who is calling -------------------------------------------------------------------------------------------------
def _identify(conn: HTTPConnection, token: str | None) -> ClientIdentity | None:
    """The gate's verdict, or (without a gate in front) the same decision made here."""
    identity = conn.scope.get(IDENTITY_SCOPE_KEY)
    if isinstance(identity, ClientIdentity):
        return identity
    policy = _policy(conn)
    address, proxied = client_address(conn.scope, policy.settings.trusted_proxy_header)
    if policy.refuses_address(address, proxied):
        return None
    return policy.identify(address, token, proxied)


async def ensure_owner(svc: Service, identity: ClientIdentity, job_id: str) -> None:
    """404 (as for an unknown id) when the job exists but belongs to someone else."""
    job = await svc.scheduler.get(job_id)
    if job is not None and not owns(identity, job):
        raise UnknownRequest(job_id)


async def client_identity(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme)
) -> ClientIdentity:
    identity = _identify(request, credentials.credentials if credentials else None)
    if identity is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong API key: send Authorization: Bearer <API_KEY>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    for name in JOB_PARAMS:
        job_id = request.path_params.get(name)
        if isinstance(job_id, str):
            await ensure_owner(service_of(request), identity, job_id)
    return identity


async def websocket_identity(websocket: WebSocket) -> ClientIdentity | None:
    """The connection's identity; None after refusing it (accepted, then closed with 1008 so that a browser
    sees the code; closing before the accept shows every refusal as 1006)."""
    token = bearer(websocket.headers.get("authorization")) or websocket.query_params.get("api_key")
    identity = _identify(websocket, token)
    if identity is None:
        await websocket.accept()
        await websocket.send_json({"type": "error", "error": "missing or wrong API key", "code": 401})
        await websocket.close(code=1008, reason="missing or wrong API key")
    return identity


async def message_gate(conn: Connection, data: dict[str, Any]) -> None:
    """Every well-formed WebSocket message passes here before its handler: rate limit, then ownership. A refusal
    becomes an `error` frame; the connection stays open."""
    state = conn.websocket.app.state
    limiter: RateLimiter = state.rate_limiter
    identity: ClientIdentity = conn.identity
    if data.get("type") not in FREE_MESSAGES and identity.metered:
        wait = await limiter.hit(identity.key)
        if wait is not None:
            metrics: Metrics = state.metrics
            metrics.reject("rate_limited")
            raise Refusal(
                429,
                "rate_limited",
                f"rate limit of {limiter.per_minute} messages per minute exceeded; retry in {wait} s",
                wait,
            )
    job_id = data.get("request_id")
    if isinstance(job_id, str) and job_id:
        await ensure_owner(service_of(conn.websocket), identity, job_id)


async def refund_cache_hit(conn: HTTPConnection, identity: ClientIdentity, job: Job) -> None:
    """A request the result cache answered whole costs no rate-limit budget: give back what the gate charged."""
    if job.terminal and identity.metered and (job.result or {}).get("metadata", {}).get("cached") is True:
        limiter: RateLimiter = conn.app.state.rate_limiter
        await limiter.refund(identity.key)


# -- which model, and what the catalogue looks like to this client ---------------------------------------------------
async def model_for(svc: Service, model_id: str | None, who: ClientIdentity) -> str:
    """The model a request runs on (the one it names, else the client's current model, read from the store),
    checked for this client: 404 for an unknown model, 403 for one reserved for the administrator."""
    resolved = await svc.scheduler.resolve_model(model_id, who.key)
    return visibility.check_use(svc.registry, resolved, who, named=model_id is not None)


async def catalog_state(svc: Service, who: ClientIdentity) -> CatalogState:
    """The scheduler's and the residency's view of what is loaded, and the client's current model, for the
    catalogue's builders."""
    sched = svc.scheduler
    current, own = await sched.current_choice(who.key)
    return CatalogState(
        on_device=sched.loaded_groups(),
        cached_groups=svc.residency.cached_groups(),
        cached_models=svc.residency.cached_models(),
        loaded_models=frozenset(m for m in svc.registry.models if sched.is_loaded(m)),
        current=current,
        own=own,
        switching=sched.is_switching(),
    )


Identity = Annotated[ClientIdentity, Depends(client_identity)]
ServiceDep = Annotated[Service, Depends(service_of)]


async def _catalog(svc: ServiceDep, who: Identity) -> CatalogState:
    return await catalog_state(svc, who)


Catalog = Annotated[CatalogState, Depends(_catalog)]
GenerationsDep = Annotated[Generations, Depends(generations_of)]
StatsDep = Annotated[SystemStats, Depends(system_stats)]
MetricsDep = Annotated[Metrics, Depends(metrics_of)]
