"""`AsyncClient`: the Talkative API from asyncio code; the same methods as `Client`, awaited."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from . import _wire as W
from .sync import DEFAULT_URL
from .types import (
    Accepted,
    Analysis,
    APIError,
    Extraction,
    Generation,
    JobStatus,
    ModelListing,
    Progress,
    SwitchResult,
    TokenEvent,
    VectorResults,
)


class AsyncGenerationStream:
    """`async for token in stream`; `await stream.result()` for the finished generation; `await stream.cancel()`."""

    def __init__(self, client: AsyncClient, response: httpx.Response) -> None:
        self._client = client
        self._response = response
        self._frames = W.GenerationFrames()
        self._lines = response.aiter_lines()
        self._pending: list[TokenEvent] = []
        self._closed = False

    @property
    def request_id(self) -> str | None:
        return self._frames.request_id

    async def _next_line(self) -> str | None:
        if self._closed or self._frames.done:
            return None
        try:
            return await self._lines.__anext__()
        except StopAsyncIteration:
            return None

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        try:
            while self._pending:
                yield self._pending.pop(0)
            while (line := await self._next_line()) is not None:
                event = self._frames.read(line)
                if event is not None:
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
        if self._frames.result is None:
            raise APIError(502, "the stream ended without its generation_complete message")
        return self._frames.result

    async def cancel(self) -> None:
        while self.request_id is None and (line := await self._next_line()) is not None:
            event = self._frames.read(line)
            if event is not None:
                self._pending.append(event)
        if self.request_id is not None:
            await self._client.cancel(self.request_id)

    async def aclose(self) -> None:
        self._closed = True
        await self._response.aclose()


class AsyncClient:
    """A Talkative server, from asyncio. Same behaviour as `Client` (API key, retries on 429/503)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        max_retry_wait: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = W.api_key_of(api_key)
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=W.headers(self.api_key), timeout=timeout
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- transport ----------------------------------------------------------------------------------------------
    async def _send(
        self, method: str, path: str, *, json_body: Any = None, stream: bool = False
    ) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                request = self._http.build_request(method, path, json=json_body)
                response = await self._http.send(request, stream=stream)
            except httpx.ConnectError:
                if attempt == self.max_retries:
                    raise
                await asyncio.sleep(W.backoff(attempt, None, self.max_retry_wait))
                continue
            if response.status_code < 400:
                return response
            if stream:
                await response.aread()
                await response.aclose()
            hint = W.retry_after(response.headers.get("retry-after"))
            if response.status_code in W.RETRY_STATUSES and attempt < self.max_retries:
                await asyncio.sleep(W.backoff(attempt, hint, self.max_retry_wait))
                continue
            try:
                body: Any = response.json()
            except ValueError:
                body = response.text
            raise W.error_of(response.status_code, body, hint)
        raise AssertionError("unreachable")

    async def _json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = (await self._send(method, path, json_body=body)).json()
        return out

    def _ws(self) -> Any:
        extra = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        return connect(
            W.ws_url(self.base_url), additional_headers=extra, open_timeout=self.timeout, max_size=None
        )

    # -- service ------------------------------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        return await self._json("GET", "/health")

    async def models(self) -> ModelListing:
        return ModelListing.of(await self._json("GET", "/api/v2/models"))

    async def switch(self, model_id: str) -> SwitchResult:
        return SwitchResult.of(await self._json("POST", "/api/v2/models/switch", {"model_id": model_id}))

    async def status(self, request_id: str) -> JobStatus:
        return JobStatus.of(await self._json("GET", f"/status/{request_id}"))

    async def cancel(self, request_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/cancel/{request_id}")

    async def wait(self, request_id: str, timeout: float | None = None, poll: float = 0.2) -> JobStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll
        while True:
            status = await self.status(request_id)
            if status.terminal or (deadline is not None and time.monotonic() >= deadline):
                return status
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    # -- analysis -----------------------------------------------------------------------------------------------
    async def submit_analysis(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
        client_request_id: str | None = None,
    ) -> Accepted:
        body = W.analyze_body(text, messages, options, model_id, client_request_id)
        return Accepted.of(await self._json("POST", "/analyze", body))

    async def analyze(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
        *,
        on_progress: Callable[[Progress], Any] | None = None,
        timeout: float | None = None,
    ) -> Analysis:
        """As `Client.analyze`; `on_progress` may be a plain function or a coroutine function."""
        if on_progress is None:
            accepted = await self.submit_analysis(text, messages, options, model_id)
            return W.analysis_of(await self.wait(accepted.request_id, timeout))
        async for event in self.iter_analyze(text, messages, options, model_id, timeout=timeout):
            if isinstance(event, Analysis):
                return event
            outcome = on_progress(event)
            if asyncio.iscoroutine(outcome):
                await outcome
        raise APIError(502, "the connection ended before the analysis did")

    async def iter_analyze(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[Progress | Analysis]:
        frames = W.AnalysisFrames(f"client-{uuid.uuid4()}")
        body = {"type": "analyze", **W.analyze_body(text, messages, options, model_id, frames.crid)}
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        ws: ClientConnection
        async with self._ws() as ws:
            await ws.send(json.dumps(body))
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), left))
                except TimeoutError:
                    raise TimeoutError(
                        f"no result within {timeout} s (request {frames.request_id})"
                    ) from None
                if not frames.mine(msg):
                    continue
                event = frames.read(msg)
                if isinstance(event, APIError):
                    if event.status in W.RETRY_STATUSES and attempt < self.max_retries:
                        await asyncio.sleep(W.backoff(attempt, event.retry_after, self.max_retry_wait))
                        attempt += 1
                        await ws.send(json.dumps(body))
                        continue
                    raise event
                yield event
                if isinstance(event, Analysis):
                    return

    # -- generation ---------------------------------------------------------------------------------------------
    async def generate(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        num_completions: int | None = None,
        stop_at_end_of_turn: bool | None = None,
        model_id: str | None = None,
    ) -> AsyncGenerationStream:
        options = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "num_completions": num_completions,
            "stop_at_end_of_turn": stop_at_end_of_turn,
        }
        body = W.generate_body(text, messages, model_id, options)
        response = await self._send("POST", "/generate?stream=true", json_body=body, stream=True)
        return AsyncGenerationStream(self, response)

    # -- vectors ------------------------------------------------------------------------------------------------
    async def describe(
        self,
        vectors: Any,
        tokens: Sequence[str | int | None] | None = None,
        *,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
    ) -> VectorResults:
        body: dict[str, Any] = {"vectors": W.pack_vectors(vectors), "encoding": "base64"}
        if tokens is not None:
            body["tokens"] = list(tokens)
        if options:
            body["options"] = options
        if model_id:
            body["model_id"] = model_id
        return W.vector_results(await self._json("POST", "/api/v1/describe", body))

    async def score(
        self,
        explanation: str | Sequence[str],
        vector: Any,
        *,
        token: str | int | None = None,
        salience: bool = False,
        model_id: str | None = None,
    ) -> VectorResults:
        body: dict[str, Any] = {"vector": W.pack_vectors(vector), "calculate_token_salience": salience}
        body["explanation" if isinstance(explanation, str) else "explanations"] = (
            explanation if isinstance(explanation, str) else list(explanation)
        )
        if token is not None:
            body["token"] = token
        if model_id:
            body["model_id"] = model_id
        return W.vector_results(await self._json("POST", "/api/v1/score", body))

    async def extract(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        *,
        positions: Sequence[int] | None = None,
        model_id: str | None = None,
    ) -> Extraction:
        body = {**W.analyze_body(text, messages, None, model_id), "encoding": "base64"}
        if positions is not None:
            body["positions"] = list(positions)
        return W.extraction_of(await self._json("POST", "/api/v1/extract", body))

    async def tokenize(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        *,
        model_id: str | None = None,
    ) -> dict[str, Any]:
        return await self._json("POST", "/api/v1/tokenize", W.analyze_body(text, messages, None, model_id))
