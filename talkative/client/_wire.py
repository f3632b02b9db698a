"""What `Client` and `AsyncClient` share: request bodies, answers to types, the retry policy, vector packing.

Kept free of I/O so the two clients differ only in how they wait.
"""

from __future__ import annotations

import base64
import email.utils
import json
import os
import struct
import time
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import httpx

from .types import (
    Analysis,
    APIError,
    Extraction,
    Generation,
    JobFailed,
    JobStatus,
    Progress,
    TokenEvent,
    VectorResults,
)

ENV_KEY = "TALKATIVE_API_KEY"
RETRY_STATUSES = frozenset({429, 503})
DONE = "[DONE]"
C = TypeVar("C")


def api_key_of(api_key: str | None) -> str | None:
    """The key given, else `$TALKATIVE_API_KEY`, else none (a server without keys)."""
    key = api_key if api_key is not None else os.environ.get(ENV_KEY)
    return key or None


def headers(api_key: str | None) -> dict[str, str]:
    out = {"Accept": "application/json", "User-Agent": "talkative-client"}
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def ws_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :] + "/ws"
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :] + "/ws"
    return base + "/ws"


# -- retries --------------------------------------------------------------------------------------------------------
def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff(attempt: int, hinted: float | None, cap: float) -> float:
    """The wait before retry `attempt` (0-based): the server's hint when it gave one, else 0.5 s doubling."""
    wait = hinted if hinted is not None else 0.5 * (2**attempt)
    return min(wait, cap)


def error_of(status: int, body: Any, retry: float | None = None) -> APIError:
    detail = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(detail, str):
        detail = json.dumps(body) if body is not None else f"HTTP {status}"
    return APIError(status, detail, retry_after=retry, body=body)


# -- bodies ---------------------------------------------------------------------------------------------------------
def build(
    http: httpx.Client | httpx.AsyncClient,
    method: str,
    path: str,
    body: Any,
    content: bytes | None,
    content_type: str | None,
) -> httpx.Request:
    """The request of a `Request` effect: a JSON body, or raw content with its type (a JSONL upload)."""
    if content is None:
        return http.build_request(method, path, json=body)
    return http.build_request(method, path, content=content, headers={"Content-Type": content_type or ""})


def _input(text: str | None, messages: Sequence[dict[str, str]] | None) -> dict[str, Any]:
    if (text is None) == (messages is None):
        raise ValueError("give exactly one of text or messages")
    return {"text": text} if text is not None else {"messages": [dict(m) for m in messages or []]}


def analyze_body(
    text: str | None,
    messages: Sequence[dict[str, str]] | None,
    options: dict[str, Any] | None,
    model_id: str | None,
    client_request_id: str | None = None,
) -> dict[str, Any]:
    body = _input(text, messages)
    if options:
        body["options"] = options
    if model_id:
        body["model_id"] = model_id
    if client_request_id:
        body["client_request_id"] = client_request_id
    return body


def generate_body(
    text: str | None, messages: Sequence[dict[str, str]] | None, model_id: str | None, options: dict[str, Any]
) -> dict[str, Any]:
    body = _input(text, messages)
    opts = {k: v for k, v in options.items() if v is not None}
    if opts:
        body["options"] = opts
    if model_id:
        body["model_id"] = model_id
    return body


def pack_vectors(vectors: Any) -> dict[str, Any]:
    """Lists of floats (one vector or several), or anything with `.tolist()` (numpy, torch), as base64 float32."""
    data = vectors.tolist() if hasattr(vectors, "tolist") else vectors
    rows = data if data and isinstance(data[0], list | tuple) else [data]
    width = len(rows[0]) if rows else 0
    if any(len(r) != width for r in rows):
        raise ValueError("the vectors have different lengths")
    flat = [float(x) for r in rows for x in r]
    return {
        "data": base64.b64encode(struct.pack(f"<{len(flat)}f", *flat)).decode("ascii"),
        "shape": [len(rows), width],
        "dtype": "float32",
    }


def unpack_vectors(value: Any) -> list[list[float]]:
    if isinstance(value, list):
        return [list(map(float, r)) for r in value]
    n, d = value["shape"] if len(value["shape"]) == 2 else (1, value["shape"][0])
    flat = struct.unpack(f"<{n * d}f", base64.b64decode(value["data"]))
    return [list(flat[i * d : (i + 1) * d]) for i in range(n)]


# -- answers --------------------------------------------------------------------------------------------------------
def analysis_of(status: JobStatus) -> Analysis:
    if not status.terminal:
        raise TimeoutError(f"request {status.request_id} is still {status.status}")
    if status.status != "completed" or status.result is None:
        raise JobFailed(status.request_id, status.status, status.error)
    return Analysis(status.request_id, status.result.get("tokens", []), status.result.get("metadata", {}))


def job_answer(status: JobStatus) -> dict[str, Any]:
    """The answer a request that waits for its job (a vector job, a diff) gives when the job ends within the
    server's wait, rebuilt from the job's finished status: `request_id`, `model_id` and the job's result."""
    if status.status != "completed" or status.result is None:
        raise JobFailed(status.request_id, status.status, status.error)
    return {"request_id": status.request_id, "model_id": status.raw.get("model_id"), **status.result}


def vector_results(body: dict[str, Any]) -> VectorResults:
    recs = body.get("reconstructions")
    return VectorResults(
        body["request_id"],
        body.get("results", []),
        body.get("metadata", {}),
        unpack_vectors(recs) if recs is not None else None,
        body,
    )


def extraction_of(body: dict[str, Any]) -> Extraction:
    return Extraction(
        body["request_id"],
        body["layer"],
        body["tokens"],
        unpack_vectors(body["activations"]),
        body["prompt"],
        body,
    )


class AnalysisFrames:
    """Reads an analysis' WebSocket messages (those carrying its client_request_id): progress, then the end."""

    def __init__(self, client_request_id: str) -> None:
        self.crid = client_request_id
        self.request_id: str | None = None

    def mine(self, msg: dict[str, Any]) -> bool:
        return msg.get("client_request_id") == self.crid and msg.get("type") != "queue_update"

    def read(self, msg: dict[str, Any]) -> Progress | Analysis | APIError:
        """A Progress, the final Analysis, or the APIError to raise (or to retry, for a refusal for room)."""
        kind = msg.get("type")
        if msg.get("request_id"):
            self.request_id = msg["request_id"]
        if kind in ("queued", "processing"):
            return Progress.of(msg)
        if kind == "result":
            return Analysis(msg["request_id"], msg.get("tokens", []), msg.get("metadata", {}))
        if kind == "request_cancelled":
            raise JobFailed(msg.get("request_id") or "", "cancelled", msg.get("message"))
        if kind == "error":
            if self.request_id is not None and msg.get("request_id") == self.request_id:
                raise JobFailed(self.request_id, "failed", msg.get("error"))
            retry = msg.get("retry_after")
            return APIError(int(msg.get("code") or 400), str(msg.get("error")), retry_after=retry, body=msg)
        return Progress(msg.get("request_id") or "", str(kind), "", raw=msg)


class GenerationFrames:
    """Reads a generation's Server-Sent Events: tokens, then its final message. `pending` holds the tokens
    `cancel()` read ahead (to learn the request's id) and the reader has not had yet."""

    def __init__(self) -> None:
        self.request_id: str | None = None
        self.result: Generation | None = None
        self.done = False
        self.closed = False
        self.pending: list[TokenEvent] = []

    @property
    def ended(self) -> bool:
        """No line is left to read: the final message came, or the stream was closed."""
        return self.done or self.closed

    def read_ahead(self, line: str) -> None:
        """Read a line before the reader does (to learn the request's id), keeping its token for the reader."""
        event = self.read(line)
        if event is not None:
            self.pending.append(event)

    def generation(self) -> Generation:
        """The finished generation, once the stream has been read to its end."""
        if self.result is None:
            raise APIError(502, "the stream ended without its generation_complete message")
        return self.result

    def read(self, line: str) -> TokenEvent | None:
        if not line.startswith("data:"):
            return None  # keep-alive comments, blank separators
        payload = line[len("data:") :].strip()
        if payload == DONE:
            self.done = True
            return None
        msg = json.loads(payload)
        self.request_id = msg.get("request_id") or self.request_id
        kind = msg.get("type")
        if kind == "token":
            return TokenEvent(
                msg["token"],
                msg["position"],
                msg.get("completion", 0),
                msg.get("finish_reason"),
                msg.get("token_id"),
            )
        if kind == "generation_complete":
            self.result = Generation.of(self.request_id or "", msg)
        elif kind == "request_cancelled":
            raise JobFailed(self.request_id or "", "cancelled", msg.get("message"))
        elif kind == "error":
            raise JobFailed(self.request_id or "", "failed", msg.get("error"))
        return None


class StreamedGeneration(Generic[C]):
    """What a generation stream holds, blocking or awaited: its client (to cancel it), the streamed response,
    and the frames read so far."""

    def __init__(self, client: C, response: httpx.Response) -> None:
        self._client = client
        self._response = response
        self._frames = GenerationFrames()

    @property
    def request_id(self) -> str | None:
        """The generation's id, known from its first event (queued) on."""
        return self._frames.request_id
