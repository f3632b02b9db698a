"""A job: one unit of client work (an analysis, a generation, a model switch) and its life cycle.

`queued` (waiting for a device) -> `processing` (admitted: prepared, then explained chunk by chunk) -> one of
`completed`, `failed`, `cancelled` (terminal; a terminal job never changes again).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

QUEUED, PROCESSING, COMPLETED, FAILED, CANCELLED = "queued", "processing", "completed", "failed", "cancelled"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})


class UnknownRequest(KeyError):
    """No job has this id (or the caller may not know of it). A KeyError, so that callers that only need to know
    the job is gone keep catching KeyError; the API answers it with 404."""


def text_length(request: dict[str, Any]) -> int:
    """Characters of a request's input (bounded by MAX_TEXT_LENGTH): its text, or its messages' contents."""
    if request.get("text") is not None:
        return len(request["text"])
    return sum(len(m["content"]) for m in request.get("messages") or [])


def new_id() -> str:
    return str(uuid.uuid4())


def iso(ts: float | None) -> str | None:
    """ISO-8601 UTC with a Z, e.g. 2024-01-20T10:30:00.123Z."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Job:
    id: str
    kind: str
    request: dict[str, Any]  # what the client asked for, validated (text or messages, options, model_id, ...)
    model_id: str | None
    group_id: str | None
    client_request_id: str | None = None
    owner: str | None = None  # who submitted it: a client identity (see api/deps.py)
    status: str = QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0  # how many times a server process started working on it
    submitted_position: int | None = field(default=None, compare=False)  # queue position when it was queued

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def processing_time(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.completed_at if self.completed_at is not None else time.time()
        return round(end - self.started_at, 3)

    def status_body(self, queue_position: int | None = None) -> dict[str, Any]:
        """`GET /status/{id}`: the seed's fields first, then ours."""
        return {
            "request_id": self.id,
            "status": self.status,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "completed_at": iso(self.completed_at),
            "processing_time": self.processing_time,
            "result": self.result,
            "error": self.error,
            "kind": self.kind,
            "model_id": self.model_id,
            "client_request_id": self.client_request_id,
            "queue_position": queue_position,
            "progress": self.progress or None,
        }
