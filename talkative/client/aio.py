"""`AsyncClient`: the Talkative API from asyncio code; the same methods as `Client`, awaited.

Its methods are the plans of `_operations`; this module only carries their I/O out, awaiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import httpx
from websockets.asyncio.client import connect

from . import _wire as W
from ._operations import Operations
from ._plan import Connect, Effect, Emit, Events, Notify, Plan, Receive, Request, Send, Sleep, Steps
from .types import Generation, TokenEvent

__all__ = ["AsyncClient", "AsyncGenerationStream"]

T = TypeVar("T")
E = TypeVar("E")


class AsyncGenerationStream(W.StreamedGeneration["AsyncClient"]):
    """`async for token in stream`; `await stream.result()` for the finished generation; `await stream.cancel()`."""

    def __init__(self, client: AsyncClient, response: httpx.Response) -> None:
        super().__init__(client, response)
        self._lines = response.aiter_lines()

    async def _next_line(self) -> str | None:
        return None if self._frames.ended else await anext(self._lines, None)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        try:
            while self._frames.pending:
                yield self._frames.pending.pop(0)
            while (line := await self._next_line()) is not None:
                if (event := self._frames.read(line)) is not None:
                    yield event
        finally:
            await self.aclose()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def result(self) -> Generation:
        async for _ in self:
            pass
        return self._frames.generation()

    async def cancel(self) -> None:
        """Cancel the generation; the stream then ends with `JobFailed` (status cancelled) when read on."""
        while self.request_id is None and (line := await self._next_line()) is not None:
            self._frames.read_ahead(line)  # the first event (queued) names the request
        if self.request_id is not None:
            await self._client.cancel(self.request_id)

    async def aclose(self) -> None:
        self._frames.closed = True
        await self._response.aclose()


class AsyncClient(Operations):
    """A Talkative server, from asyncio. Same behaviour as `Client` (API key, retries on 429/503)."""

    _http: httpx.AsyncClient

    def _http_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url, headers=W.headers(self.api_key), timeout=self.timeout
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the driver: carries a plan's effects out, awaiting ------------------------------------------------------
    async def _run(self, plan: Plan[T]) -> T:
        steps = Steps(plan)
        async for _ in self._walk(steps):
            pass  # a plan with one answer emits nothing
        return steps.value

    def _iterate(self, plan: Events[E]) -> AsyncIterator[E]:
        return self._walk(Steps(plan))

    async def _open_stream(self, plan: Plan[httpx.Response]) -> AsyncGenerationStream:
        return AsyncGenerationStream(self, await self._run(plan))

    async def _walk(self, steps: Steps[Any]) -> AsyncIterator[Any]:
        """Carry out the plan's effects in turn, handing out what it emits; its WebSocket closes with it."""
        async with AsyncExitStack() as scope:
            scope.callback(steps.close)
            while (effect := steps.next()) is not None:
                if isinstance(effect, Emit):
                    yield effect.event
                else:
                    try:
                        steps.answer(await self._do(effect, scope))
                    except Exception as error:  # the plan sees it where it asked for the effect
                        steps.fail(error)

    async def _do(self, effect: Effect, scope: AsyncExitStack) -> Any:
        match effect:
            case Request(method, path, body, stream, content, content_type):
                request = W.build(self._http, method, path, body, content, content_type)
                response = await self._http.send(request, stream=stream)
                if stream and response.is_error:
                    await response.aread()
                    await response.aclose()
                return response
            case Sleep(seconds):
                await asyncio.sleep(seconds)
            case Connect(url, headers, timeout):
                opened = connect(url, additional_headers=headers, open_timeout=timeout, max_size=None)
                return await scope.enter_async_context(opened)
            case Send(socket, text):
                await socket.send(text)
            case Receive(socket, timeout):
                return await asyncio.wait_for(socket.recv(), timeout)
            case Notify(callback, value):
                outcome = callback(value)
                if asyncio.iscoroutine(outcome):
                    await outcome
        return None
