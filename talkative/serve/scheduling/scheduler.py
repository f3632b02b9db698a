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

The parts: this module holds the queue, admission and the decision function; `analysis_jobs` prepares analyses
and runs their engine batches; `group_switching` loads groups onto devices (switch, preload, reset);
`scheduler_base` holds the shared state and ends jobs; `scheduler_types` names the records and protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

from ...nla.analysis import AnalysisError
from ..catalog.residency import GroupRuntime
from ..jobs.analysis import AnalysisJobs, engine_failure
from ..jobs.record import COMPLETED, FAILED, PROCESSING, QUEUED, Job, UnknownRequest, new_id
from .switching import GroupSwitching
from .types import MAX_ATTEMPTS, DeviceState, JobContext, JobHandler, SchedulerError

log = logging.getLogger("talkative.serve.scheduling.scheduler")


class Scheduler(GroupSwitching, AnalysisJobs):
    """The whole scheduler: its queue and decision function here, the rest from its parts (see the module)."""

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

    # -- submission -----------------------------------------------------------------------------------------------
    def resolve_model(self, model_id: str | None, client: str | None = None) -> str:
        """The model a request runs on: the one it names, else its client's current model."""
        if model_id is not None:
            self.registry.model(model_id)  # UnknownModel for the caller to turn into a 404
            return model_id
        current = self.current_for(client)
        if current is None:
            raise SchedulerError(
                400,
                "no model_id given and this server has no current model: name a model_id or switch to one",
            )
        return current

    def current_for(self, client: str | None) -> str | None:
        """A client's current model: the one it last switched to, else the server's default. One client's
        switch never changes what another client's requests run on."""
        chosen = self.client_models.get(client) if client is not None else None
        return chosen if chosen is not None and chosen in self.registry.models else self.current_model

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
            mine = sum(1 for j in self.jobs.values() if j.owner == owner)
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
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return self.jobs.get(job_id, job)

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

            def started_handler(ctx: JobContext) -> dict[str, Any]:
                # REQUEST_TIMEOUT counts from here: time waiting for a worker held by others is not the job's
                dev.whole_started[job.id] = time.time()
                return handler(ctx)

            result = await loop.run_in_executor(dev.batch_pool, started_handler, ctx)
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
            dev.whole_started.pop(job.id, None)
            self._schedule()
