"""The scheduler: jobs in, decisions out, one event loop applying them.

Every change (a submission, a batch ending, a group loaded, a cancellation) ends in `schedule`, a plain function
on the event loop: it takes a snapshot of the queue and the devices, asks the scheduling policy
(`policy.py`: admit, switch, drain, fill a batch) and carries the decisions out — admitted jobs start through
their kind (`jobs/kinds.py`), switches and loads through the device's worker (`workers.py`). The scheduler never
calls the engine or moves weights itself; everything that blocks runs on a worker's threads.

* **Jobs** wait in one FIFO (`JobQueue`), are admitted (`processing`) to a device, and end `completed`, `failed`
  or `cancelled`; every change is stored before clients hear of it, and jobs a previous process left unfinished
  run again at start, in their order.
* **Backpressure**: no admissions while draining; beyond `MAX_QUEUE_SIZE` a 429 (503 before the server is ready);
  beyond a client's cap of unfinished jobs a 429.
* **Switches**: a `switch` job changes a client's current model (or the server's default) once a device holds
  the model's group; a client's repeated switches replace each other in the queue. The choices are kept in the
  store (`jobs/choices.py`), so every replica sharing it resolves a request the same way; a process that owns its
  store forgets them at start, as it forgot them in memory.
* **Cancellation** is terminal: a queued job leaves the queue, a running one gets no further chunks and the rows
  of its chunk in flight are dropped; nothing partial is kept.
* **REQUEST_TIMEOUT** is checked whenever a device dispatches and every second (a stuck engine call wakes
  nobody, yet its job must fail on time).
* **Several replicas on one store** (`leases`, an ingress replica of a cluster): this scheduler runs the jobs it
  claimed (`leases.py`), renews their leases, hands over those another runner took, cancels those a client asked
  any replica to cancel, and adopts the jobs of runners that died (instead of running every unfinished job at
  start, which would run the live replicas' jobs twice). A job another replica runs is *followed*: its listeners
  and waiters here hear its end, read from the store (`FOLLOW_SECONDS`), once.

Clients hear of changes through an `EventSink` (the WebSocket hub, wrapped by the token logs and the metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ...nla.options import resolve
from ..catalog.registry import Registry
from ..jobs.batches import is_batch_item
from ..jobs.choices import ModelChoices
from ..jobs.kinds import SWITCH, JobKind, final_message
from ..jobs.record import CANCELLED, COMPLETED, FAILED, PROCESSING, QUEUED, Job, UnknownRequest, new_id
from ..jobs.store import JobStore
from ..settings import Settings
from .leases import Leases
from .policy import (
    Admit,
    Decision,
    DeviceView,
    Drain,
    QueuedJob,
    SchedulingPolicy,
    Snapshot,
    StopDraining,
    Switch,
)
from .queue import JobQueue
from .types import MAX_ATTEMPTS, DeviceState, EventSink, Monitor, SchedulerError
from .workers import Loaded, LoadFailed, Worker

log = logging.getLogger("talkative.serve.scheduling.scheduler")

#: how often a job another replica runs is read from the store while someone here follows it: polling works on
#: every store (SQLite has no notifications), and one indexed read per followed job every half second is cheap
FOLLOW_SECONDS = 0.5
#: the reason stored for a cancellation asked on another replica (the store carries the request, not its words)
REMOTE_CANCEL_REASON = "Cancelled by user"

STAT_NAMES = (
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
)


class Scheduler:
    """The queue, the devices and the decisions; every object it uses is given to it here."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        store: JobStore,
        *,
        workers: Sequence[Worker],
        kinds: Sequence[JobKind],
        queue: JobQueue,
        sink: EventSink,
        monitor: Monitor,
        policy: SchedulingPolicy,
        client_cap: Callable[[str | None], int | None],
        choices: ModelChoices,
        leases: Leases | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.sink = sink
        self.monitor = monitor
        self.policy = policy
        #: queued plus running jobs an owner may have (None = no cap), from the access policy
        self.client_cap = client_cap
        self.kinds: dict[str, JobKind] = {name: kind for kind in kinds for name in kind.names}
        self._kind_list = list(dict.fromkeys(kinds))  # each kind once, in the order given
        self.book = queue
        self.devices = [
            DeviceState(
                name=w.name,
                slots=settings.num_workers_per_gpu,
                worker=w,
                fill_finishing=settings.fill_finishing_batches
                if settings.fill_finishing_batches is not None
                else not w.name.startswith("cpu"),
            )
            for w in workers
        ]
        self.draining = False  # shutting down: no admissions, no new engine batches, no submissions
        self.default_group: str | None = registry.default_group(settings)
        #: the server's default before any administrator's switch: the default group's first model
        self.configured_model: str | None = (
            registry.group(self.default_group).models[0].id if self.default_group else None
        )
        #: the current model of each client (its identity key) that switched, and the server's default that only
        #: the administrator changes (requests of clients that never switched run on it), in the store
        self.choices = choices
        self.ready = False
        self.startup_error: str | None = None
        self.stats: dict[str, float] = dict.fromkeys(STAT_NAMES, 0)
        self.stopping = False
        self._waiters: dict[str, list[asyncio.Future[Job]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._preloads: dict[str, asyncio.Task[Any]] = {}  # group id -> its load into the CPU cache
        self._resetting = False
        #: None: this process owns the store; else this replica's hold on the jobs it runs in a shared store
        self.leases = leases
        #: job id -> when (monotonic) this runner claimed it, for the jobs it holds
        self._held: dict[str, float] = {}
        self._followers: dict[str, asyncio.Task[Any]] = {}  # job id -> its reader, for jobs run elsewhere

    @property
    def queue(self) -> list[Job]:
        """The queued jobs, oldest first."""
        return self.book.waiting

    @property
    def jobs(self) -> dict[str, Job]:
        """Every job not yet stored as terminal."""
        return self.book.jobs

    @property
    def host(self) -> Worker:
        """The worker that answers for the host's CPU cache (every local worker shares it)."""
        return self.devices[0].worker

    # -- life cycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.leases is None:
            await self.choices.clear()  # this process owns the store: a restart starts every client afresh
            await self._recover()
        else:
            self.spawn(self._keep_leases())
        self.spawn(self._purge_loop())
        self.spawn(self._watchdog())
        if self.default_group and not self.settings.lazy_load_model:
            self._start_switch(self.devices[0], self.default_group, startup=True)
        else:
            self.ready = True
            self.spawn(self._preload_configured())
        self.schedule()

    async def stop(self) -> None:
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.leases is not None:  # what this replica leaves unfinished is adoptable at once
            for job_id in list(self._held):
                with contextlib.suppress(Exception):
                    await self.leases.release(job_id)
            self._held.clear()
        for dev in self.devices:
            dev.worker.close()

    async def _recover(self) -> None:
        """Jobs a previous process left queued or processing run again, in their original order."""
        for job in await self.store.unfinished():
            await self._requeue(job)
        if self.queue:
            log.info("recovered %d unfinished jobs from %s", len(self.queue), self.store.path)

    async def _requeue(self, job: Job) -> bool:
        """Queue again a job a previous runner left unfinished (whether it was queued); it fails instead when it
        stopped its runners MAX_ATTEMPTS times or names a model no longer configured."""
        if job.attempts >= MAX_ATTEMPTS:
            job.status, job.completed_at = FAILED, time.time()
            job.error = f"the server stopped {job.attempts} times while running this request; giving up"
            await self._store_end(job)
            return False
        job.status, job.started_at, job.progress = QUEUED, None, {}
        if job.model_id is not None and job.model_id not in self.registry.models:
            job.status, job.completed_at = FAILED, time.time()
            job.error = f"model {job.model_id} is no longer configured on this server"
            await self._store_end(job)
            return False
        await self.store.put(job)
        self.jobs[job.id] = job
        self.queue.append(job)
        return True

    async def _store_end(self, job: Job) -> bool:
        """Write a terminal job: once, and only while this runner holds it, when replicas share the store.
        False when another runner took it over (or it had already ended): then its stored end stands."""
        if self.leases is not None and self._held.pop(job.id, None) is not None:
            return await self.leases.finish(job)
        await self.store.put(job)
        return True

    # -- leases: several replicas on one store ----------------------------------------------------------------------
    async def _keep_leases(self) -> None:
        assert self.leases is not None
        while True:
            try:
                await self._renew_and_adopt(self.leases)
            except Exception:
                log.exception("renewing leases or adopting jobs failed; retrying")
            await asyncio.sleep(self.leases.interval)

    async def _renew_and_adopt(self, leases: Leases) -> None:
        """Renew this runner's leases; give up the jobs another runner took over; cancel those someone asked to
        cancel on any replica; then claim and queue the jobs of runners that stopped renewing."""
        asked = time.monotonic()
        renewal = await leases.renew()
        held = set(renewal.held)
        for job_id in [j for j, at in self._held.items() if j not in held and at < asked]:
            self._relinquish(job_id)
        for job_id in renewal.cancel_requested:
            job = self.jobs.get(job_id)
            if job is not None and not job.terminal:
                with contextlib.suppress(SchedulerError):
                    await self.cancel(job_id, REMOTE_CANCEL_REASON)
        if self.draining or self.stopping:
            return
        adopted = 0
        for job in await leases.adoptable():
            if job.id in self.jobs or not await leases.claim(job.id):
                continue  # another replica was quicker
            self._held[job.id] = time.monotonic()
            if await self._requeue(job):
                adopted += 1
        if adopted:
            log.info("adopted %d jobs whose runner stopped renewing its leases", adopted)
            self.sink.queue_changed()
            self.schedule()

    def _relinquish(self, job_id: str) -> None:
        """Another runner holds this job now (this one was too slow to renew): stop it here without writing
        anything, and follow it through the store so its listeners here still hear its end."""
        self._held.pop(job_id, None)
        self._follow(job_id)  # also when its kind already let it go: its listeners here still hear its end
        job = self.jobs.pop(job_id, None)
        if job is None:
            return
        log.warning("job %s was taken over by another runner; stopping it here", job_id)
        if job in self.queue:
            self.queue.remove(job)
        elif (kind := self.kinds.get(job.kind)) is not None:
            for dev in self.devices:
                kind.drop(job_id, dev)
        self.sink.queue_changed()
        self.schedule()

    # -- following jobs another replica runs ----------------------------------------------------------------------
    def follow(self, job: Job, subscriber: Any) -> None:
        """`subscriber` hears the job's messages from now on: from this scheduler when it runs the job, else its
        end, read from the store once the replica running it has written it."""
        self.sink.subscribe(job, subscriber)
        if not job.terminal and job.id not in self.jobs:
            self._follow(job.id)

    def _follow(self, job_id: str) -> None:
        if job_id not in self._followers and self._loop is not None:
            self._followers[job_id] = self.spawn(self._read_until_end(job_id))

    async def _read_until_end(self, job_id: str) -> None:
        try:
            while True:
                await asyncio.sleep(FOLLOW_SECONDS)
                if job_id in self.jobs:
                    return  # adopted by this runner meanwhile: it announces the end itself
                job = await self.store.get(job_id)
                if job is None or job.terminal:
                    break
            if job is not None:  # not observed as this replica's work: the runner's metrics count it
                self.sink.relay(job, self._addressed(job, self.final_message(job)))
            for fut in self._waiters.pop(job_id, []):
                if fut.done():
                    continue
                if job is None:
                    fut.set_exception(UnknownRequest(job_id))  # deleted meanwhile
                else:
                    fut.set_result(job)
        finally:
            self._followers.pop(job_id, None)

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

    async def _watchdog(self) -> None:
        """REQUEST_TIMEOUT checked every second, not only between chunks: an engine call that never returns
        wakes nobody, yet its job must still fail on time (the thread itself cannot be killed)."""
        while True:
            await asyncio.sleep(1.0)
            if self.settings.request_timeout and not self.stopping:
                for dev in self.devices:
                    self._expire(dev)
                self.schedule()

    # -- tasks (also for the kinds: `jobs.kinds.JobControl`) ------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("scheduler task failed", exc_info=task.exception())

    # -- submission -----------------------------------------------------------------------------------------------
    async def resolve_model(self, model_id: str | None, client: str | None = None) -> str:
        """The model a request runs on: the one it names, else its client's current model (one store read)."""
        if model_id is not None:
            self.registry.model(model_id)  # UnknownModel for the caller to turn into a 404
            return model_id
        current = await self.current_for(client)
        if current is None:
            raise SchedulerError(
                400,
                "no model_id given and this server has no current model: name a model_id or switch to one",
            )
        return current

    async def current_for(self, client: str | None) -> str | None:
        """A client's current model: the one it last switched to, else the server's default. One client's
        switch never changes what another client's requests run on."""
        return (await self.current_choice(client))[0]

    async def current_choice(self, client: str | None) -> tuple[str | None, str | None]:
        """(the client's current model, its own choice or None), read in one query. A stored model no longer
        configured counts as no choice."""
        chosen = await self.choices.read(client)
        own = chosen.own if chosen.own in self.registry.models else None
        server = chosen.server if chosen.server in self.registry.models else self.configured_model
        return (own if own is not None else server), own

    async def server_model(self) -> str | None:
        """The server's default: the administrator's last switch, else the configured default."""
        return await self.current_for(None)

    async def check_analysis(self, model_id: str, options: dict[str, Any]) -> None:
        """Options the model cannot honour are refused (`AnalysisError`) before queueing when a device holds the
        model (else when the job is prepared). The check tokenizes prompt pieces: the worker does it."""
        resolved = resolve(options)
        for dev in self.devices:
            if dev.loaded is not None and model_id in dev.loaded.models:
                await dev.worker.check(model_id, resolved)
                return

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
        self._admit_check(owner)
        job = self._new_job(kind, request, model_id, client_request_id, owner)
        await self.store.put(job)
        if self.leases is not None and await self.leases.claim(job.id):
            self._held[job.id] = time.monotonic()
        self.jobs[job.id] = job
        self.queue.append(job)
        self.stats["submitted"] += 1
        if subscriber is not None:
            self.sink.subscribe(job, subscriber)
        job.submitted_position = self.queue_position(job.id)
        if kind != SWITCH:
            self.emit(
                job,
                {
                    "type": "queued",
                    "context": "analysis" if kind == "analyze" else kind,
                    "model_id": model_id,
                    "queue_position": job.submitted_position,
                    "queue_size": self.queue_summary()["queue_size"],
                },
            )
        self.sink.queue_changed()
        self.schedule()
        runner = self.kinds.get(kind)
        if runner is not None and job.status == PROCESSING:
            try:
                await runner.accepted(job)  # a kind that runs elsewhere may still be refused there
            except SchedulerError as refusal:
                self.monitor.reject(refusal.reason or "refused")
                raise
        if kind == SWITCH and job.status == PROCESSING:
            # admitted at once (a device holds its group): it returns once its choice is stored, as when the
            # choice was a scheduler's memory, so a request the client sends next runs on the new model
            await self.wait(job.id)
        if kind == SWITCH and job.status == QUEUED:
            summary = self.queue_summary()
            position = self.queue_position(job.id) or 1
            self.emit(
                job,
                {
                    "type": "group_switch_queued",
                    "model_id": model_id,
                    "target_group_id": job.group_id,
                    "queue_position": position,
                    "queue_size": summary["queue_size"],
                    "active_requests": summary["processing_requests"],
                    "queued_ahead": position - 1,
                    "message": f"loading group {job.group_id} once the work running on its device has finished",
                },
            )
        return job

    async def answered(
        self,
        kind: str,
        request: dict[str, Any],
        result: dict[str, Any],
        *,
        model_id: str,
        client_request_id: str | None = None,
        owner: str | None = None,
        subscriber: Any = None,
    ) -> Job:
        """A job answered without running (the result cache held its result): completed at once, stored, and
        its subscriber told like any job's (its final message). It takes no place in the queue and no device."""
        job = self._new_job(kind, request, model_id, client_request_id, owner)
        job.started_at = job.created_at
        self.jobs[job.id] = job  # until its end is stored, so that it is readable by id meanwhile
        self.stats["submitted"] += 1
        if subscriber is not None:
            self.sink.subscribe(job, subscriber)
        self.finish(job, COMPLETED, result=result)
        return job

    def _new_job(
        self,
        kind: str,
        request: dict[str, Any],
        model_id: str,
        client_request_id: str | None,
        owner: str | None,
    ) -> Job:
        return Job(
            id=new_id(),
            kind=kind,
            request=request,
            model_id=model_id,
            group_id=self.registry.model(model_id).group_id,
            client_request_id=client_request_id,
            owner=owner,
        )

    def _admit_check(self, owner: str | None) -> None:
        """Backpressure: refuse while draining, beyond MAX_QUEUE_SIZE (429, or 503 before the server is ready)
        and beyond the owner's cap of unfinished jobs (429). Switches count like every other job (a client's
        repeated switches replace each other in the queue: `supersede_switches`)."""
        refusal: SchedulerError | None = None
        if self.draining:
            refusal = SchedulerError(
                503, "the server is shutting down; retry shortly", reason="draining", retry_after=5
            )
        elif len(self.jobs) >= self.settings.max_queue_size:
            status, reason = (429, "queue_full") if self.ready else (503, "not_ready")
            refusal = SchedulerError(
                status,
                f"the server has {len(self.jobs)} requests waiting or running (MAX_QUEUE_SIZE); try later",
                reason=reason,
                retry_after=self.retry_after(),
            )
        elif (cap := self.client_cap(owner)) is not None:
            # a batch's items count against the batch limits, not against the owner's interactive requests
            mine = sum(1 for j in self.jobs.values() if j.owner == owner and not is_batch_item(j))
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
            raise UnknownRequest(job_id)
        if job.terminal:
            return job
        fut: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(fut)
        if job_id not in self.jobs:
            self._follow(job_id)  # another replica runs it: its end is read from the store
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return self.jobs.get(job_id, job)

    async def cancel(self, job_id: str, reason: str = "Cancelled by user", *, wait: bool = True) -> Job:
        """Cancel a job: at once when this scheduler holds it; else (another replica runs it) through the store's
        request, which that replica sees at its next renewal: `wait` for its end (up to a lease), or return the job
        as stored when asked (a closing connection cancels its jobs without waiting for each)."""
        job = self.jobs.get(job_id)
        if job is None:
            stored = await self.store.get(job_id)
            if stored is None:
                raise UnknownRequest(job_id)
            if self.leases is None or stored.terminal:
                raise SchedulerError(409, f"request {job_id} is already {stored.status}")
            if not await self.store.request_cancel(job_id):  # it ended (or was deleted) meanwhile
                ended = await self.store.get(job_id)
                if ended is None:
                    raise UnknownRequest(job_id)
                raise SchedulerError(409, f"request {job_id} is already {ended.status}")
            # another replica runs it: it hears of the request when it next renews its leases
            if not wait:
                return stored
            ended = await self.wait(job_id, timeout=self.leases.lease_seconds)
            if ended.terminal and ended.status != CANCELLED:
                raise SchedulerError(409, f"request {job_id} is already {ended.status}")
            return ended
        if job.terminal:
            raise SchedulerError(409, f"request {job_id} is already {job.status}")
        if job.status == QUEUED:
            self.queue.remove(job)
        elif (kind := self.kinds.get(job.kind)) is not None:
            for dev in self.devices:
                kind.drop(job_id, dev)
        self.finish(job, CANCELLED, error=reason)
        self.schedule()
        return job

    # -- queue and device facts -----------------------------------------------------------------------------------
    def queue_position(self, job_id: str) -> int | None:
        return self.book.position(job_id)

    def queue_summary(self) -> dict[str, int]:
        return self.book.summary()

    def is_switching(self) -> bool:
        return any(d.loading for d in self.devices)

    def loaded_groups(self) -> dict[str, str]:
        """group id -> device, for groups resident on a device."""
        return {d.group_id: d.name for d in self.devices if d.group_id is not None}

    def is_loaded(self, model_id: str) -> bool:
        """Whether a device holds the model (loaded, not only its group)."""
        return any(d.loaded is not None and model_id in d.loaded.models for d in self.devices)

    def loaded_model(self, model_id: str) -> tuple[Loaded, dict[str, Any]] | None:
        """The group a device holds with the model in it, and the model's facts (its NLA's), or None when no
        device holds the model."""
        for dev in self.devices:
            if dev.loaded is not None and model_id in dev.loaded.models:
                facts = dev.worker.model_facts(model_id)
                if facts is not None:
                    return dev.loaded, facts
        return None

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
            "is_loaded": self.is_loaded(m.id),
            "generation_config": m.generation_config,
        }

    # -- endings (also for the kinds) -----------------------------------------------------------------------------
    def emit_live(self, job: Job, message: dict[str, Any]) -> None:
        """A running job's message, unless the job ended meanwhile (a cancelled stream stops at once)."""
        if not job.terminal:
            self.emit(job, message)

    def emit(self, job: Job, message: dict[str, Any]) -> None:
        self.sink.job_event(job, self._addressed(job, message))

    @staticmethod
    def _addressed(job: Job, message: dict[str, Any]) -> dict[str, Any]:
        return {**message, "request_id": job.id, "client_request_id": job.client_request_id}

    def finish(
        self, job: Job, status: str, *, result: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        """Make the job terminal now; store it, then tell its listeners and waiters."""
        job.status, job.completed_at, job.result, job.error = status, time.time(), result, error
        self.stats[status] += 1
        if job.started_at is not None:
            self.stats["processing_seconds"] += job.completed_at - job.started_at
        self.spawn(self._announce(job))
        self.sink.queue_changed()

    async def _announce(self, job: Job) -> None:
        ended_here = True
        try:
            ended_here = await self._store_end(job)
        except Exception:
            log.exception("storing the end of job %s failed", job.id)
        self.jobs.pop(job.id, None)
        if not ended_here:
            log.warning("job %s ended here after another runner took it over; the stored end stands", job.id)
            self._follow(job.id)  # its listeners and waiters here hear the stored end, once
            return
        self.emit(job, self.final_message(job))
        for fut in self._waiters.pop(job.id, []):
            if not fut.done():
                fut.set_result(job)

    def final_message(self, job: Job) -> dict[str, Any]:
        """The terminal WebSocket message of a job (also what `subscribe` replays for a finished job)."""
        return final_message(job, self.kinds)

    # -- deciding -------------------------------------------------------------------------------------------------
    def schedule(self) -> None:
        """Decide what runs next and do it; called after every change."""
        if self.stopping or self.draining or self._loop is None:
            return
        if self._resetting:  # a reset drains the devices: admitted work runs to its end, nothing new starts
            for dev in self.devices:
                self._dispatch(dev)
            return
        for decision in self.policy.route(self._snapshot()):
            self._apply(decision)
        for dev in self.devices:
            self._dispatch(dev)
            queued_groups = frozenset(j.group_id for j in self.queue if j.group_id is not None)
            after = self.policy.after_dispatch(self._view(dev), queued_groups)
            if after is not None:
                self._apply(after)

    def _snapshot(self) -> Snapshot:
        queued = []
        for job in self.queue:
            assert job.group_id is not None  # every submitted job names a model, hence a group
            queued.append(
                QueuedJob(job.id, job.group_id, takes_place=job.kind in self.kinds, batch=is_batch_item(job))
            )
        return Snapshot(
            queue=tuple(queued),
            devices=tuple(self._view(d) for d in self.devices),
            preloading=frozenset(self._preloads),
            max_active_jobs=self.settings.max_active_jobs,
            now=time.time(),
            max_batch_jobs=self.settings.max_active_batch_jobs,
        )

    def _view(self, dev: DeviceState) -> DeviceView:
        return DeviceView(
            name=dev.name,
            group_id=dev.group_id,
            loading=dev.loading,
            draining_for=dev.draining_for,
            active_jobs=dev.active_jobs,
            busy=dev.busy,
            last_used=dev.last_used,
            remaining_rows=sum(kind.remaining_rows(dev) for kind in self._kind_list),
            batch_jobs=sum(1 for w in dev.works.values() if is_batch_item(w.job)),
        )

    def _device(self, name: str) -> DeviceState:
        return next(d for d in self.devices if d.name == name)

    def _apply(self, decision: Decision) -> None:
        dev = self._device(decision.device)
        if isinstance(decision, Admit):
            self._admit(self.jobs[decision.job_id], dev)
        elif isinstance(decision, Switch):
            self._start_switch(dev, decision.group_id)
        elif isinstance(decision, Drain):
            dev.draining_for = decision.group_id
            log.info("device %s drains group %s to switch to %s", dev.name, dev.group_id, decision.group_id)
        elif isinstance(decision, StopDraining):
            dev.draining_for = None

    def _admit(self, job: Job, dev: DeviceState) -> None:
        self.queue.remove(job)
        job.status, job.started_at = PROCESSING, time.time()
        job.attempts += 1
        dev.last_used = time.time()
        assert dev.loaded is not None
        kind = self.kinds.get(job.kind)
        if job.kind == SWITCH:
            self.spawn(self._complete_switch(job, dev))
        elif kind is not None:
            self.spawn(self.store.put(job))
            kind.start(job, dev, self)
        else:
            self.finish(job, FAILED, error=f"this server cannot run {job.kind} requests")
        self.sink.queue_changed()

    def _dispatch(self, dev: DeviceState) -> None:
        if dev.loaded is None or dev.loading is not None:
            return
        self._expire(dev)
        for kind in self._kind_list:
            kind.dispatch(dev, self)

    def _expire(self, dev: DeviceState) -> None:
        """Fail the jobs whose own engine time passed REQUEST_TIMEOUT; their engine calls see it and stop."""
        limit = self.settings.request_timeout
        if limit:
            now = time.time()
            for kind in self._kind_list:
                kind.expire(dev, self, now, limit)

    # -- switching groups -----------------------------------------------------------------------------------------
    def _start_switch(self, dev: DeviceState, gid: str, *, startup: bool = False) -> None:
        dev.loading, dev.draining_for = gid, None
        self.sink.broadcast(
            {
                "type": "group_switch_status",
                "status": "starting",
                "group_id": gid,
                "source_group_id": dev.group_id,
                "device": dev.name,
            }
        )
        self.spawn(self._switch(dev, gid, startup))

    async def _switch(self, dev: DeviceState, gid: str, startup: bool) -> None:
        dev.loaded = None
        t0 = time.perf_counter()
        try:
            dev.loaded = await dev.worker.load(gid)
        except LoadFailed as exc:
            dev.loaded = exc.restored  # the previous group, back from the CPU cache, keeps serving
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
                self.finish(job, FAILED, error=message)
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
                self.spawn(self._preload_configured())
            self.schedule()

    async def _complete_switch(self, job: Job, dev: DeviceState) -> None:
        """Store the switch's choice, then announce it: a request the client makes once it heard the switch end
        runs on the new model, on whichever replica it lands."""
        assert job.model_id is not None and dev.loaded is not None
        missing = dev.loaded.missing(job.model_id)
        if missing is not None:
            self.finish(job, FAILED, error=missing)
            return
        server_wide = job.request.get("scope", "server") == "server"
        try:
            previous = self.registry.models.get(await self.current_for(job.owner) or "")
            if server_wide:
                # the administrator's act: the default of every client that has not chosen its own
                await self.choices.set_default(job.model_id, job.owner)
            elif job.owner is not None:  # this client's own choice; nobody else's requests change
                await self.choices.choose(job.owner, job.model_id)
        except Exception as exc:
            log.exception("storing the switch to %s failed", job.model_id)
            self.finish(job, FAILED, error=f"the switch could not be stored: {exc}")
            return
        if job.terminal:  # cancelled while its choice was being stored
            return
        switched = previous is None or previous.group_id != job.group_id
        whose = "the current model" if server_wide else "your current model (other clients keep theirs)"
        result = {
            "model_id": job.model_id,
            "group_id": job.group_id,
            "message": f"{job.model_id} is now {whose}"
            + (f" (group {job.group_id} loaded)" if switched else ""),
            "group_switched": switched,
            "model_info": self.model_info(job.model_id),
        }
        self.finish(job, COMPLETED, result=result)

    async def supersede_switches(self, owner: str | None, model_id: str) -> None:
        """A client's repeated switches coalesce: its switches still queued are cancelled (their subscribers hear
        `request_cancelled`), so each client has at most one switch waiting, the latest."""
        if owner is None:
            return
        for job in [j for j in self.queue if j.kind == SWITCH and j.owner == owner]:
            await self.cancel(job.id, reason=f"superseded by a later switch to {model_id}")

    # -- the CPU cache and the administrator's reset ----------------------------------------------------------------
    async def _preload_configured(self) -> None:
        """Groups whose preload_groups setting is true are loaded into the CPU cache ahead of use."""
        for gid in self.registry.groups:
            if gid == self.default_group or not self.registry.model_setting(
                self.settings, "preload_groups", group_id=gid
            ):
                continue
            if any(d.group_id == gid or d.loading == gid for d in self.devices):
                continue
            try:
                if await self.host.preload(gid):
                    log.info("preloaded group %s into the CPU cache", gid)
            except Exception as exc:
                log.error("preloading group %s failed: %s", gid, exc)

    async def preload(self, group_id: str) -> str:
        """Load a group into the CPU cache ahead of use, so a switch to it is a move, not a load; where it is."""
        self.registry.group(group_id)  # UnknownGroup for the caller
        for dev in self.devices:
            if dev.group_id == group_id or dev.loading == group_id:
                return dev.name
        if group_id in self.host.cached_groups():
            return "cpu_cache"
        if self.host.cache_capacity <= 0:
            raise SchedulerError(
                409, "the CPU cache is disabled (MAX_CPU_CACHED_MODELS=0): nothing can be preloaded"
            )
        task = self._preloads.get(group_id)
        if task is None:
            task = self.spawn(self._preload_group(group_id))
            self._preloads[group_id] = task
        loaded: bool = await asyncio.shield(task)
        if not loaded:
            raise SchedulerError(
                409,
                f"the CPU cache is full ({', '.join(self.host.cached_groups())}; capacity "
                f"{self.host.cache_capacity}): switch to a group or raise MAX_CPU_CACHED_MODELS",
            )
        return "cpu_cache"

    async def _preload_group(self, group_id: str) -> bool:
        try:
            return await self.host.preload(group_id)
        finally:
            self._preloads.pop(group_id, None)
            self.schedule()

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
            unloaded: list[str] = []
            for dev in self.devices:
                dev.loaded, dev.draining_for = None, None
                unloaded += await dev.worker.unload()
            unloaded += await self.host.clear_cache()
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
                await self.choices.clear()  # a reset starts every client afresh on the configured default
        finally:
            self._resetting = False
            self.schedule()
        return {
            "unloaded_groups": unloaded,
            "loaded_group": loaded,
            "current_model": await self.server_model(),
            "cancelled_requests": cancelled,
            "queued_requests": len(self.queue),
            "seconds": round(time.perf_counter() - t0, 3),
        }
