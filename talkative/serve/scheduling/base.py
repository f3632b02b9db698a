"""The scheduler's shared state and the ends of jobs, which every part of the scheduler reaches.

`SchedulerBase` holds what the scheduler knows (queue, jobs, devices, counters) and the few steps every part needs:
spawning a task, telling a job's listeners, ending a job (complete, fail, cancel) and announcing it once stored.
The parts that decide and do the work build on it: `analysis_jobs.AnalysisJobs` (chunks and engine batches),
`group_switching.GroupSwitching` (which group a device holds) and `scheduler.Scheduler` (the queue and the decision
function `_schedule`, which every part calls after a change).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...nla.checkpoint import NLA
from ..catalog.registry import Registry
from ..catalog.residency import GroupRuntime, Residency
from ..jobs.record import CANCELLED, FAILED, QUEUED, Job, UnknownRequest
from ..jobs.store import JobStore
from ..settings import Settings
from .types import (
    DeviceState,
    EventSink,
    JobHandler,
    Monitor,
    NullMonitor,
    NullSink,
    SchedulerError,
)

log = logging.getLogger("talkative.serve.scheduling.scheduler")  # the scheduler's parts log under one name


class SchedulerBase(ABC):
    """The scheduler's state in one place: every decision (admit, switch, batch) needs the whole picture."""

    def __init__(self, settings: Settings, registry: Registry, residency: Residency, store: JobStore) -> None:
        self.settings = settings
        self.registry = registry
        self.residency = residency
        self.store = store
        self.sink: EventSink = NullSink()
        self.monitor: Monitor = NullMonitor()
        #: queued plus running jobs an owner may have (None = no cap); set by the app from its access policy
        self.client_cap: Callable[[str | None], int | None] = lambda owner: None
        self.draining = False  # shutting down: no admissions, no new engine batches, no submissions
        self.queue: list[Job] = []  # FIFO of queued jobs
        self.jobs: dict[str, Job] = {}  # every job not yet stored as terminal
        self.handlers: dict[str, JobHandler] = {}
        #: the terminal WebSocket message of a completed job of a kind, when not `{type: "<kind>_complete", result}`
        self.finalizers: dict[str, Callable[[Job], dict[str, Any]]] = {}
        self.devices = [
            DeviceState(
                name=d,
                slots=settings.num_workers_per_gpu,
                batch_pool=ThreadPoolExecutor(settings.num_workers_per_gpu, thread_name_prefix=f"engine-{d}"),
                prep_pool=ThreadPoolExecutor(1, thread_name_prefix=f"prepare-{d}"),
                fill_finishing=settings.fill_finishing_batches
                if settings.fill_finishing_batches is not None
                else not d.startswith("cpu"),
            )
            for d in settings.resolved_devices()
        ]
        self.default_group: str | None = registry.default_group(settings)
        self.current_model: str | None = (
            registry.group(self.default_group).models[0].id if self.default_group else None
        )
        #: the current model of each client (its identity key) that switched; requests of other clients that
        #: name no model run on `current_model`, the server's default, which only the administrator changes
        self.client_models: dict[str, str] = {}
        self.ready = False
        self.startup_error: str | None = None
        self.stats: dict[str, float] = dict.fromkeys(
            (
                "submitted",
                "completed",
                "failed",
                "cancelled",
                "engine_batches",
                "merged_batches",
                "engine_rows",
                "engine_seconds",
                "positions",
                "processing_seconds",
                "group_loads",
            ),
            0,
        )
        self._sec_per_row: dict[str, float] = {}  # model id -> EMA of engine seconds per row
        self._waiters: dict[str, list[asyncio.Future[Job]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._batch_ids = itertools.count(1)
        self._serve_seq = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._preloads: dict[str, asyncio.Task[Any]] = {}  # group id -> its load into the CPU cache
        self._resetting = False

    @abstractmethod
    def _schedule(self) -> None:
        """Decide what runs next; called after every change (see `Scheduler._schedule`)."""

    # -- tasks ----------------------------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("scheduler task failed", exc_info=task.exception())

    # -- loaded models -------------------------------------------------------------------------------------------
    def runtime_for(self, model_id: str) -> tuple[GroupRuntime, NLA] | None:
        """A loaded NLA of the model on some device, for checks before queueing (None when not loaded)."""
        for dev in self.devices:
            rt = dev.runtime
            if rt is not None and model_id in rt.nlas:
                return rt, rt.nlas[model_id]
        return None

    # -- endings --------------------------------------------------------------------------------------------------
    def _emit_live(self, job: Job, message: dict[str, Any]) -> None:
        """A handler's message, unless the job ended meanwhile (a cancelled stream stops at once)."""
        if not job.terminal:
            self._emit(job, message)

    def _emit(self, job: Job, message: dict[str, Any]) -> None:
        self.sink.job_event(
            job, {**message, "request_id": job.id, "client_request_id": job.client_request_id}
        )

    def _persist(self, job: Job) -> None:
        self._spawn(self.store.put(job))

    def _finish(
        self, job: Job, status: str, *, result: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        """Make the job terminal now; store it, then tell its listeners and waiters."""
        job.status, job.completed_at, job.result, job.error = status, time.time(), result, error
        self.stats[status] += 1
        if job.started_at is not None:
            self.stats["processing_seconds"] += job.completed_at - job.started_at
        self._spawn(self._announce(job))
        self.sink.queue_changed()

    async def _announce(self, job: Job) -> None:
        try:
            await self.store.put(job)
        except Exception:
            log.exception("storing the end of job %s failed", job.id)
        self.jobs.pop(job.id, None)
        self._emit(job, self.final_message(job))
        for fut in self._waiters.pop(job.id, []):
            if not fut.done():
                fut.set_result(job)

    def final_message(self, job: Job) -> dict[str, Any]:
        """The terminal WebSocket message of a job (also what `subscribe` replays for a finished job)."""
        if job.status == CANCELLED:
            return {"type": "request_cancelled", "message": job.error or "Cancelled"}
        if job.status == FAILED:
            return {"type": "error", "error": job.error or "failed"}
        if job.kind in self.finalizers:
            return self.finalizers[job.kind](job)
        result = job.result or {}
        if job.kind == "switch":
            return {"type": "model_switch_complete", **result}
        if job.kind == "analyze":
            return {
                "type": "result",
                "tokens": result.get("tokens", []),
                "metadata": result.get("metadata", {}),
            }
        return {"type": f"{job.kind}_complete", "result": result}

    async def cancel(self, job_id: str, reason: str = "Cancelled by user") -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            stored = await self.store.get(job_id)
            if stored is None:
                raise UnknownRequest(job_id)
            raise SchedulerError(409, f"request {job_id} is already {stored.status}")
        if job.terminal:
            raise SchedulerError(409, f"request {job_id} is already {job.status}")
        if job.status == QUEUED:
            self.queue.remove(job)
        else:
            for dev in self.devices:
                work = dev.works.pop(job_id, None)
                if work is not None:
                    work.cancelled = True
                    work.prepared = None  # a chunk in flight keeps its own reference until it returns
                    work.rows.clear()
        self._finish(job, CANCELLED, error=reason)
        self._schedule()
        return job
