"""The scheduler's vocabulary: its refusal, the sink and monitor it reports to, and the records of admitted work.

Kept apart from the scheduler's logic so that the API layer and job handlers (generation, vectors) can name these
types without importing the scheduler itself.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...nla.analysis import Prepared
from ...nla.checkpoint import NLA
from ...nla.options import Resolved
from ..catalog.residency import GroupRuntime
from ..jobs.record import Job

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
    def subscribe(self, job: Job, subscriber: Any) -> None: ...
    def job_event(self, job: Job, message: dict[str, Any]) -> None: ...
    def queue_changed(self) -> None: ...
    def broadcast(self, message: dict[str, Any]) -> None: ...


class Monitor(Protocol):
    """Observes the scheduler for metrics (telemetry.Metrics)."""

    def stage(self, name: str, seconds: float) -> None: ...
    def reject(self, reason: str) -> None: ...


class NullMonitor:
    """The monitor until the app sets one: observes nothing."""

    def stage(self, name: str, seconds: float) -> None:
        pass

    def reject(self, reason: str) -> None:
        pass


class NullSink:
    """The sink until the app sets one (and in tests): nobody listens."""

    def subscribe(self, job: Job, subscriber: Any) -> None:
        pass

    def job_event(self, job: Job, message: dict[str, Any]) -> None:
        pass

    def queue_changed(self) -> None:
        pass

    def broadcast(self, message: dict[str, Any]) -> None:
        pass


@dataclass
class JobContext:
    """What a whole-job handler (a kind other than analyze and switch) gets, on a device worker thread."""

    job: Job
    nla: NLA
    runtime: GroupRuntime
    device: str
    emit: Callable[[dict[str, Any]], None]  # thread-safe: sends a message about this job to its listeners
    cancelled: Callable[[], bool]


#: a blocking function that does a whole job and returns its result (e.g. generation, issue 5)
JobHandler = Callable[[JobContext], dict[str, Any]]


@dataclass
class Work:
    """An admitted analysis: its prepared input, the positions still to explain and the rows so far."""

    job: Job
    device: DeviceState
    resolved: Resolved
    key: tuple[object, ...]  # jobs with equal keys may share an engine batch
    chunk: int = 1  # positions per chunk
    prepared: Prepared | None = None
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

    def own_seconds(self, now: float) -> float:
        """Engine time spent on this job so far, the span running now included."""
        running = [t for t in (self.busy_since, self.prep_started) if t is not None]
        return self.engine_seconds + sum(now - t for t in running)


@dataclass
class DeviceState:
    name: str
    slots: int
    batch_pool: ThreadPoolExecutor
    prep_pool: ThreadPoolExecutor
    runtime: GroupRuntime | None = None
    loading: str | None = None  # group being loaded here
    draining_for: str | None = None  # group waiting for this device to finish its work
    works: dict[str, Work] = field(default_factory=dict)
    whole: set[str] = field(default_factory=set)  # admitted jobs run by a JobHandler
    whole_started: dict[str, float] = field(default_factory=dict)  # job id -> when a worker thread took it up
    inflight: int = 0  # engine batches (and whole jobs) running
    preparing: int = 0
    last_used: float = 0.0
    fill_finishing: bool = True  # see Settings.fill_finishing_batches

    @property
    def group_id(self) -> str | None:
        return self.runtime.group_id if self.runtime is not None else None

    @property
    def busy(self) -> bool:
        return bool(self.works or self.whole or self.inflight or self.preparing or self.loading)

    def describe(self) -> dict[str, Any]:
        return {
            "device": self.name,
            "group_id": self.group_id,
            "models": sorted(self.runtime.nlas) if self.runtime else [],
            "loading": self.loading,
            "draining_for": self.draining_for,
            "workers": self.slots,
            "busy_workers": self.inflight,
            "active_jobs": len(self.works) + len(self.whole),
        }
