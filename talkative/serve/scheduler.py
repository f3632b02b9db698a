"""The scheduler: jobs in, engine batches out, one event loop deciding everything.

* **Queue.** Jobs wait in one FIFO. A job is admitted to a device that serves its model's group and has room
  (`MAX_ACTIVE_JOBS` per device); admitted jobs are `processing`.
* **Groups.** Each device holds one group at a time. A job for a group no device holds takes an idle device
  (its group is parked in the CPU cache), or, when every device is busy, marks one device *draining*: it admits
  no new work for its current group, finishes what it runs, then switches. Work already running is never broken
  by a switch, a job never runs on another model than the one it named, and group phases alternate in FIFO order
  so no group starves.
* **Chunks.** An admitted analysis is prepared (tokens, activations) on the device's preparation thread, then
  explained in chunks of positions. A device runs `NUM_WORKERS_PER_GPU` engine batches at once; each batch is led
  by the active job served least recently (round-robin: a short request is not stuck behind a long one) and
  filled with the next chunks of other jobs on the same model with compatible options, up to the model's row
  budget (positions × best_of_k ≤ `auto_batch_size_max`). On a CPU a batch that completes its lead job is filled
  only with parts that complete their jobs too (engine time grows with rows there, so padding it with a long
  job's chunk would only delay the finishing job; on a GPU the extra rows are nearly free):
  `FILL_FINISHING_BATCHES` overrides.
* **Cancellation** is terminal: a queued job leaves the queue, a running one gets no further chunks and the rows
  of its chunk in flight are dropped; nothing partial is kept.

All decisions happen in `_schedule`, a plain function run on the event loop after every change; engine calls,
loads and moves run on threads. Clients hear of changes through an `EventSink` (the WebSocket hub).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import math
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..nla.analysis import (
    AnalysisError,
    Prepared,
    batch_positions,
    check_options,
    metadata,
    prepare,
    run_batch,
)
from ..nla.checkpoint import NLA
from ..nla.options import Resolved, resolve
from .jobs import CANCELLED, COMPLETED, FAILED, PROCESSING, QUEUED, Job, new_id
from .registry import Registry
from .residency import GroupRuntime, Residency
from .settings import Settings
from .store import JobStore

log = logging.getLogger("talkative.serve.scheduler")

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


class _NullMonitor:
    def stage(self, name: str, seconds: float) -> None:
        pass

    def reject(self, reason: str) -> None:
        pass


class _NullSink:
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


class Scheduler:
    def __init__(self, settings: Settings, registry: Registry, residency: Residency, store: JobStore) -> None:
        self.settings = settings
        self.registry = registry
        self.residency = residency
        self.store = store
        self.sink: EventSink = _NullSink()
        self.monitor: Monitor = _NullMonitor()
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

    # -- life cycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._recover()
        self._spawn(self._purge_loop())
        self._spawn(self._watchdog())
        if self.default_group and not self.settings.lazy_load_model:
            self._start_switch(self.devices[0], self.default_group, startup=True)
        else:
            self.ready = True
            self._spawn(self._preload())
        self._schedule()

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for dev in self.devices:
            dev.batch_pool.shutdown(wait=False, cancel_futures=True)
            dev.prep_pool.shutdown(wait=False, cancel_futures=True)

    async def _recover(self) -> None:
        """Jobs a previous process left queued or processing run again, in their original order."""
        for job in await self.store.unfinished():
            if job.attempts >= MAX_ATTEMPTS:
                job.status, job.completed_at = FAILED, time.time()
                job.error = f"the server stopped {job.attempts} times while running this request; giving up"
                await self.store.put(job)
                continue
            job.status, job.started_at, job.progress = QUEUED, None, {}
            if job.model_id is not None and job.model_id not in self.registry.models:
                job.status, job.completed_at = FAILED, time.time()
                job.error = f"model {job.model_id} is no longer configured on this server"
                await self.store.put(job)
                continue
            await self.store.put(job)
            self.jobs[job.id] = job
            self.queue.append(job)
        if self.queue:
            log.info("recovered %d unfinished jobs from %s", len(self.queue), self.store.path)

    async def _purge_loop(self) -> None:
        retention = self.settings.result_retention_days * 86400
        while True:
            try:
                n = await self.store.purge(retention)
                if n:
                    log.info(
                        "purged %d finished jobs older than %g days", n, self.settings.result_retention_days
                    )
            except Exception:
                log.exception("purging old jobs failed")
            await asyncio.sleep(self.settings.purge_interval_seconds)

    async def _preload(self) -> None:
        """Groups whose preload_groups setting is true are loaded into the CPU cache ahead of use."""
        for gid in self.registry.groups:
            if gid == self.default_group or not self.registry.model_setting(
                self.settings, "preload_groups", group_id=gid
            ):
                continue
            if any(d.group_id == gid or d.loading == gid for d in self.devices):
                continue
            try:
                if await asyncio.to_thread(self.residency.preload, gid):
                    log.info("preloaded group %s into the CPU cache", gid)
            except Exception as exc:
                log.error("preloading group %s failed: %s", gid, exc)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("scheduler task failed", exc_info=task.exception())

    # -- submission -----------------------------------------------------------------------------------------------
    def resolve_model(self, model_id: str | None) -> str:
        """The model a request runs on: the one it names, else the current model."""
        if model_id is not None:
            self.registry.model(model_id)  # UnknownModel for the caller to turn into a 404
            return model_id
        if self.current_model is None:
            raise SchedulerError(
                400,
                "no model_id given and this server has no current model: name a model_id or switch to one",
            )
        return self.current_model

    def runtime_for(self, model_id: str) -> tuple[GroupRuntime, NLA] | None:
        """A loaded NLA of the model on some device, for checks before queueing (None when not loaded)."""
        for dev in self.devices:
            rt = dev.runtime
            if rt is not None and model_id in rt.nlas:
                return rt, rt.nlas[model_id]
        return None

    def check_analysis(self, model_id: str, options: dict[str, Any]) -> None:
        """Options the model cannot honour are refused before queueing when the model is loaded (else later)."""
        loaded = self.runtime_for(model_id)
        if loaded is not None:
            rt, nla = loaded
            check_options(nla, resolve(options), rt.tuned.get(model_id))

    async def submit(
        self,
        kind: str,
        request: dict[str, Any],
        *,
        model_id: str,
        client_request_id: str | None = None,
        owner: str | None = None,
        subscriber: Any = None,
    ) -> Job:
        """Store the job, then queue it; the caller acknowledges only after this returns.

        `subscriber` (a WebSocket connection) hears every message about the job, starting with `queued`
        (`group_switch_queued` for a switch that has to wait), so it can never miss one.
        """
        self._admit_check(kind, owner)
        model = self.registry.model(model_id)
        job = Job(
            id=new_id(),
            kind=kind,
            request=request,
            model_id=model_id,
            group_id=model.group_id,
            client_request_id=client_request_id,
            owner=owner,
        )
        await self.store.put(job)
        self.jobs[job.id] = job
        self.queue.append(job)
        self.stats["submitted"] += 1
        if subscriber is not None:
            self.sink.subscribe(job, subscriber)
        job.submitted_position = self.queue_position(job.id)
        if kind != "switch":
            context = "analysis" if kind == "analyze" else kind
            self._emit(
                job,
                {
                    "type": "queued",
                    "context": context,
                    "model_id": model_id,
                    "queue_position": job.submitted_position,
                    "queue_size": self.queue_summary()["queue_size"],
                },
            )
        self.sink.queue_changed()
        self._schedule()
        if kind == "switch" and job.status == QUEUED:
            summary = self.queue_summary()
            position = self.queue_position(job.id) or 1
            self._emit(
                job,
                {
                    "type": "group_switch_queued",
                    "model_id": model_id,
                    "target_group_id": model.group_id,
                    "queue_position": position,
                    "queue_size": summary["queue_size"],
                    "active_requests": summary["processing_requests"],
                    "queued_ahead": position - 1,
                    "message": f"loading group {model.group_id} once the work running on its device has finished",
                },
            )
        return job

    def _admit_check(self, kind: str, owner: str | None) -> None:
        """Backpressure: refuse while draining, beyond MAX_QUEUE_SIZE (429, or 503 before the server is ready)
        and beyond the owner's cap of unfinished jobs (429); switches are never refused for room."""
        refusal: SchedulerError | None = None
        if self.draining:
            refusal = SchedulerError(
                503, "the server is shutting down; retry shortly", reason="draining", retry_after=5
            )
        elif kind != "switch" and len(self.jobs) >= self.settings.max_queue_size:
            status, reason = (429, "queue_full") if self.ready else (503, "not_ready")
            refusal = SchedulerError(
                status,
                f"the server has {len(self.jobs)} requests waiting or running (MAX_QUEUE_SIZE); try later",
                reason=reason,
                retry_after=self.retry_after(),
            )
        elif kind != "switch" and (cap := self.client_cap(owner)) is not None:
            mine = sum(1 for j in self.jobs.values() if j.owner == owner and j.kind != "switch")
            if mine >= cap:
                refusal = SchedulerError(
                    429,
                    f"you have {mine} requests waiting or running, the most one client may have "
                    "(MAX_JOBS_PER_CLIENT); wait for one to finish",
                    reason="client_busy",
                    retry_after=self.retry_after(),
                )
        if refusal is not None:
            self.monitor.reject(refusal.reason or "refused")
            raise refusal

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one job's processing time, 1 to 60."""
        finished = self.stats["completed"] + self.stats["failed"]
        if not finished:
            return 5
        return max(1, min(60, math.ceil(self.stats["processing_seconds"] / finished)))

    async def get(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        return job if job is not None else await self.store.get(job_id)

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Wait until the job is terminal (or the timeout passes) and return it."""
        job = await self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.terminal:
            return job
        fut: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(fut)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return self.jobs.get(job_id, job)

    async def cancel(self, job_id: str, reason: str = "Cancelled by user") -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            stored = await self.store.get(job_id)
            if stored is None:
                raise KeyError(job_id)
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

    # -- queue facts ----------------------------------------------------------------------------------------------
    def queue_position(self, job_id: str) -> int | None:
        for i, job in enumerate(self.queue):
            if job.id == job_id:
                return i + 1
        return None

    def queue_summary(self) -> dict[str, int]:
        queued = len(self.queue)
        processing = sum(1 for j in self.jobs.values() if j.status == PROCESSING)
        return {
            "queue_size": queued + processing,
            "queued_requests": queued,
            "processing_requests": processing,
            "total_active": queued + processing,
        }

    def is_switching(self) -> bool:
        return any(d.loading for d in self.devices)

    def loaded_groups(self) -> dict[str, str]:
        """group id -> device, for groups resident on a device."""
        return {d.group_id: d.name for d in self.devices if d.group_id is not None}

    # -- the decision function ------------------------------------------------------------------------------------
    def _schedule(self) -> None:
        if self._stopping or self.draining or self._loop is None:
            return
        if self._resetting:  # a reset drains the devices: admitted work runs to its end, nothing new starts
            for dev in self.devices:
                self._dispatch(dev)
            return
        self._route_queue()
        for dev in self.devices:
            self._dispatch(dev)
            if dev.draining_for is not None and not any(j.group_id == dev.draining_for for j in self.queue):
                dev.draining_for = None  # whoever waited for it was cancelled
            if dev.draining_for is not None and not dev.busy:
                self._start_switch(dev, dev.draining_for)

    def _route_queue(self) -> None:
        waiting: set[str | None] = set()  # groups with an older job still waiting: keep FIFO inside a group
        for job in list(self.queue):
            gid = job.group_id
            assert gid is not None  # every submitted job names a model, hence a group
            if gid in waiting:
                continue
            dev = self._device_for(gid)
            if dev is not None:
                self._admit(job, dev)
                continue
            waiting.add(gid)
            if gid in self._preloads:
                continue  # it is being loaded into the CPU cache; switching to it then is a move
            if any(d.loading == gid or d.draining_for == gid for d in self.devices):
                continue
            idle = [d for d in self.devices if not d.busy and d.draining_for is None]
            if idle:
                self._start_switch(min(idle, key=lambda d: (d.runtime is not None, d.last_used)), gid)
                continue
            if any(d.group_id == gid for d in self.devices):
                continue  # its group is being served, just full; no switch needed
            candidates = [d for d in self.devices if d.draining_for is None and d.loading is None]
            if candidates:
                dev = min(candidates, key=self._remaining_rows)
                dev.draining_for = gid
                log.info("device %s drains group %s to switch to %s", dev.name, dev.group_id, gid)

    def _device_for(self, gid: str | None) -> DeviceState | None:
        fits = [
            d
            for d in self.devices
            if d.group_id == gid
            and d.loading is None
            and d.draining_for is None
            and len(d.works) + len(d.whole) < self.settings.max_active_jobs
        ]
        return min(fits, key=lambda d: len(d.works) + len(d.whole)) if fits else None

    @staticmethod
    def _remaining_rows(dev: DeviceState) -> int:
        return sum((len(w.pending) + w.inflight) * w.resolved.best_of_k for w in dev.works.values())

    def _admit(self, job: Job, dev: DeviceState) -> None:
        self.queue.remove(job)
        job.status, job.started_at = PROCESSING, time.time()
        job.attempts += 1
        dev.last_used = time.time()
        assert dev.runtime is not None
        if job.kind == "switch":
            self._complete_switch(job, dev.runtime)
        elif job.kind == "analyze":
            self._persist(job)
            self._start_analysis(job, dev)
        elif job.kind in self.handlers:
            self._persist(job)
            dev.whole.add(job.id)
            self._spawn(self._run_whole(job, dev, dev.runtime, self.handlers[job.kind]))
        else:
            self._finish(job, FAILED, error=f"this server cannot run {job.kind} requests")
        self.sink.queue_changed()

    # -- switching ------------------------------------------------------------------------------------------------
    def _start_switch(self, dev: DeviceState, gid: str, *, startup: bool = False) -> None:
        dev.loading, dev.draining_for = gid, None
        source = dev.group_id
        self.sink.broadcast(
            {
                "type": "group_switch_status",
                "status": "starting",
                "group_id": gid,
                "source_group_id": source,
                "device": dev.name,
            }
        )
        self._spawn(self._switch(dev, gid, startup))

    async def _switch(self, dev: DeviceState, gid: str, startup: bool) -> None:
        old, dev.runtime = dev.runtime, None
        t0 = time.perf_counter()

        restored: list[GroupRuntime] = []

        def work() -> GroupRuntime:
            if old is not None:
                self.residency.release(old)
            try:
                return self.residency.acquire(gid, dev.name)
            except Exception:
                if old is not None:  # the previous group goes back (from the CPU cache) and keeps serving
                    try:
                        restored.append(self.residency.acquire(old.group_id, dev.name))
                    except Exception as again:
                        log.error(
                            "bringing group %s back on %s failed too: %s", old.group_id, dev.name, again
                        )
                raise

        try:
            dev.runtime = await asyncio.to_thread(work)
        except Exception as exc:
            dev.runtime = restored[0] if restored else None
            log.error("loading group %s on %s failed: %s", gid, dev.name, exc)
            message = f"model group {gid} could not be loaded: {exc}"
            if startup:
                self.startup_error = message
            self.sink.broadcast(
                {
                    "type": "group_switch_status",
                    "status": "failed",
                    "group_id": gid,
                    "device": dev.name,
                    "error": message,
                }
            )
            for job in [j for j in self.queue if j.group_id == gid]:
                self.queue.remove(job)
                self._finish(job, FAILED, error=message)
        else:
            self.stats["group_loads"] += 1
            self.sink.broadcast(
                {
                    "type": "group_switch_status",
                    "status": "completed",
                    "group_id": gid,
                    "device": dev.name,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
        finally:
            dev.loading = None
            dev.last_used = time.time()
            if startup:
                self.ready = True
                self._spawn(self._preload())
            self._schedule()

    def model_info(self, model_id: str) -> dict[str, Any]:
        m = self.registry.model(model_id)
        return {
            "model_id": m.id,
            "group_id": m.group_id,
            "display_name": m.name,
            "layer": m.layer,
            "auto_batch_size_max": self.registry.model_setting(
                self.settings, "auto_batch_size_max", model_id=m.id
            ),
            "is_loaded": self.runtime_for(m.id) is not None,
            "generation_config": m.generation_config,
        }

    def _complete_switch(self, job: Job, rt: GroupRuntime) -> None:
        assert job.model_id is not None
        if job.model_id not in rt.nlas:
            self._finish(
                job, FAILED, error=rt.errors.get(job.model_id, f"model {job.model_id} is not loaded")
            )
            return
        previous = self.registry.models.get(self.current_model or "")
        self.current_model = job.model_id
        switched = previous is None or previous.group_id != job.group_id
        result = {
            "model_id": job.model_id,
            "group_id": job.group_id,
            "message": f"{job.model_id} is now the current model"
            + (f" (group {job.group_id} loaded)" if switched else ""),
            "group_switched": switched,
            "model_info": self.model_info(job.model_id),
        }
        self._finish(job, COMPLETED, result=result)

    # -- analysis: prepare ----------------------------------------------------------------------------------------
    def _budget(self, model_id: str) -> int:
        return int(self.registry.model_setting(self.settings, "auto_batch_size_max", model_id=model_id))

    def _start_analysis(self, job: Job, dev: DeviceState) -> None:
        assert job.model_id is not None
        options = dict(job.request.get("options") or {})
        if "no_kl" not in options and self.registry.model_setting(
            self.settings, "no_kl", model_id=job.model_id
        ):
            options["no_kl"] = True  # the model's no_kl setting is the default when a request does not say
        resolved = resolve(options)
        key = (job.model_id, resolved.merge_key(), resolved.structured, resolved.return_vectors)
        work = Work(job=job, device=dev, resolved=resolved, key=key, last_served=0)
        dev.works[job.id] = work
        self._spawn(self._prepare(work))

    async def _prepare(self, work: Work) -> None:
        dev, job = work.device, work.job
        rt = dev.runtime
        assert rt is not None and job.model_id is not None
        dev.preparing += 1
        self._progress(work, STAGE_PREPARING, "Preparing the input (tokens and activations)")
        try:
            nla = rt.nlas.get(job.model_id)
            if nla is None:
                raise AnalysisError(rt.errors.get(job.model_id, f"model {job.model_id} is not loaded"))
            tuned = rt.tuned.get(job.model_id)
            req = job.request
            prepared = await asyncio.get_running_loop().run_in_executor(
                dev.prep_pool, self._prepare_sync, nla, req, work.resolved, tuned
            )
        except AnalysisError as exc:
            self._fail_work(work, str(exc))
        except Exception as exc:
            log.exception("preparing %s failed", job.id)
            self._fail_work(work, engine_failure(exc, "preparing the input", dev.name))
        else:
            extract = getattr(prepared, "extract_seconds", None)
            if extract is not None:
                self.monitor.stage("extract", extract)
            if not work.cancelled and not job.terminal:
                work.prepared = prepared
                work.pending = list(prepared.positions)
                work.total = len(work.pending)
                work.chunk = self._chunk_size(job.model_id, nla, work.resolved)
                work.num_batches = math.ceil(work.total / work.chunk)
                if work.total == 0:
                    self._complete_work(work, nla)
        finally:
            dev.preparing -= 1
            self._schedule()

    def _prepare_sync(self, nla: NLA, req: dict[str, Any], opts: Resolved, tuned: Any) -> Prepared:
        check_options(nla, opts, tuned)
        return prepare(
            nla,
            text=req.get("text"),
            messages=req.get("messages"),
            options=opts,
            max_tokens=self.settings.max_tokens,
        )

    def _chunk_size(self, model_id: str, nla: NLA, opts: Resolved) -> int:
        """Positions per chunk: the request's batch_size, else the model's, else what the row budget allows."""
        budget = self._budget(model_id)
        cap = max(1, budget // max(opts.best_of_k, 1))
        size = opts.batch_size or self.registry.model_setting(self.settings, "batch_size", model_id=model_id)
        return min(size or batch_positions(nla, opts, budget), cap)

    # -- analysis: chunks -----------------------------------------------------------------------------------------
    def _take(self, work: Work, n: int) -> list[int]:
        chunk, work.pending = work.pending[:n], work.pending[n:]
        work.last_served = next(self._serve_seq)
        return chunk

    def _dispatch(self, dev: DeviceState) -> None:
        rt = dev.runtime
        if rt is None or dev.loading is not None:
            return
        self._expire(dev)
        while dev.inflight < dev.slots:
            ready = [
                w for w in dev.works.values() if w.prepared is not None and w.pending and not w.cancelled
            ]
            if not ready:
                return
            order = sorted(ready, key=lambda w: (w.last_served, w.job.created_at))
            lead = order[0]
            assert lead.job.model_id is not None
            budget = self._budget(lead.job.model_id)
            k = lead.resolved.best_of_k
            # a batch that completes its lead takes on a CPU only parts that complete their jobs too
            only_whole = len(lead.pending) <= lead.chunk and not dev.fill_finishing
            parts = [(lead, self._take(lead, lead.chunk))]
            rows = len(parts[0][1]) * k
            for other in order[1:]:
                room = (budget - rows) // k
                if room <= 0:
                    break
                if other.key == lead.key and not (only_whole and len(other.pending) > min(other.chunk, room)):
                    part = self._take(other, min(other.chunk, room))
                    parts.append((other, part))
                    rows += len(part) * k
            dev.inflight += 1
            self._spawn(self._run_batch(dev, rt, parts))

    def _expire(self, dev: DeviceState) -> None:
        limit = self.settings.request_timeout
        if not limit:
            return
        now = time.time()
        message = f"the request took longer than REQUEST_TIMEOUT ({limit:g} s) and was stopped"
        for work in list(dev.works.values()):
            started = work.job.started_at
            if started is not None and now - started > limit:
                log.warning("job %s exceeded REQUEST_TIMEOUT on %s", work.job.id, dev.name)
                self._fail_work(work, message)
        for job_id in list(dev.whole):
            job = self.jobs.get(job_id)
            if job is not None and not job.terminal and job.started_at and now - job.started_at > limit:
                log.warning("job %s exceeded REQUEST_TIMEOUT on %s", job.id, dev.name)
                dev.whole.discard(job_id)  # its handler sees ctx.cancelled() and stops; the slot frees
                self._finish(job, FAILED, error=message)

    async def _watchdog(self) -> None:
        """REQUEST_TIMEOUT checked every second, not only between chunks: an engine call that never returns
        wakes nobody, yet its job must still fail on time (the thread itself cannot be killed)."""
        while True:
            await asyncio.sleep(1.0)
            if self.settings.request_timeout and not self._stopping:
                for dev in self.devices:
                    self._expire(dev)
                self._schedule()

    async def _run_batch(
        self, dev: DeviceState, rt: GroupRuntime, parts: list[tuple[Work, list[int]]]
    ) -> None:
        bid = next(self._batch_ids)
        lead = parts[0][0]
        assert lead.job.model_id is not None
        nla = rt.nlas[lead.job.model_id]
        tuned = rt.tuned.get(lead.job.model_id)
        now = time.time()
        for work, _pos in parts:
            work.inflight += 1
            if work.first_chunk_at is None:
                work.first_chunk_at = now
            self._progress(
                work,
                STAGE_EXPLAINING,
                f"Processing batch {work.chunks_started + 1}/{work.num_batches}",
                batch_idx=work.chunks_started,
            )
            work.chunks_started += 1
        inputs = [(w.prepared, pos) for w, pos in parts]
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            outs = await asyncio.get_running_loop().run_in_executor(
                dev.batch_pool, _engine_batch, nla, inputs, lead.resolved, tuned, timings
            )
        except Exception as exc:  # the executor itself failed (shutdown): every part fails alike
            outs = [exc] * len(parts)
        finally:
            dev.inflight -= 1
        seconds = time.perf_counter() - t0
        n_rows = sum(len(pos) for _w, pos in parts) * lead.resolved.best_of_k
        self._record_batch(lead.job.model_id, n_rows, seconds, merged=len(parts) > 1)
        for name, value in timings.items():
            self.monitor.stage(name, value)
        for (work, pos), out in zip(parts, outs, strict=True):
            work.inflight -= 1
            if work.cancelled or work.job.terminal:
                continue
            if isinstance(out, BaseException):
                if isinstance(out, AnalysisError):
                    self._fail_work(work, str(out))
                else:
                    log.error("engine batch %d failed for %s: %r", bid, work.job.id, out)
                    self._fail_work(work, engine_failure(out, "explaining", dev.name))
                continue
            for row in out:
                work.rows[row["position"]] = row
            work.done += len(pos)
            work.batches.append(bid)
            work.merged += len(parts) > 1
            for name, value in timings.items():
                work.timings[name] = work.timings.get(name, 0.0) + value
            if work.done >= work.total and not work.pending and work.inflight == 0:
                self._complete_work(work, nla)
        self._schedule()

    def _record_batch(self, model_id: str, rows: int, seconds: float, *, merged: bool) -> None:
        self.stats["engine_batches"] += 1
        self.stats["merged_batches"] += merged
        self.stats["engine_rows"] += rows
        self.stats["engine_seconds"] += seconds
        per_row = seconds / max(rows, 1)
        old = self._sec_per_row.get(model_id)
        self._sec_per_row[model_id] = per_row if old is None else 0.7 * old + 0.3 * per_row

    def _eta(self, work: Work) -> float | None:
        remaining = work.total - work.done
        if work.done and work.first_chunk_at is not None:
            return round((time.time() - work.first_chunk_at) / work.done * remaining, 1)
        rate = self._sec_per_row.get(work.job.model_id or "")
        return None if rate is None else round(rate * remaining * work.resolved.best_of_k, 1)

    def _progress(self, work: Work, stage: str, message: str, *, batch_idx: int = 0) -> None:
        job = work.job
        prepared = work.prepared is not None
        job.progress = {
            "stage": stage,
            "message": message,
            "batch_idx": batch_idx,
            "num_batches": work.num_batches if prepared else None,
            "done_positions": work.done,
            "total_positions": work.total if prepared else None,
            "eta_seconds": self._eta(work) if prepared else None,
            "device": work.device.name,
        }
        self._emit(job, {"type": "processing", **job.progress})

    def _complete_work(self, work: Work, nla: NLA) -> None:
        job, prep = work.job, work.prepared
        assert prep is not None
        work.device.works.pop(job.id, None)
        rows = [work.rows[p] for p in prep.positions]
        seconds = time.time() - (job.started_at or job.created_at)
        meta = metadata(nla, prep, work.resolved, work.chunk, work.timings, seconds, rows)
        meta.update(
            {
                "model_id": job.model_id,
                "group_id": job.group_id,
                "device": work.device.name,
                "queue_seconds": round((job.started_at or job.created_at) - job.created_at, 3),
                "engine_batches": work.batches,
                "merged_batches": work.merged,
            }
        )
        self.stats["positions"] += len(rows)
        self._finish(job, COMPLETED, result={"tokens": rows, "metadata": meta})

    def _fail_work(self, work: Work, error: str) -> None:
        work.cancelled = True
        work.device.works.pop(work.job.id, None)
        work.prepared = None
        if not work.job.terminal:
            self._finish(work.job, FAILED, error=error)

    # -- whole jobs (kinds with a registered handler) ----------------------------------------------------------------
    async def _run_whole(self, job: Job, dev: DeviceState, rt: GroupRuntime, handler: JobHandler) -> None:
        loop = asyncio.get_running_loop()
        assert job.model_id is not None
        dev.inflight += 1

        def emit(message: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(self._emit_live, job, message)

        try:
            nla = rt.nlas.get(job.model_id)
            if nla is None:
                raise AnalysisError(rt.errors.get(job.model_id, f"model {job.model_id} is not loaded"))
            ctx = JobContext(
                job=job,
                nla=nla,
                runtime=rt,
                device=dev.name,
                emit=emit,
                cancelled=lambda: job.terminal,
            )
            result = await loop.run_in_executor(dev.batch_pool, handler, ctx)
        except AnalysisError as exc:
            if not job.terminal:
                self._finish(job, FAILED, error=str(exc))
        except Exception as exc:
            log.exception("%s job %s failed", job.kind, job.id)
            if not job.terminal:
                self._finish(
                    job, FAILED, error=engine_failure(exc, f"running the {job.kind} request", dev.name)
                )
        else:
            if not job.terminal:
                self._finish(job, COMPLETED, result=result)
        finally:
            dev.inflight -= 1
            dev.whole.discard(job.id)
            self._schedule()

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

    # -- preload and reset (issue 5: /api/v2/groups/{id}/preload, /reset) ---------------------------------------------
    async def preload(self, group_id: str) -> str:
        """Load a group into the CPU cache ahead of use, so a switch to it is a move, not a load; where it is."""
        self.registry.group(group_id)  # UnknownGroup for the caller
        for dev in self.devices:
            if dev.group_id == group_id or dev.loading == group_id:
                return dev.name
        if group_id in self.residency.cached_groups():
            return "cpu_cache"
        if self.residency.capacity <= 0:
            raise SchedulerError(
                409, "the CPU cache is disabled (MAX_CPU_CACHED_MODELS=0): nothing can be preloaded"
            )
        task = self._preloads.get(group_id)
        if task is None:
            task = self._spawn(self._preload_group(group_id))
            self._preloads[group_id] = task
        loaded: bool = await asyncio.shield(task)
        if not loaded:
            raise SchedulerError(
                409,
                f"the CPU cache is full ({', '.join(self.residency.cached_groups())}; capacity "
                f"{self.residency.capacity}): switch to a group or raise MAX_CPU_CACHED_MODELS",
            )
        return "cpu_cache"

    async def _preload_group(self, group_id: str) -> bool:
        try:
            return await asyncio.to_thread(self.residency.preload, group_id)
        finally:
            self._preloads.pop(group_id, None)
            self._schedule()

    async def reset(self, drain_seconds: float = 30.0, stop_seconds: float = 120.0) -> dict[str, Any]:
        """Unload every group (devices and CPU cache) and load the default group again; queued jobs stay queued.

        Running work gets `drain_seconds` to finish (nothing new starts meanwhile); what still runs then is
        cancelled, and the reset waits up to `stop_seconds` for it to stop before giving up with a 503.
        """
        if self._resetting:
            raise SchedulerError(409, "a reset is already running")
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        self._resetting = True
        cancelled: list[str] = []
        try:
            deadline, forced = loop.time() + drain_seconds, False
            while any(d.busy for d in self.devices) or self._preloads:
                if loop.time() >= deadline:
                    if forced:
                        raise SchedulerError(503, "running work did not stop; the reset was abandoned")
                    forced = True
                    for job in [j for j in self.jobs.values() if j.status == PROCESSING]:
                        await self.cancel(
                            job.id, reason="cancelled: the server was reset by an administrator"
                        )
                        cancelled.append(job.id)
                    deadline = loop.time() + stop_seconds
                await asyncio.sleep(0.05)
            runtimes = [d.runtime for d in self.devices if d.runtime is not None]
            for dev in self.devices:
                dev.runtime, dev.draining_for = None, None
            unloaded = await asyncio.to_thread(self.residency.unload_all, runtimes)
            del runtimes
            loaded = None
            if self.default_group is not None:
                dev = self.devices[0]
                self._start_switch(dev, self.default_group)
                while dev.loading is not None:
                    await asyncio.sleep(0.05)
                if dev.group_id != self.default_group:
                    raise SchedulerError(
                        503, f"the default group {self.default_group} could not be loaded again"
                    )
                loaded = self.default_group
                self.current_model = self.registry.group(self.default_group).models[0].id
        finally:
            self._resetting = False
            self._schedule()
        return {
            "unloaded_groups": unloaded,
            "loaded_group": loaded,
            "current_model": self.current_model,
            "cancelled_requests": cancelled,
            "queued_requests": len(self.queue),
            "seconds": round(time.perf_counter() - t0, 3),
        }


def engine_failure(exc: BaseException, doing: str, device: str) -> str:
    """The error of a job whose engine call raised: running out of memory says so, and what to try instead."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return (
            f"out of memory on {device} while {doing}: retry with a smaller batch_size or best_of_k, "
            "or a shorter input"
        )
    return f"internal error while {doing}: {exc}"


def _engine_batch(
    nla: NLA,
    inputs: list[tuple[Prepared | None, list[int]]],
    opts: Resolved,
    tuned: Any,
    timings: dict[str, float],
) -> list[list[dict[str, Any]] | BaseException]:
    """One engine batch on a worker thread; if a merged batch fails, each part is retried alone so a bad part
    fails only its own job."""
    parts = [(p, pos) for p, pos in inputs if p is not None]
    if len(parts) == len(inputs):
        try:
            return list(run_batch(nla, parts, opts, tuned=tuned, timings=timings))
        except Exception as exc:
            if len(inputs) == 1:
                return [exc]
            log.warning(
                "a merged engine batch failed (%s); running its %d parts one by one", exc, len(inputs)
            )
    out: list[list[dict[str, Any]] | BaseException] = []
    for p, pos in inputs:
        if p is None:
            out.append(AnalysisError("cancelled"))
            continue
        try:
            out.append(run_batch(nla, [(p, pos)], opts, tuned=tuned, timings=timings)[0])
        except Exception as exc:
            out.append(exc)
    return out
