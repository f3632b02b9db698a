"""How work ends when its client or the server goes away: cancel on disconnect, drain on SIGTERM.

* **A WebSocket closes.** The queued and running jobs it followed (submitted on it, or picked up with
  `subscribe`) and that its caller owns are cancelled, unless another open connection still follows them: nobody
  is left to read their results, and on a shared accelerator every second matters. Jobs that had finished stay
  readable by id. With several ingress replicas on one store, the same holds for the jobs the connection followed
  that another replica runs: they are read from the store, and the cancellation is asked through it (that replica
  cancels them at its next lease renewal). A page reload therefore cancels a running analysis (the UI re-subscribes after a reconnect and
  is told so); a client that wants work to outlive its connection submits it over REST.
* **SIGTERM** (or Ctrl-C) drains instead of dropping work: the server stops accepting (new requests get 503 with
  `Retry-After`, new WebSockets a close 1013, `/ready` 503), admits no queued job and starts no new engine batch,
  lets the batches already running finish (at most `DRAIN_TIMEOUT` seconds), stores jobs that were part-way
  through as queued again (not counted as a crash), and exits. Queued jobs stay in the store and run at the next
  start, in their order. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from .jobs.record import PROCESSING, QUEUED
from .scheduling.types import SchedulerError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .api.ws.hub import Connection
    from .service import Service

log = logging.getLogger("talkative.serve.lifecycle")

DISCONNECT_REASON = "Cancelled: the WebSocket connection that followed it closed"


async def cancel_abandoned(svc: Service, conn: Connection, followed: list[str]) -> int:
    """After `conn` is detached: cancel the unfinished jobs it followed that its caller owns and that no other
    open connection follows. Nothing is cancelled while the server shuts down (those jobs resume at restart)."""
    sched = svc.scheduler
    if sched.draining or sched.stopping:
        return 0
    cancelled = 0
    for job_id in followed:
        job = sched.jobs.get(job_id)
        if job is None and sched.leases is not None:
            job = await sched.store.get(job_id)  # another replica runs it (or it ended there)
        if job is None or job.terminal or job.owner != conn.identity.key:
            continue
        if any(not other.closed for other in svc.hub.subscribers.get(job_id, ())):
            continue
        try:
            await sched.cancel(job_id, reason=DISCONNECT_REASON, wait=False)
            cancelled += 1
        except (SchedulerError, KeyError):
            continue  # finished meanwhile
    if cancelled:
        log.info("connection %s closed: cancelled %d of its jobs", conn.id, cancelled)
    return cancelled


async def drain(svc: Service, timeout: float) -> dict[str, int]:
    """Stop taking work, let running engine batches finish, store part-way jobs as queued. Returns counts."""
    sched = svc.scheduler
    sched.draining = True
    log.info(
        "draining: no new work; waiting up to %gs for %d running engine batches",
        timeout,
        sum(d.inflight for d in sched.devices),
    )
    deadline = time.monotonic() + timeout
    while any(d.inflight or d.preparing or d.loading for d in sched.devices) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    busy = sum(d.inflight for d in sched.devices)
    if busy:
        log.warning(
            "drain timeout: %d engine batches still running; their jobs run again at the next start", busy
        )
    await asyncio.sleep(0.05)  # let the endings of the last batches reach the store
    requeued = 0
    for job in list(sched.jobs.values()):
        if job.status == PROCESSING and not job.terminal:
            job.status, job.started_at, job.progress = QUEUED, None, {}
            job.attempts = max(0, job.attempts - 1)  # a drain is not a crash: it does not count as an attempt
            await svc.store.put(job)
            requeued += 1
    await svc.store.count()  # a barrier: every write queued before this one is on disk
    counts = {"queued": len(sched.queue), "requeued": requeued, "still_running": busy}
    log.info(
        "drained: %d queued and %d part-way jobs stay in the store for the next start",
        counts["queued"],
        requeued,
    )
    return counts


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before the shutdown on the first SIGTERM/SIGINT (a second one exits at once)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self.fastapi_app = app
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[Any] | None = None
        self._draining = False

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        await super().main_loop()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        log.info("signal %d: draining before shutdown (send it again to exit at once)", sig)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        svc = getattr(self.fastapi_app.state, "service", None)
        try:
            if svc is not None:
                await drain(svc, self.drain_timeout)
        except Exception:
            log.exception("draining failed; shutting down anyway")
        finally:
            self.should_exit = True
