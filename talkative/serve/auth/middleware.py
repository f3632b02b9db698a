"""The gate every HTTP request and WebSocket handshake passes before any route runs.

Protection by construction: this middleware does not list the API's routes, it asks the app's router. A path
that a route (or a mounted app other than the static web UI) matches is *protected*, unless it is one of the few
public paths (`GET /`, `/health`, `/ready`, the OpenAPI description); a path no route matches goes to the static
web UI and is public, so the browser can load the page that asks for a key. A route added tomorrow is protected
the day it is added. In order, a protected request is refused:

1. with 400 when the `Host` header is not allowed (`ENABLE_TRUSTED_HOST`), for every path;
2. with 403 when no key is configured, `ALLOW_UNAUTHENTICATED` is off and the client is not on loopback (every
   path: a local server shows nothing to the network);
3. with 403 when a browser page of a foreign origin sends it (`ALLOWED_ORIGINS`, plus the server's own origin);
4. with 503 while the server drains for shutdown;
5. with 401 without a valid key (repeated failures from one address are throttled like requests);
6. with 429 beyond `RATE_LIMIT_PER_MINUTE` for its key (or address);
7. with 413 when its body grows beyond `MAX_REQUEST_BYTES` (counted as it streams in, not from Content-Length).

A WebSocket handshake is refused the same way, by accepting it and closing at once with 1008 (policy) or 1013
(try later) after an `error` frame: a browser sees the code only after an accept (before it, every refusal looks
like 1006). Every 429 or 503 leaving the app carries `Retry-After`. Refusals are counted by reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .policy import (
    IDENTITY_SCOPE_KEY,
    AccessPolicy,
    ClientIdentity,
    bearer,
    client_address,
    host_allowed,
    origin_allowed,
    scope_header,
)
from .ratelimit import RateLimiter

if TYPE_CHECKING:
    from ..observability.metrics import Metrics
    from ..service import Service

PUBLIC_PATHS = frozenset(
    {"/", "/health", "/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
PUBLIC_METHODS = frozenset({"GET", "HEAD"})
#: the share page is the web UI's shell (no data: the UI fetches the share with the reader's key), always public;
#: the share itself only when PUBLIC_SHARES
SHARE_PAGE = re.compile(r"^/s/[^/]+$")
SHARE_API = re.compile(r"^/api/v1/shares/[^/]+$")
WS_POLICY, WS_TRY_LATER = 1008, 1013
DEFAULT_RETRY_AFTER = 5


class Refusal(Exception):
    """A request or message refused before its handler: `reason` names why (for metrics and clients),
    `retry_after` says when to come back. `serve/errors.py` answers it like a domain refusal."""

    def __init__(self, status: int, reason: str, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            out.append((b"retry-after", str(self.retry_after).encode()))
        if self.status == 401:
            out.append((b"www-authenticate", b"Bearer"))
        return out

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detail": self.detail, "kind": self.reason}
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        policy: AccessPolicy,
        limiter: RateLimiter,
        metrics: Metrics,
        max_body: int,
        body_limits: Mapping[str, tuple[int, str]] | None = None,
    ) -> None:
        self.app = app
        self.policy = policy
        self.limiter = limiter
        self.metrics = metrics
        self.max_body = max_body
        #: path -> (bytes, setting name): routes whose bodies are uploads (a batch's items) have their own limit
        self.body_limits = dict(body_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # -- decisions ------------------------------------------------------------------------------------------------
    async def _check(self, scope: Scope, *, protected: bool) -> ClientIdentity | None:
        """The caller's identity for a protected path (None for a public one); raises Refusal."""
        policy = self.policy
        host = scope_header(scope, "host")
        if policy.check_hosts and not host_allowed(host, policy.allowed_hosts):
            raise Refusal(400, "bad_host", f"host {host!r} is not served here (ALLOWED_HOSTS)")
        address, proxied = client_address(scope, policy.settings.trusted_proxy_header)
        if policy.refuses_address(address, proxied):
            raise Refusal(
                403,
                "not_local",
                "this server has no API key and serves only its own machine (set API_KEY, or ALLOW_UNAUTHENTICATED)",
            )
        if not protected:
            return None
        origin = scope_header(scope, "origin")
        if not origin_allowed(origin, policy.origins, host):
            raise Refusal(403, "bad_origin", f"origin {origin!r} is not allowed (ALLOWED_ORIGINS)")
        svc = _service(scope)
        if svc is not None and svc.scheduler.draining:
            raise Refusal(503, "draining", "the server is shutting down; retry shortly", DEFAULT_RETRY_AFTER)
        token = bearer(scope_header(scope, "authorization"))
        if token is None and scope["type"] == "websocket":
            token = _query_param(scope, "api_key")
        identity = policy.identify(address, token, proxied)
        if identity is None:
            wait = await self.limiter.hit(f"auth-failures:{address}")
            if wait is not None:
                raise Refusal(429, "rate_limited", "too many requests with a wrong API key; slow down", wait)
            raise Refusal(
                401, "unauthorized", "missing or wrong API key: send Authorization: Bearer <API_KEY>"
            )
        if identity.metered:
            wait = await self.limiter.hit(identity.key)
            if wait is not None:
                raise Refusal(
                    429,
                    "rate_limited",
                    f"rate limit of {self.limiter.per_minute} requests per minute exceeded; retry in {wait} s",
                    wait,
                )
        return identity

    def _protected(self, scope: Scope) -> bool:
        """Public: the public paths (GET/HEAD) and what no route but the static web UI serves."""
        if scope["type"] == "http" and scope["method"] in PUBLIC_METHODS and scope["path"] in PUBLIC_PATHS:
            return False
        if (
            scope["type"] == "http"
            and scope["method"] in PUBLIC_METHODS
            and self._public_share(scope["path"])
        ):
            return False
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            return False  # CORS preflights are answered by the CORS middleware, outside this gate
        for route in scope["app"].routes:
            if isinstance(route, Mount) and isinstance(route.app, StaticFiles):
                continue
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return True
        return False

    def _public_share(self, path: str) -> bool:
        return bool(SHARE_PAGE.match(path)) or (
            self.policy.settings.public_shares and bool(SHARE_API.match(path))
        )

    # -- HTTP -----------------------------------------------------------------------------------------------------
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        protected = self._protected(scope)
        try:
            identity = await self._check(scope, protected=protected)
        except Refusal as refusal:
            await self._refuse_http(refusal, send)
            return
        if not protected:
            await self.app(scope, receive, send)
            return
        scope[IDENTITY_SCOPE_KEY] = identity
        try:
            receive = await self._buffered(scope, receive)
        except Refusal as refusal:
            await self._refuse_http(refusal, send)
            return
        await self.app(scope, receive, self._with_retry_after(scope, send))

    async def _refuse_http(self, refusal: Refusal, send: Send) -> None:
        self.metrics.reject(refusal.reason)
        body = json.dumps(refusal.body()).encode()
        headers = [*refusal.headers(), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _buffered(self, scope: Scope, receive: Receive) -> Receive:
        """Read the whole body first, counting the bytes as they stream in; replay it to the app."""
        declared = scope_header(scope, "content-length")
        limit, setting = self.body_limits.get(scope["path"], (self.max_body, "MAX_REQUEST_BYTES"))
        too_large = Refusal(413, "too_large", f"the request body is larger than {setting} ({limit} bytes)")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([message], receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)

    def _with_retry_after(self, scope: Scope, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in (429, 503):
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", str(_retry_after(_service(scope))).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        return wrapped

    # -- WebSocket ------------------------------------------------------------------------------------------------
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        protected = self._protected(scope)
        try:
            identity = await self._check(scope, protected=protected)
        except Refusal as refusal:
            await self._refuse_websocket(refusal, receive, send)
            return
        if protected:
            scope[IDENTITY_SCOPE_KEY] = identity
        await self.app(scope, receive, send)

    async def _refuse_websocket(self, refusal: Refusal, receive: Receive, send: Send) -> None:
        self.metrics.reject(refusal.reason)
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        frame = {"type": "error", "error": refusal.detail, "code": refusal.status, "kind": refusal.reason}
        if refusal.retry_after is not None:
            frame["retry_after"] = refusal.retry_after
        await send({"type": "websocket.send", "text": json.dumps(frame)})
        code = WS_TRY_LATER if refusal.status in (429, 503) else WS_POLICY
        await send({"type": "websocket.close", "code": code, "reason": _close_reason(refusal.detail)})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def _query_param(scope: Scope, name: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[0] if values else None


def _service(scope: Scope) -> Service | None:
    """The app's service; None before the lifespan has built it (and in an app without one)."""
    service: Service | None = getattr(scope["app"].state, "service", None)
    return service


def _retry_after(svc: Service | None) -> int:
    if svc is None:
        return DEFAULT_RETRY_AFTER
    return int(svc.scheduler.retry_after())


def _close_reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8."""
    raw = text.encode()[:120]
    return raw.decode("utf-8", errors="ignore")
