"""`Client`: the Talkative API from blocking Python code (REST over httpx, progress over the WebSocket)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from . import _wire as W
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

DEFAULT_URL = "http://127.0.0.1:8000"


class GenerationStream:
    """The tokens of a generation as they are produced (Server-Sent Events); `result` is the finished
    generation (reading it waits for the end), `cancel()` stops it at the next token."""

    def __init__(self, client: Client, response: httpx.Response) -> None:
        self._client = client
        self._response = response
        self._frames = W.GenerationFrames()
        self._lines = response.iter_lines()
        self._pending: list[TokenEvent] = []  # read ahead by cancel(), not yet handed out
        self._closed = False

    @property
    def request_id(self) -> str | None:
        return self._frames.request_id

    def _next_line(self) -> str | None:
        if self._closed or self._frames.done:
            return None
        return next(self._lines, None)

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            while self._pending:
                yield self._pending.pop(0)
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
        if self._frames.result is None:
            raise APIError(502, "the stream ended without its generation_complete message")
        return self._frames.result

    def cancel(self) -> None:
        """Cancel the generation; the stream then ends with `JobFailed` (status cancelled) when read on."""
        while self.request_id is None and (line := self._next_line()) is not None:
            event = self._frames.read(line)  # the first event (queued) names the request
            if event is not None:
                self._pending.append(event)
        if self.request_id is not None:
            self._client.cancel(self.request_id)

    def close(self) -> None:
        self._closed = True
        self._response.close()


class Client:
    """A Talkative server. The API key comes from `api_key`, else `$TALKATIVE_API_KEY`. Requests refused for
    room or rate (429, 503) are retried up to `max_retries` times, after the server's `Retry-After`."""

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
        self._http = httpx.Client(base_url=self.base_url, headers=W.headers(self.api_key), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport ----------------------------------------------------------------------------------------------
    def _send(self, method: str, path: str, *, json_body: Any = None, stream: bool = False) -> httpx.Response:
        """One request, retried on 429/503 (after Retry-After) and on connections that could not be opened."""
        for attempt in range(self.max_retries + 1):
            try:
                request = self._http.build_request(method, path, json=json_body)
                response = self._http.send(request, stream=stream)
            except httpx.ConnectError:
                if attempt == self.max_retries:
                    raise
                time.sleep(W.backoff(attempt, None, self.max_retry_wait))
                continue
            if response.status_code < 400:
                return response
            if stream:
                response.read()
                response.close()
            hint = W.retry_after(response.headers.get("retry-after"))
            if response.status_code in W.RETRY_STATUSES and attempt < self.max_retries:
                time.sleep(W.backoff(attempt, hint, self.max_retry_wait))
                continue
            try:
                body: Any = response.json()
            except ValueError:
                body = response.text
            raise W.error_of(response.status_code, body, hint)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = self._send(method, path, json_body=body).json()
        return out

    def _ws(self) -> ClientConnection:
        extra = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        return connect(
            W.ws_url(self.base_url), additional_headers=extra, open_timeout=self.timeout, max_size=None
        )

    # -- service ------------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def models(self) -> ModelListing:
        return ModelListing.of(self._json("GET", "/api/v2/models"))

    def switch(self, model_id: str) -> SwitchResult:
        """Make `model_id` the current model (for requests that name none); waits for a group to load."""
        return SwitchResult.of(self._json("POST", "/api/v2/models/switch", {"model_id": model_id}))

    def status(self, request_id: str) -> JobStatus:
        return JobStatus.of(self._json("GET", f"/status/{request_id}"))

    def cancel(self, request_id: str) -> dict[str, Any]:
        return self._json("POST", f"/cancel/{request_id}")

    def wait(self, request_id: str, timeout: float | None = None, poll: float = 0.2) -> JobStatus:
        """Poll until the request is finished (or `timeout` passes: then its current status)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll
        while True:
            status = self.status(request_id)
            if status.terminal or (deadline is not None and time.monotonic() >= deadline):
                return status
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    # -- analysis -----------------------------------------------------------------------------------------------
    def submit_analysis(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
        client_request_id: str | None = None,
    ) -> Accepted:
        body = W.analyze_body(text, messages, options, model_id, client_request_id)
        return Accepted.of(self._json("POST", "/analyze", body))

    def analyze(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        timeout: float | None = None,
    ) -> Analysis:
        """Analyse a text (or chat messages) and wait for the result. With `on_progress`, the analysis runs over
        the WebSocket and the callback hears its queue position and each batch; else it is polled over REST."""
        if on_progress is None:
            accepted = self.submit_analysis(text, messages, options, model_id)
            return W.analysis_of(self.wait(accepted.request_id, timeout))
        for event in self.iter_analyze(text, messages, options, model_id, timeout=timeout):
            if isinstance(event, Analysis):
                return event
            on_progress(event)
        raise APIError(502, "the connection ended before the analysis did")

    def iter_analyze(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[Progress | Analysis]:
        """The analysis' progress (queued, preparing, each batch) as it happens, then the `Analysis`."""
        frames = W.AnalysisFrames(f"client-{uuid.uuid4()}")
        body = {"type": "analyze", **W.analyze_body(text, messages, options, model_id, frames.crid)}
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        with self._ws() as ws:
            ws.send(json.dumps(body))
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    msg = json.loads(ws.recv(timeout=left))
                except TimeoutError:
                    raise TimeoutError(
                        f"no result within {timeout} s (request {frames.request_id})"
                    ) from None
                if not frames.mine(msg):
                    continue
                event = frames.read(msg)
                if isinstance(event, APIError):
                    if event.status in W.RETRY_STATUSES and attempt < self.max_retries:
                        time.sleep(W.backoff(attempt, event.retry_after, self.max_retry_wait))
                        attempt += 1
                        ws.send(json.dumps(body))
                        continue
                    raise event
                yield event
                if isinstance(event, Analysis):
                    return

    # -- generation ---------------------------------------------------------------------------------------------
    def generate(
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
    ) -> GenerationStream:
        """Continue a text or a chat: iterate the result for the tokens as they come (`TokenEvent`), read
        `.result` for the finished `Generation`. Absent settings come from the model's generation config."""
        options = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "num_completions": num_completions,
            "stop_at_end_of_turn": stop_at_end_of_turn,
        }
        body = W.generate_body(text, messages, model_id, options)
        response = self._send("POST", "/generate?stream=true", json_body=body, stream=True)
        return GenerationStream(self, response)

    # -- vectors ------------------------------------------------------------------------------------------------
    def describe(
        self,
        vectors: Any,
        tokens: Sequence[str | int | None] | None = None,
        *,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
    ) -> VectorResults:
        """Explanations and reconstruction metrics of vectors (lists, numpy or torch: [n, d] or [d]); `tokens`
        (one per vector, a token string or id) is what the reconstructor reads beside the explanation."""
        body: dict[str, Any] = {"vectors": W.pack_vectors(vectors), "encoding": "base64"}
        if tokens is not None:
            body["tokens"] = list(tokens)
        if options:
            body["options"] = options
        if model_id:
            body["model_id"] = model_id
        return W.vector_results(self._json("POST", "/api/v1/describe", body))

    def score(
        self,
        explanation: str | Sequence[str],
        vector: Any,
        *,
        token: str | int | None = None,
        salience: bool = False,
        model_id: str | None = None,
    ) -> VectorResults:
        """The reconstruction metrics of an explanation (or several) for a vector."""
        body: dict[str, Any] = {"vector": W.pack_vectors(vector), "calculate_token_salience": salience}
        body["explanation" if isinstance(explanation, str) else "explanations"] = (
            explanation if isinstance(explanation, str) else list(explanation)
        )
        if token is not None:
            body["token"] = token
        if model_id:
            body["model_id"] = model_id
        return W.vector_results(self._json("POST", "/api/v1/score", body))

    def extract(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        *,
        positions: Sequence[int] | None = None,
        model_id: str | None = None,
    ) -> Extraction:
        """Activations at the model's layer (all positions, or those given; negative counts from the end)."""
        body = {**W.analyze_body(text, messages, None, model_id), "encoding": "base64"}
        if positions is not None:
            body["positions"] = list(positions)
        return W.extraction_of(self._json("POST", "/api/v1/extract", body))

    def tokenize(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        *,
        model_id: str | None = None,
    ) -> dict[str, Any]:
        return self._json("POST", "/api/v1/tokenize", W.analyze_body(text, messages, None, model_id))
