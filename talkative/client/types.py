"""Typed results of the Talkative API, for `Client` and `AsyncClient`.

Every result keeps the server's whole answer in `raw`, so fields the server adds later are never lost; the typed
fields are the ones a caller reads most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class APIError(Exception):
    """The server refused a request: `status` is the HTTP status (or the WebSocket error `code`), `detail` its
    reason, `retry_after` the seconds it asked to wait (429/503), when it said."""

    def __init__(
        self, status: int, detail: str, *, retry_after: float | None = None, body: Any = None
    ) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        self.body = body


class JobFailed(Exception):
    """A request was accepted but ended `failed` or `cancelled`; `error` is the server's reason."""

    def __init__(self, request_id: str, status: str, error: str | None) -> None:
        super().__init__(f"request {request_id} {status}: {error}")
        self.request_id = request_id
        self.status = status
        self.error = error


@dataclass
class Accepted:
    """A queued request: its id and place in the queue (1 = next)."""

    request_id: str
    status: str
    queue_position: int | None
    queue_size: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, body: dict[str, Any]) -> Accepted:
        return cls(
            body["request_id"], body["status"], body.get("queue_position"), body.get("queue_size", 0), body
        )


@dataclass
class JobStatus:
    request_id: str
    status: str  # queued | processing | completed | failed | cancelled
    kind: str | None
    result: dict[str, Any] | None
    error: str | None
    queue_position: int | None
    progress: dict[str, Any] | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @classmethod
    def of(cls, body: dict[str, Any]) -> JobStatus:
        return cls(
            body["request_id"],
            body["status"],
            body.get("kind"),
            body.get("result"),
            body.get("error"),
            body.get("queue_position"),
            body.get("progress"),
            body,
        )


@dataclass
class Progress:
    """An analysis' progress (WebSocket `processing`) or its place in the queue (`queued`)."""

    request_id: str
    stage: str  # queued | preparing | explanation_generation
    message: str
    done_positions: int | None = None
    total_positions: int | None = None
    eta_seconds: float | None = None
    queue_position: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, msg: dict[str, Any]) -> Progress:
        if msg["type"] == "queued":
            return cls(
                msg["request_id"],
                "queued",
                f"queued at position {msg.get('queue_position')}",
                queue_position=msg.get("queue_position"),
                raw=msg,
            )
        return cls(
            msg["request_id"],
            msg.get("stage", ""),
            msg.get("message", ""),
            msg.get("done_positions"),
            msg.get("total_positions"),
            msg.get("eta_seconds"),
            raw=msg,
        )


@dataclass
class Analysis:
    """An analysis: one row per token (`position, token, explanation, mse, kl_divergence, …`) and metadata."""

    request_id: str
    tokens: list[dict[str, Any]]
    metadata: dict[str, Any]

    @property
    def explanations(self) -> list[str]:
        return [row["explanation"] for row in self.tokens]


@dataclass
class TokenEvent:
    """One generated token: `position` counts the prompt's tokens, `completion` says which sample it belongs to,
    `finish_reason` ("stop" or "length") marks a completion's last token."""

    token: str
    position: int
    completion: int
    finish_reason: str | None
    token_id: int | None = None


@dataclass
class Generation:
    request_id: str
    completions: list[str]
    finish_reasons: list[str]
    prompt: str | None
    prompt_tokens: int | None
    metadata: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, request_id: str, body: dict[str, Any]) -> Generation:
        return cls(
            request_id,
            list(body.get("completions") or []),
            list(body.get("finish_reasons") or []),
            body.get("prompt"),
            body.get("prompt_tokens"),
            dict(body.get("metadata") or {}),
            body,
        )


@dataclass
class ModelInfo:
    id: str
    name: str
    group_id: str
    layer: int | None
    is_loaded: bool
    is_current: bool
    backend_only: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ModelListing:
    """`GET /api/v2/models`: the groups and models this client may use, and the current model."""

    models: list[ModelInfo]
    current_model: str | None
    current_group: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, body: dict[str, Any]) -> ModelListing:
        models = [
            ModelInfo(
                m["id"],
                m.get("name", m["id"]),
                g["group_id"],
                m.get("layer"),
                bool(m.get("is_loaded")),
                bool(m.get("is_current")),
                bool(m.get("backend_only")),
                m,
            )
            for g in body.get("groups", [])
            for m in g.get("models", [])
        ]
        return cls(models, body.get("current_model"), body.get("current_group"), body)

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.models]


@dataclass
class SwitchResult:
    status: str  # success | queued
    model_id: str
    group_id: str
    group_switched: bool
    message: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, body: dict[str, Any]) -> SwitchResult:
        return cls(
            body["status"], body["model_id"], body["group_id"], body["group_switched"], body["message"], body
        )


@dataclass
class VectorResults:
    """`describe` or `score`: one result per vector (or explanation), metrics in each; `reconstructions` decoded
    to lists of floats when asked for."""

    request_id: str
    results: list[dict[str, Any]]
    metadata: dict[str, Any]
    reconstructions: list[list[float]] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Extraction:
    """`extract`: the token facts and their activations (`activations[i]` belongs to `tokens[i]`)."""

    request_id: str
    layer: int
    tokens: list[dict[str, Any]]
    activations: list[list[float]]
    prompt: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class BatchItemResult:
    """One item of a batch as it finished: `completed` with its rows and metadata, or `failed` with its error
    (`line`: its line in a JSONL upload)."""

    id: Any  # the item's id as submitted (a string or an integer; None for a JSONL line that had none)
    status: str  # completed | failed
    tokens: list[dict[str, Any]]
    metadata: dict[str, Any]
    error: str | None
    line: int | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @classmethod
    def of(cls, body: dict[str, Any]) -> BatchItemResult:
        return cls(
            body.get("id"),
            body["status"],
            body.get("tokens", []),
            body.get("metadata", {}),
            body.get("error"),
            body.get("line"),
            body,
        )


@dataclass
class BatchRun:
    """A submitted batch: its id (to resume with `client.batch_results(batch_id, after=n)`), its size, and its
    results as they finish: `for item in run` on a `Client`, `async for item in run` on an `AsyncClient`."""

    batch_id: str
    total: int
    status: str
    client: Any = field(repr=False)  # the Client or AsyncClient that submitted it
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, body: dict[str, Any], client: Any) -> BatchRun:
        return cls(body["batch_id"], body["items"]["total"], body["status"], client, body)

    def __iter__(self) -> Any:
        return iter(self.client.batch_results(self.batch_id))

    def __aiter__(self) -> Any:
        return aiter(self.client.batch_results(self.batch_id))
