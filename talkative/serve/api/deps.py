"""Who is calling: one place for client identity and authentication, for REST routes and WebSocket connections.

Every API route depends on `client_identity`, and the WebSocket endpoint calls `websocket_identity` before it
accepts. The identity's `key` is what jobs record as their owner; per-client quotas and rate limits hang off it.
With `API_KEY` set, a request must carry `Authorization: Bearer <API_KEY>` (a WebSocket may instead pass
`?api_key=`, since browsers cannot set headers on WebSockets); the key is compared in constant time and never
logged.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import HTTPException, Request, WebSocket, status

from ..service import Service


@dataclass(frozen=True)
class ClientIdentity:
    key: str  # stable name of the client: "key" when it authenticated with the API key, else "ip:<address>"
    address: str | None
    authenticated: bool
    # may reset the server and use backend_only models: the holder of the API key, or anyone when none is set
    is_admin: bool = False


def service_of(conn: Request | WebSocket) -> Service:
    svc: Service = conn.app.state.service
    return svc


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _identify(conn: Request | WebSocket, token: str | None) -> ClientIdentity | None:
    """None when a key is required and `token` does not match it."""
    address = conn.client.host if conn.client else None
    expected = service_of(conn).settings.api_key
    if expected is None:
        return ClientIdentity(key=f"ip:{address}", address=address, authenticated=False, is_admin=True)
    if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
        return None
    return ClientIdentity(key="key", address=address, authenticated=True, is_admin=True)


async def client_identity(request: Request) -> ClientIdentity:
    identity = _identify(request, _bearer(request.headers.get("authorization")))
    if identity is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong API key: send Authorization: Bearer <API_KEY>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return identity


async def websocket_identity(websocket: WebSocket) -> ClientIdentity | None:
    token = _bearer(websocket.headers.get("authorization")) or websocket.query_params.get("api_key")
    return _identify(websocket, token)
