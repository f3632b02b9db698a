"""`/mcp`: the tools of `talkative.mcp` over MCP's streamable HTTP transport, on the running server.

Why the tools call the server's own HTTP API instead of the service: a tool call must be exactly as allowed, as
limited and as owned as the same request over REST, and the one place that decides that is the middleware and
route stack (the gate's keys, hosts, origins and rate limits; the routes' validation, model visibility and job
ownership). So each tool call gets a `talkative.client.AsyncClient` whose transport is this application itself
(`httpx.ASGITransport`), carrying the caller's `Authorization`, `Host` and proxy headers and the caller's
address: its requests pass the same gate and routes as the caller's own would, act as the caller's identity
(jobs are owned by it, other callers' jobs are 404), and spend the caller's rate limit. The tools are written
once, over the client, and the same code serves `talkative mcp` over the network.

The `/mcp` request itself passes the gate first, like any route: a server with keys refuses it with 401 before
the MCP layer reads a byte. The transport is stateless with JSON answers: each POST is a whole exchange, so no
session outlives a request or can be reused under another key, any worker can answer, and nothing accumulates
in memory. The SDK's own DNS-rebinding check is off because the gate already checks hosts and origins for every
path (ALLOWED_HOSTS, ALLOWED_ORIGINS), with the server's settings rather than a loopback-only default.

A session manager can run once, so `McpEndpoint.running()` (entered by the app's lifespan) makes a new one each
time the app starts; before it runs and after it stops, `/mcp` answers 503.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ...client import AsyncClient
from ...mcp.tools import build_server
from ..auth.policy import PROXY_HEADERS

PATH = "/mcp"
#: POST only: a stateless transport has no session to DELETE and nothing to push on a standing GET stream (which
#: would stay open, holding a connection, for nothing), so both are answered 405 as the protocol allows
METHODS = ("POST",)
#: the base URL of in-process requests; never resolved, the transport is the app itself
INTERNAL_URL = "http://talkative.internal"
#: the caller's headers an in-process request carries: who it is (key, proxy), and the host it asked for
CALLER_HEADERS = ("authorization", "host", *PROXY_HEADERS)
#: seconds one in-process request may take: beyond the vector routes' own wait (300 s without REQUEST_TIMEOUT)
REQUEST_TIMEOUT = 330.0


class CallerClient(AsyncClient):
    """A client whose requests enter `app` in process, as the caller of one `/mcp` request."""

    def __init__(self, app: ASGIApp, caller: Request, timeout: float) -> None:
        # the caller's address as the gate saw it (None on a Unix socket), so the identity is the caller's
        self._transport = httpx.ASGITransport(
            app=app, raise_app_exceptions=False, client=cast(tuple[str, int], caller.scope.get("client"))
        )
        self._caller_headers = {k: v for k in CALLER_HEADERS if (v := caller.headers.get(k)) is not None}
        # api_key="": never the process' $TALKATIVE_API_KEY; the caller's own Authorization is all it sends
        super().__init__(INTERNAL_URL, api_key="", timeout=timeout, max_retries=0)

    def _http_client(self) -> httpx.AsyncClient:
        headers = {"Accept": "application/json", "User-Agent": "talkative-mcp", **self._caller_headers}
        return httpx.AsyncClient(
            transport=self._transport, base_url=self.base_url, headers=headers, timeout=self.timeout
        )


class CallerConnector:
    """For each tool call, a `CallerClient` for the HTTP request that carried the call."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    @asynccontextmanager
    async def __call__(self, ctx: Context) -> AsyncIterator[AsyncClient]:
        request = ctx.request_context.request
        if not isinstance(request, Request):
            raise ToolError("this tool runs only inside an HTTP request to /mcp")
        client = CallerClient(request.scope["app"], request, self.timeout)
        try:
            yield client
        finally:
            await client.aclose()


class McpEndpoint:
    """The ASGI endpoint at `/mcp`; `running()` is entered by the app's lifespan."""

    def __init__(self, server: MCPServer, *, max_body: int) -> None:
        self._server = server
        self._max_body = max_body
        self._manager: StreamableHTTPSessionManager | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        self._server.streamable_http_app(
            streamable_http_path=PATH,
            stateless_http=True,
            json_response=True,
            max_request_body_size=self._max_body,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        manager = self._server.session_manager
        async with manager.run():
            self._manager = manager
            try:
                yield
            finally:
                self._manager = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in METHODS:
            await _not_allowed(send)
            return
        if self._manager is None:
            await _unavailable(send)
            return
        await self._manager.handle_request(scope, receive, send)


def route(endpoint: McpEndpoint) -> Route:
    """`/mcp` as a route of the app: the gate protects what the app's routes match, and so protects it. It
    matches every method, and the endpoint refuses all but POST itself: a route limited to POST would only
    half-match a GET, which the web UI's catch-all files at `/` would then answer with a 404."""
    return Route(PATH, endpoint, include_in_schema=False)


def build_endpoint(*, max_body: int) -> McpEndpoint:
    """The `/mcp` endpoint over the tools, each call's client built for its caller."""
    return McpEndpoint(build_server(CallerConnector(REQUEST_TIMEOUT)), max_body=max_body)


async def _not_allowed(send: Send) -> None:
    raw = json.dumps({"detail": "/mcp takes POST only (a stateless MCP transport)"}).encode()
    headers = [(b"content-type", b"application/json"), (b"allow", ", ".join(METHODS).encode())]
    await send({"type": "http.response.start", "status": 405, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


async def _unavailable(send: Send) -> None:
    body: dict[str, Any] = {"detail": "the MCP endpoint is not running (the server is starting or stopping)"}
    raw = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"5")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": raw})
