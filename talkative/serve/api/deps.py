"""Who is calling, and may they: the dependencies of every API route and the gate of every WebSocket message.

The guard middleware (`serve/guard.py`) has already authenticated the request, checked its origin and host and
charged its rate limit before any route runs, and left the caller's `ClientIdentity` in the scope; these
functions hand it to the routes. What only a route can know is checked here:

* **Ownership.** A route with a `{request_id}` (or `{job_id}`) path parameter serves only the caller's own job:
  another caller gets the same 404 as for an id that does not exist, so ids cannot be probed. WebSocket
  messages naming a `request_id` (`subscribe`, `status`, `cancel_request`, and any type added later) pass the same
  check in `message_gate`.
* **WebSocket messages** are rate limited like REST requests (`ping` is free) in `message_gate`, which the
  protocol handler calls for every well-formed message before its handler.

Jobs record `identity.key` as their owner; `identity.is_admin` marks the admin (the key named `admin`, or the
local user of a server without keys). Without the guard in front (an app assembled by hand), the dependencies
authenticate by themselves, so a route is never open by accident.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request, Security, WebSocket, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..auth.policy import IDENTITY_SCOPE_KEY, AccessPolicy, ClientIdentity, bearer, client_address, owns
from ..service import Service
from .ws.hub import Connection

__all__ = [
    "ClientIdentity",
    "MessageRefused",
    "client_identity",
    "ensure_owner",
    "message_gate",
    "service_of",
    "websocket_identity",
]

#: path parameters that name a job, checked for ownership on every route that has one
JOB_PARAMS = ("request_id", "job_id")
#: WebSocket message types that cost nothing against the rate limit
FREE_MESSAGES = frozenset({"ping"})
#: documents the Bearer scheme in the OpenAPI description (the guard does the checking)
bearer_scheme = HTTPBearer(auto_error=False, description="An API key, when the server has them (API_KEY(S)).")


class MessageRefused(Exception):
    """A WebSocket message the gate refuses; becomes an `error` frame (the connection stays open)."""

    def __init__(self, message: str, code: int, kind: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.kind = kind
        self.retry_after = retry_after

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out


def service_of(conn: Request | WebSocket) -> Service:
    svc: Service = conn.app.state.service
    return svc


def _policy(conn: Request | WebSocket) -> AccessPolicy:
    policy = getattr(conn.app.state, "access_policy", None)
    if policy is None:
        policy = AccessPolicy(service_of(conn).settings)
        conn.app.state.access_policy = policy
    return policy


def _identify(conn: Request | WebSocket, token: str | None) -> ClientIdentity | None:
    """The guard's verdict, or (without a guard in front) the same decision made here."""
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
        raise KeyError(job_id)


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
            try:
                await ensure_owner(service_of(request), identity, job_id)
            except KeyError:
                raise HTTPException(404, f"unknown request_id {job_id!r}") from None
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
    """Every well-formed WebSocket message passes here before its handler: rate limit, then ownership."""
    websocket = conn.websocket
    identity: ClientIdentity = conn.identity
    limiter = getattr(websocket.app.state, "rate_limiter", None)
    metrics = getattr(websocket.app.state, "metrics", None)
    if data.get("type") not in FREE_MESSAGES and identity.metered and limiter is not None:
        wait = limiter.hit(identity.key)
        if wait is not None:
            if metrics is not None:
                metrics.reject("rate_limited")
            raise MessageRefused(
                f"rate limit of {limiter.per_minute} messages per minute exceeded; retry in {wait} s",
                429,
                "rate_limited",
                wait,
            )
    job_id = data.get("request_id")
    if isinstance(job_id, str) and job_id:
        await ensure_owner(service_of(websocket), identity, job_id)
