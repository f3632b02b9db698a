"""Every operation of the Talkative API, written once, as a plan (see `_plan`): `Client` and `AsyncClient` inherit
them and differ only in how they carry the plans' I/O out."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Sequence
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from . import _wire as W
from ._plan import (
    Connect,
    Emit,
    Events,
    Notify,
    Plan,
    Receive,
    Request,
    Send,
    Sleep,
    iteration,
    operation,
    streaming,
)
from .types import (
    Accepted,
    Analysis,
    APIError,
    BatchItemResult,
    BatchRun,
    Extraction,
    JobStatus,
    ModelListing,
    Progress,
    SwitchResult,
    VectorResults,
)

DEFAULT_URL = "http://127.0.0.1:8000"
BATCHES = "/api/v1/batches"
R = TypeVar("R")


class Operations(ABC):
    """The settings of a client and its operations. The API key comes from `api_key`, else
    `$TALKATIVE_API_KEY`. Requests refused for room or rate (429, 503) are retried up to `max_retries` times,
    after the server's `Retry-After` (at most `max_retry_wait` seconds), and so are connections that could not
    be opened; `timeout` bounds each request and the opening of the WebSocket."""

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
        self._http = self._http_client()

    @abstractmethod
    def _http_client(self) -> httpx.Client | httpx.AsyncClient:
        """The HTTP client that carries the requests out, blocking or awaited: the subclass' to build."""

    # -- transport ----------------------------------------------------------------------------------------------
    def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        stream: bool = False,
        content: bytes | None = None,
        content_type: str | None = None,
    ) -> Plan[httpx.Response]:
        """One request, retried on 429/503 (after Retry-After) and on connections that could not be opened."""
        for attempt in range(self.max_retries + 1):
            try:
                response: httpx.Response = yield Request(method, path, body, stream, content, content_type)
            except httpx.ConnectError:
                if attempt == self.max_retries:
                    raise
                yield Sleep(W.backoff(attempt, None, self.max_retry_wait))
                continue
            if not response.is_error:
                return response
            hint = W.retry_after(response.headers.get("retry-after"))
            if response.status_code in W.RETRY_STATUSES and attempt < self.max_retries:
                yield Sleep(W.backoff(attempt, hint, self.max_retry_wait))
                continue
            try:
                reason: Any = response.json()
            except ValueError:
                reason = response.text
            raise W.error_of(response.status_code, reason, hint)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, body: Any = None) -> Plan[dict[str, Any]]:
        out: dict[str, Any] = (yield from self._send(method, path, body)).json()
        return out

    def _waited_job(self, path: str, body: dict[str, Any], timeout: float | None) -> Plan[dict[str, Any]]:
        """The answer of a request the server answers when its job is done (the vector endpoints, diff). The
        server waits for the job up to its own limit (REQUEST_TIMEOUT, else 300 s), then answers 202 with the
        job's id; the job is then polled here until it ends, and its result answered as if it had come at once.
        A job not done within `timeout` seconds of the request (None: no limit) is cancelled, since its caller
        was never given its id to follow it, and a `TimeoutError` names it; one that failed raises `JobFailed`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        response = yield from self._send("POST", path, body)
        answer: dict[str, Any] = response.json()
        if response.status_code != 202:
            return answer
        request_id = answer["request_id"]
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        status = yield from Operations.wait.plan(self, request_id, left)
        if not status.terminal:
            with contextlib.suppress(
                APIError
            ):  # refused: it ended (or was removed) meanwhile, so nothing runs
                yield from Operations.cancel.plan(self, request_id)
            raise TimeoutError(f"request {request_id} did not finish within {timeout} s and was cancelled")
        return W.job_answer(status)

    def _analysis_over_websocket(
        self,
        text: str | None,
        messages: Sequence[dict[str, str]] | None,
        options: dict[str, Any] | None,
        model_id: str | None,
        timeout: float | None,
        report: Callable[[Progress], R],
    ) -> Generator[Connect | Send | Receive | Sleep | R, Any, Analysis]:
        """Submit an analysis over the WebSocket and read its messages until its result, yielding
        `report(progress)` for each step on the way; a refusal for room is retried after its `retry_after`."""
        frames = W.AnalysisFrames(f"client-{uuid.uuid4()}")
        frame = json.dumps(
            {"type": "analyze", **W.analyze_body(text, messages, options, model_id, frames.crid)}
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        bearer = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        socket = yield Connect(W.ws_url(self.base_url), bearer, self.timeout)
        yield Send(socket, frame)
        attempt = 0
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                msg = json.loads((yield Receive(socket, left)))
            except TimeoutError:
                raise TimeoutError(f"no result within {timeout} s (request {frames.request_id})") from None
            if not frames.mine(msg):
                continue
            event = frames.read(msg)
            if isinstance(event, Analysis):
                return event
            if isinstance(event, APIError):
                if event.status not in W.RETRY_STATUSES or attempt >= self.max_retries:
                    raise event
                yield Sleep(W.backoff(attempt, event.retry_after, self.max_retry_wait))
                attempt += 1
                yield Send(socket, frame)
                continue
            yield report(event)

    # -- service ------------------------------------------------------------------------------------------------
    @operation
    def health(self) -> Plan[dict[str, Any]]:
        return (yield from self._json("GET", "/health"))

    @operation
    def models(self) -> Plan[ModelListing]:
        return ModelListing.of((yield from self._json("GET", "/api/v2/models")))

    @operation
    def metric_legend(self) -> Plan[list[dict[str, Any]]]:
        """What each metric of a result is, one entry per metric of the server's metric table in the order rows
        use: `name` (the row key), `role` (`headline`, `detail` or `derived`), labels, meaning, `per_row`."""
        legend: list[dict[str, Any]] = (yield from self._json("GET", "/api/v1/metrics/legend"))["metrics"]
        return legend

    @operation
    def switch(self, model_id: str) -> Plan[SwitchResult]:
        """Make `model_id` the current model (for requests that name none); waits for a group to load."""
        return SwitchResult.of(
            (yield from self._json("POST", "/api/v2/models/switch", {"model_id": model_id}))
        )

    @operation
    def status(self, request_id: str) -> Plan[JobStatus]:
        return JobStatus.of((yield from self._json("GET", f"/status/{request_id}")))

    @operation
    def cancel(self, request_id: str) -> Plan[dict[str, Any]]:
        return (yield from self._json("POST", f"/cancel/{request_id}"))

    @operation
    def wait(self, request_id: str, timeout: float | None = None, poll: float = 0.2) -> Plan[JobStatus]:
        """Poll until the request is finished (or `timeout` passes: then its current status)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll
        while True:
            status = yield from Operations.status.plan(self, request_id)
            if status.terminal or (deadline is not None and time.monotonic() >= deadline):
                return status
            yield Sleep(delay)
            delay = min(delay * 1.5, 2.0)

    # -- analysis -----------------------------------------------------------------------------------------------
    @operation
    def submit_analysis(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
        client_request_id: str | None = None,
    ) -> Plan[Accepted]:
        body = W.analyze_body(text, messages, options, model_id, client_request_id)
        return Accepted.of((yield from self._json("POST", "/analyze", body)))

    @operation
    def analyze(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
        *,
        on_progress: Callable[[Progress], object] | None = None,
        timeout: float | None = None,
    ) -> Plan[Analysis]:
        """Analyse a text (or chat messages) and wait for the result. With `on_progress`, the analysis runs over
        the WebSocket and the callback hears its queue position and each batch (on an `AsyncClient` it may be
        a coroutine function); else it is polled over REST."""
        if on_progress is None:
            accepted = yield from Operations.submit_analysis.plan(self, text, messages, options, model_id)
            return W.analysis_of((yield from Operations.wait.plan(self, accepted.request_id, timeout)))
        notify = partial(Notify, on_progress)
        return (yield from self._analysis_over_websocket(text, messages, options, model_id, timeout, notify))

    @iteration
    def iter_analyze(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> Events[Progress | Analysis]:
        """The analysis' progress (queued, preparing, each batch) as it happens, then the `Analysis`."""
        analysis = yield from self._analysis_over_websocket(text, messages, options, model_id, timeout, Emit)
        yield Emit(analysis)

    # -- generation ---------------------------------------------------------------------------------------------
    @streaming
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
        steer: dict[str, Any] | None = None,
    ) -> Plan[httpx.Response]:
        """Continue a text or a chat: iterate the result for the tokens as they come (`TokenEvent`), read its
        result for the finished `Generation`. Absent settings come from the model's generation config; `steer`
        (`{direction, alpha, positions}`) pushes the subject along a direction while it writes."""
        options = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "num_completions": num_completions,
            "stop_at_end_of_turn": stop_at_end_of_turn,
            "steer": steer,
        }
        body = W.generate_body(text, messages, model_id, options)
        return (yield from self._send("POST", "/generate?stream=true", body, stream=True))

    # -- vectors ------------------------------------------------------------------------------------------------
    @operation
    def describe(
        self,
        vectors: Any,
        tokens: Sequence[str | int | None] | None = None,
        *,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
        timeout: float | None = None,
    ) -> Plan[VectorResults]:
        """Explanations and reconstruction metrics of vectors (lists, numpy or torch: [n, d] or [d]); `tokens`
        (one per vector, a token string or id) is what the reconstructor reads beside the explanation. Like every
        vector operation, it waits for its job however long it runs, or up to `timeout` seconds (then the job is
        cancelled and `TimeoutError` raised)."""
        body: dict[str, Any] = {"vectors": W.pack_vectors(vectors), "encoding": "base64"}
        if tokens is not None:
            body["tokens"] = list(tokens)
        if options:
            body["options"] = options
        if model_id:
            body["model_id"] = model_id
        return W.vector_results((yield from self._waited_job("/api/v1/describe", body, timeout)))

    @operation
    def score(
        self,
        explanation: str | Sequence[str],
        vector: Any,
        *,
        token: str | int | None = None,
        salience: bool = False,
        model_id: str | None = None,
        timeout: float | None = None,
    ) -> Plan[VectorResults]:
        """The reconstruction metrics of an explanation (or several) for a vector."""
        body: dict[str, Any] = {"vector": W.pack_vectors(vector), "calculate_token_salience": salience}
        body["explanation" if isinstance(explanation, str) else "explanations"] = (
            explanation if isinstance(explanation, str) else list(explanation)
        )
        if token is not None:
            body["token"] = token
        if model_id:
            body["model_id"] = model_id
        return W.vector_results((yield from self._waited_job("/api/v1/score", body, timeout)))

    @operation
    def extract(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        *,
        positions: Sequence[int] | None = None,
        model_id: str | None = None,
        timeout: float | None = None,
    ) -> Plan[Extraction]:
        """Activations at the model's layer (all positions, or those given; negative counts from the end)."""
        body = {**W.analyze_body(text, messages, None, model_id), "encoding": "base64"}
        if positions is not None:
            body["positions"] = list(positions)
        return W.extraction_of((yield from self._waited_job("/api/v1/extract", body, timeout)))

    @operation
    def tokenize(
        self,
        text: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        *,
        model_id: str | None = None,
        timeout: float | None = None,
    ) -> Plan[dict[str, Any]]:
        body = W.analyze_body(text, messages, None, model_id)
        return (yield from self._waited_job("/api/v1/tokenize", body, timeout))

    @operation
    def diff(
        self,
        a: dict[str, Any],
        b: dict[str, Any],
        *,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
        timeout: float | None = None,
    ) -> Plan[dict[str, Any]]:
        """Explain what separates two states, A − B (each `{text | messages, position?, model_id?}`), and each
        state on its own: `{request_id, model_id, difference, a, b, cosine_a_b, metadata}`. Waits for the diff
        as `describe` does (`timeout`: then it is cancelled and `TimeoutError` raised)."""
        body: dict[str, Any] = {"a": dict(a), "b": dict(b)}
        if options:
            body["options"] = options
        if model_id:
            body["model_id"] = model_id
        return (yield from self._waited_job("/api/v1/diff", body, timeout))

    # -- batches ------------------------------------------------------------------------------------------------
    @operation
    def batch(
        self,
        items: Iterable[dict[str, Any] | str],
        *,
        options: dict[str, Any] | None = None,
        model_id: str | None = None,
    ) -> Plan[BatchRun]:
        """Submit many analyses at once (`{id, text | messages, options?}` each; a plain string is a text whose id
        is its index) and get the `BatchRun` at once: iterate it for the items' results as they finish, keep its
        `batch_id` to resume later with `batch_results`. The items run as the server's interactive load allows."""
        body: dict[str, Any] = {
            "items": [
                {"id": i, "text": item} if isinstance(item, str) else dict(item)
                for i, item in enumerate(items)
            ]
        }
        if options:
            body["options"] = options
        if model_id:
            body["model_id"] = model_id
        return BatchRun.of((yield from self._json("POST", BATCHES, body)), self)

    @operation
    def batch_jsonl(
        self, jsonl: str | bytes, *, options: dict[str, Any] | None = None, model_id: str | None = None
    ) -> Plan[BatchRun]:
        """Submit a JSONL upload as it is (one item per line): a line that is not a valid item fails alone, with its
        line number, and the others run."""
        query = []
        if options:
            query.append("options=" + quote(json.dumps(options)))
        if model_id:
            query.append("model_id=" + quote(model_id))
        path = BATCHES + ("?" + "&".join(query) if query else "")
        content = jsonl.encode() if isinstance(jsonl, str) else jsonl
        response = yield from self._send("POST", path, content=content, content_type="application/x-ndjson")
        return BatchRun.of(response.json(), self)

    @operation
    def batch_status(self, batch_id: str) -> Plan[dict[str, Any]]:
        """A batch's progress: `status`, `items` (total, done, completed, failed, cancelled, running, pending),
        `positions_done`, `positions_per_second`, `eta_seconds`."""
        return (yield from self._json("GET", f"{BATCHES}/{batch_id}"))

    @operation
    def batches(self, limit: int = 20, offset: int = 0) -> Plan[dict[str, Any]]:
        return (yield from self._json("GET", f"{BATCHES}?limit={limit}&offset={offset}"))

    @operation
    def cancel_batch(self, batch_id: str) -> Plan[dict[str, Any]]:
        return (yield from self._json("POST", f"{BATCHES}/{batch_id}/cancel"))

    @operation
    def delete_batch(self, batch_id: str) -> Plan[dict[str, Any]]:
        return (yield from self._json("DELETE", f"{BATCHES}/{batch_id}"))

    @iteration
    def batch_results(
        self, batch_id: str, after: int = 0, *, poll: float = 1.0, max_poll: float = 5.0
    ) -> Events[BatchItemResult]:
        """The batch's item results in completion order as they finish, after the first `after` (to resume),
        until the batch is over. Polls, one short request at a time (no proxy or timeout cuts a long batch, and a
        poll costs one request of the rate limit): every `poll` seconds while items finish, slowing down to
        `max_poll` while none does."""
        seen, delay = after, poll
        while True:
            response = yield from self._send("GET", f"{BATCHES}/{batch_id}/results?after={seen}")
            lines = [line for line in response.text.splitlines() if line]
            for line in lines:
                seen += 1
                yield Emit(BatchItemResult.of(json.loads(line)))
            if response.headers.get("x-batch-over") == "true":  # read before the lines: none was missed
                return
            delay = poll if lines else min(delay * 1.5, max_poll)
            yield Sleep(delay)
