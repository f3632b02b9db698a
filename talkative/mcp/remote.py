"""`talkative mcp`: the tools over stdio, for a desktop agent, calling a running Talkative server.

Why a client of a server rather than the engine in the agent's process: the server already holds the models
(loading SmolLM2 and an NLA takes longer than an agent waits for a tool list), schedules them across callers and
applies the keys, limits and ownership of whoever runs it; a stdio process per agent would load its own copy and
bypass all of that. So the process is thin: one `AsyncClient` to `--server` with the caller's key, shared by the
calls, and the same tools as `/mcp`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mcp.server.mcpserver import Context

from ..client import AsyncClient
from .tools import build_server

#: seconds one request may take: beyond the vector routes' own wait (300 s without REQUEST_TIMEOUT)
REQUEST_TIMEOUT = 330.0


class SharedClient:
    """Every tool call uses the process' one client (the caller is whoever started the process)."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    @asynccontextmanager
    async def __call__(self, ctx: Context) -> AsyncIterator[AsyncClient]:
        yield self.client


async def serve_stdio(url: str, api_key: str | None, timeout: float = REQUEST_TIMEOUT) -> None:
    """Answer MCP over stdin/stdout until the agent closes them. Refusals for room or rate are retried briefly
    (twice, at most 10 s apart), then reported to the agent with the server's reason."""
    async with AsyncClient(url, api_key, timeout=timeout, max_retries=2, max_retry_wait=10.0) as client:
        await build_server(SharedClient(client)).run_stdio_async()
