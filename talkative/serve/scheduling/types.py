"""The scheduler's vocabulary: its refusal, the sink and monitor it reports to, and its records of admitted work.

Kept apart from the scheduler's loop so that the API layer and the job kinds can name these types without
importing the scheduler itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ...nla.options import Resolved
from ..jobs.record import Job

if TYPE_CHECKING:
    from ..jobs.cache import CachePlan
    from .workers import Loaded, Worker

MAX_ATTEMPTS = 3  # a job whose process died this many times while it ran is failed, not run again
STAGE_PREPARING = "preparing"
STAGE_EXPLAINING = "explanation_generation"


class SchedulerError(Exception):
    """A request the scheduler refuses; `status` is the HTTP status that fits."""

    def __init__(
        self, status: int, detail: str, *, reason: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason  # for refusals: queue_full, client_busy, draining, not_ready
        self.retry_after = retry_after  # seconds, for 429 and 503


class EventSink(Protocol):
    """Who hears about jobs and groups: the WebSocket hub, wrapped by the token logs and the metrics."""

    def subscribe(self, job: Job, subscriber: Any) -> None: ...
    def job_event(self, job: Job, message: dict[str, Any]) -> None: ...
    def relay(self, job: Job, message: dict[str, Any]) -> None:
        """A message about a job another replica ran (its end, read from the shared store): to this replica's
        listeners only, never observed as this replica's work."""

    def queue_changed(self) -> None: ...
    def broadcast(self, message: dict[str, Any]) -> None: ...


class Monitor(Protocol):
    """Observes the scheduler for metrics (observability.metrics.Metrics)."""

    def stage(self, name: str, seconds: float) -> None: ...
    def reject(self, reason: str) -> None: ...


@dataclass
class Work:
    """An admitted analysis: the worker's handle on its prepared input, the positions still to explain, the rows."""

    job: Job
    device: DeviceState
    resolved: Resolved
    key: tuple[object, ...]  # jobs with equal keys may share an engine batch
    chunk: int = 1  # positions per chunk
    handle: object | None = None  # what the worker's prepare returned; None until prepared, and once dropped
    positions: list[int] = field(default_factory=list)  # every position to explain, in the result's order
    pending: list[int] = field(default_factory=list)
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    total: int = 0
    done: int = 0
    inflight: int = 0
    chunks_started: int = 0
    num_batches: int = 0
    last_served: int = 0
    first_chunk_at: float | None = None
    batches: list[int] = field(default_factory=list)
    merged: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    cancelled: bool = False
    # the most positions one engine batch of this job may take (row and rows × tokens budgets)
    max_positions: int = 1
    # REQUEST_TIMEOUT counts the job's own engine time only: its preparation from when the preparation thread takes
    # it up, and the spans during which at least one of its batches runs (waiting for a worker does not count).
    engine_seconds: float = 0.0
    busy_since: float | None = None  # a batch of this job is running since then
    prep_started: float | None = None  # its preparation is running since then (set on the preparation thread)
    cache: CachePlan | None = None  # its result-cache keys once prepared (None with the cache off)

    @property
    def prepared(self) -> bool:
        return self.handle is not None

    def own_seconds(self, now: float) -> float:
        """Engine time spent on this job so far, the span running now included."""
        running = [t for t in (self.busy_since, self.prep_started) if t is not None]
        return self.engine_seconds + sum(now - t for t in running)


@dataclass
class DeviceState:
    """What the scheduler knows of one device: the group its worker holds and the work admitted to it."""

    name: str
    slots: int
    worker: Worker
    loaded: Loaded | None = None  # the group its worker holds (None while loading or when it holds none)
    loading: str | None = None  # group being loaded here
    draining_for: str | None = None  # group waiting for this device to finish its work
    works: dict[str, Work] = field(default_factory=dict)
    whole: set[str] = field(default_factory=set)  # admitted jobs a worker runs whole (not chunked)
    whole_started: dict[str, float] = field(default_factory=dict)  # job id -> when a worker thread took it up
    inflight: int = 0  # engine batches (and whole jobs) running
    preparing: int = 0
    last_used: float = 0.0
    fill_finishing: bool = True  # see Settings.fill_finishing_batches

    @property
    def group_id(self) -> str | None:
        return self.loaded.group_id if self.loaded is not None else None

    @property
    def active_jobs(self) -> int:
        return len(self.works) + len(self.whole)

    @property
    def busy(self) -> bool:
        return bool(self.works or self.whole or self.inflight or self.preparing or self.loading)

    def describe(self) -> dict[str, Any]:
        """The worker's own facts (device, group, models), then the scheduler's (loading, draining, load)."""
        return {
            **self.worker.describe(),
            "loading": self.loading,
            "draining_for": self.draining_for,
            "workers": self.slots,
            "busy_workers": self.inflight,
            "active_jobs": self.active_jobs,
        }
