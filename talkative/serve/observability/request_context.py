"""The outermost middleware: a request id for every request (and its logs), HTTP metrics, one access log line.

The id is the client's `X-Request-ID` when it is a sane token (so a caller can follow its request through the
logs), else a new one; it is returned on every response. HTTP metrics are labelled by route template, never by
the raw path, so ids in paths cannot blow up the number of series. Probes and scrapes that succeed are logged at
debug level: they come every few seconds.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..auth.policy import scope_header
from .logs import REQUEST_ID
from .metrics import Metrics

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: probes and scrapes, logged at debug level when they succeed (they come every few seconds)
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})
access_log = logging.getLogger("talkative.access")


class RequestContext:
    """Outermost middleware: a request id for every request (and its logs), HTTP metrics, one access log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = scope_header(scope, REQUEST_ID_HEADER)
        rid = incoming if incoming and _SANE_ID.match(incoming) else uuid.uuid4().hex
        token = REQUEST_ID.set(rid)
        status: int | None = None
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = 500
            raise
        finally:
            seconds = time.perf_counter() - t0
            client = scope.get("client")
            address = client[0] if client else None
            if scope["type"] == "http":
                self._observe(scope, status or 500, seconds)
                access_log.log(
                    logging.DEBUG if scope["path"] in QUIET_PATHS and (status or 500) < 400 else logging.INFO,
                    '%s "%s %s" %s %.1f ms',
                    address,
                    scope["method"],
                    scope["path"],
                    status or 500,
                    seconds * 1000,
                    extra={
                        "client": address,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status or 500,
                        "duration_ms": round(seconds * 1000, 1),
                    },
                )
            else:
                access_log.info(
                    '%s "WebSocket %s" closed after %.1f s',
                    address,
                    scope["path"],
                    seconds,
                    extra={"client": address, "path": scope["path"], "duration_s": round(seconds, 1)},
                )
            REQUEST_ID.reset(token)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        label = getattr(route, "path", None)
        if label == "" or (route is not None and type(route).__name__ == "Mount"):
            label = "static"
        label = label or "-"
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        self.metrics.http_requests.labels(method, label, str(status)).inc()
        self.metrics.http_seconds.labels(label).observe(seconds)
        if status == 400 and label != "-":
            self.metrics.reject("invalid")
