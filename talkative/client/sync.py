"""`Client`: the Talkative API from blocking Python code (REST over httpx, progress over the WebSocket).

Its methods are the plans of `_operations`; this module only carries their I/O out, blocking.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any, TypeVar

import httpx
from websockets.sync.client import connect

from . import _wire as W
from ._operations import DEFAULT_URL, Operations
from ._plan import Connect, Effect, Emit, Events, Notify, Plan, Receive, Request, Send, Sleep, Steps
from .types import Generation, TokenEvent

__all__ = ["DEFAULT_URL", "Client", "GenerationStream"]

T = TypeVar("T")
E = TypeVar("E")


class GenerationStream(W.StreamedGeneration["Client"]):
    """The tokens of a generation as they are produced (Server-Sent Events); `result` is the finished
    generation (reading it waits for the end), `cancel()` stops it at the next token."""

    def __init__(self, client: Client, response: httpx.Response) -> None:
        super().__init__(client, response)
        self._lines = response.iter_lines()

    def _next_line(self) -> str | None:
        return None if self._frames.ended else next(self._lines, None)

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            while self._frames.pending:
                yield self._frames.pending.pop(0)
            while (line := self._next_line()) is not None:
                event = self._frames.read(line)
                if event is not None:
                    yield event
        finally:
            self.close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def result(self) -> Generation:
        for _ in self:
            pass
        return self._frames.generation()

    def cancel(self) -> None:
        """Cancel the generation; the stream then ends with `JobFailed` (status cancelled) when read on."""
        while self.request_id is None and (line := self._next_line()) is not None:
            self._frames.read_ahead(line)  # the first event (queued) names the request
        if self.request_id is not None:
            self._client.cancel(self.request_id)

    def close(self) -> None:
        self._frames.closed = True
        self._response.close()


class Client(Operations):
    """A Talkative server, from blocking code. The API key comes from `api_key`, else `$TALKATIVE_API_KEY`.
    Requests refused for room or rate (429, 503) are retried up to `max_retries` times, after the server's
    `Retry-After`."""

    _http: httpx.Client

    def _http_client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=W.headers(self.api_key), timeout=self.timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- the driver: carries a plan's effects out, blocking --------------------------------------------------------
    def _run(self, plan: Plan[T]) -> T:
        steps = Steps(plan)
        for _ in self._walk(steps):
            pass  # a plan with one answer emits nothing
        return steps.value

    def _iterate(self, plan: Events[E]) -> Iterator[E]:
        return self._walk(Steps(plan))

    def _open_stream(self, plan: Plan[httpx.Response]) -> GenerationStream:
        return GenerationStream(self, self._run(plan))

    def _walk(self, steps: Steps[Any]) -> Iterator[Any]:
        """Carry out the plan's effects in turn, handing out what it emits; its WebSocket closes with it."""
        with ExitStack() as scope:
            scope.callback(steps.close)
            while (effect := steps.next()) is not None:
                if isinstance(effect, Emit):
                    yield effect.event
                    continue
                try:
                    steps.answer(self._do(effect, scope))
                except Exception as error:  # the plan sees it where it asked for the effect
                    steps.fail(error)

    def _do(self, effect: Effect, scope: ExitStack) -> Any:
        match effect:
            case Request(method, path, body, stream, content, content_type):
                response = self._http.send(
                    W.build(self._http, method, path, body, content, content_type), stream=stream
                )
                if stream and response.is_error:
                    response.read()
                    response.close()
                return response
            case Sleep(seconds):
                time.sleep(seconds)
            case Connect(url, headers, timeout):
                opened = connect(url, additional_headers=headers, open_timeout=timeout, max_size=None)
                return scope.enter_context(opened)
            case Send(socket, text):
                socket.send(text)
            case Receive(socket, timeout):
                return socket.recv(timeout=timeout)
            case Notify(callback, value):
                callback(value)
        return None
