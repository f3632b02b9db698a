"""Batch jobs: many analyses submitted as one, run as ordinary analysis jobs, kept item by item in the store.

A batch is a list of items (`{id, text | messages, options}`) with shared defaults (a model, options). It is
written to the job store's database (`batch_store.py`) before the client hears of it; then `Batches` feeds its
items to the scheduler as analysis jobs, a few at a time, marked as batch items so that the scheduling policy gives
interactive requests priority (`scheduling/policy.py`). Each item's result line is written to the store the moment
its job ends, before any reader can see it; results are read back in completion order (`done_seq`).

Durable: a restart finds the open batches in the store and carries on. An item whose job the previous process had
submitted is followed again (the scheduler recovers the job itself, or it already finished and its stored result is
taken), so nothing that finished is computed again; only items never finished run.

Several replicas on one store (an ingress replica of a cluster, runner id `<node>:<pid>:<random>`): each batch is
fed by one replica, the one holding its lease (`batch_store.py`): the replica that accepted it, or the one that
adopted it after its feeder stopped renewing (died) or gave it back (stopped). An adopted batch is carried on as
after a restart: items whose jobs are alive are followed wherever those jobs run, never submitted again. Every
other replica answers for the batch from the store: its progress, its results (a follower there re-reads the store
every `POLL_SECONDS`, since no event of its own process tells it of the feeder's progress) and its cancel (a flag
the feeder sees when it next renews its lease; a batch nobody feeds is adopted and cancelled by the canceller).
The local backend (runner `local`) owns every batch of its store and carries on all open ones at start.

Why items are whole jobs rather than chunks of one big job: every job already has the scheduler's durability,
timeouts, cancellation, chunking into shared engine batches and failure isolation, so a batch adds bookkeeping, not
a second execution path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..catalog.registry import UnknownModel
from ..scheduling.types import SchedulerError
from .batch_store import (
    PENDING,
    QUEUED,
    RUNNING,
    UNFINISHED,
    Batch,
    BatchStore,
    ItemSpec,
    TooManyBatches,
    result_line,
)
from .record import CANCELLED, COMPLETED, FAILED, Job, UnknownRequest, iso, new_id
from .store import LOCAL_RUNNER

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = [
    "BATCH_KEY",
    "PENDING",
    "QUEUED",
    "RUNNING",
    "UNFINISHED",
    "Batch",
    "BatchStore",
    "Batches",
    "ItemSpec",
    "is_batch_item",
]

log = logging.getLogger("talkative.serve.jobs.batches")

#: the key of an analysis job's request that names the batch it is an item of (what marks it as batch work)
BATCH_KEY = "batch_id"
#: an item whose job was cancelled by someone else than its batch (an administrator's reset) runs again, this often
RESUBMITS = 3
#: how long a waiting item submission backs off when the queue is full or the server is not ready
BACKOFF_SECONDS = 1.0
#: how often a reader of a batch another replica feeds reads the store again: no event of this process tells it
#: of that replica's progress; one indexed read per follower every half second is cheap (as for jobs)
POLL_SECONDS = 0.5
#: how many times a cancel asked of another replica waits a lease for the feeder to apply it before returning
CANCEL_ROUNDS = 3


def is_batch_item(job: Job) -> bool:
    """Whether an analysis job is an item of a batch (it then yields to interactive jobs)."""
    return job.request.get(BATCH_KEY) is not None


# -- feeding the scheduler ---------------------------------------------------------------------------------------------
class JobRunner(Protocol):
    """What `Batches` needs of the scheduler: its unfinished jobs (for live progress), wait for a job (wherever it
    runs), look one up, cancel one."""

    @property
    def jobs(self) -> dict[str, Job]: ...

    async def wait(self, job_id: str, timeout: float | None = None) -> Job: ...
    async def get(self, job_id: str) -> Job | None: ...
    async def cancel(self, job_id: str, reason: str = ...) -> Job: ...


Submit = Callable[..., Awaitable[Job]]
Forget = Callable[[str], Awaitable[None]]


@dataclass
class Active:
    """An open batch as this process feeds it: its items not yet submitted, its items' jobs in flight, and what
    its rate is measured from."""

    batch: Batch
    pending: deque[int]
    running: dict[int, str] = field(default_factory=dict)  # seq -> job id
    starting: set[int] = field(default_factory=set)  # being submitted
    resubmits: dict[int, int] = field(default_factory=dict)
    since: float | None = None  # when this process first had one of its items finish
    positions_since: int = 0
    cancelling: bool = False
    #: when (monotonic) this process took the batch: a renewal asked before then may not list it yet
    claimed_at: float = field(default_factory=time.monotonic)
    #: another runner feeds it now: nothing more is submitted or written for it here
    lost: bool = False
    follows: set[asyncio.Task[Any]] = field(default_factory=set)


class Batches:
    """Every batch of the server: submission (with the per-key limits), progress, results, cancel and delete; and
    the loop that feeds the open batches this process holds to the scheduler, round robin between batches, a few
    items at a time; with leases, the loop that renews them and adopts the batches of runners that stopped.

    How many item jobs wait or run at once: enough to fill every device's batch places and have the next item
    queued (`devices × MAX_ACTIVE_BATCH_JOBS + 1`); more would only crowd the queue that interactive requests share.
    """

    def __init__(
        self,
        settings: Settings,
        store: BatchStore,
        scheduler: JobRunner,
        submit: Submit,
        forget: Forget,
        devices: int,
        runner: str = LOCAL_RUNNER,
        lease_seconds: float | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.scheduler = scheduler
        self._submit = submit
        self._forget = forget  # removes a job for good: its record, its result and its cached rows
        self.depth = devices * settings.max_active_batch_jobs + 1
        #: this process's runner id: the scheduler's, so that an operator reads one name per replica in the store
        self.runner = runner
        #: whether replicas share the store (each batch is fed by the holder of its lease)
        self.leased = runner != LOCAL_RUNNER
        self.lease_seconds = settings.lease_seconds if lease_seconds is None else lease_seconds
        self._active: dict[str, Active] = {}
        self._order: deque[str] = deque()  # round robin over active batches
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._stopping = False

    @property
    def _holder(self) -> str | None:
        """What this process's writes are guarded by: its runner id with leases, nothing on the local backend."""
        return self.runner if self.leased else None

    # -- life cycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Carry on the open batches this process is to feed, then feed: on the local backend every open batch of
        the store (a previous process left them), with leases those whose runner stopped (the live replicas feed
        their own; the rest are adopted as their leases expire)."""
        if self.leased:
            await self._adopt()
            self._spawn(self._keep_leases())
        else:
            for batch in await self.store.open():
                await self._resume(batch)
        self._spawn(self._feed_loop())
        self._spawn(self._purge_loop())
        self._wake.set()

    async def stop(self) -> None:
        """Stop feeding; with leases, give this process's batches back so that another replica adopts them at once
        (their items' jobs are given back by the scheduler and run on; the adopter follows them)."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.leased:
            for batch_id in list(self._active):
                with contextlib.suppress(Exception):
                    await self.store.release(batch_id, self.runner)
        self.store.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch task failed", exc_info=task.exception())

    async def _resume(self, batch: Batch) -> None:
        """Feed a batch this process just took (at start or by adoption): its pending items are submitted, its
        running items' jobs followed (submitted again only when their job is gone), a requested cancel applied."""
        cancelled = batch.status == CANCELLED  # cancelled while items ran: only their ends are left to record
        pending = deque() if cancelled else deque(seq for seq, _ in await self.store.items(batch.id, PENDING))
        active = Active(batch, pending, cancelling=cancelled)
        found = [
            (seq, await self.scheduler.get(job_id) if job_id else None)
            for seq, job_id in await self.store.items(batch.id, RUNNING)
        ]
        gone = [seq for seq, job in found if job is None]
        if not cancelled:  # submitted, but its job never reached the store: run it again
            for seq in gone:
                await self.store.set_item(batch.id, seq, PENDING, runner=self._holder)
            active.pending.extendleft(reversed(gone))
        # fed only once every item is in `running` or `pending`, so that no item's end finishes the batch early
        for seq, job in found:
            if job is not None:
                active.running[seq] = job.id
        self._activate(active)
        for seq, job in found:
            if job is not None:
                self._follow_item(active, seq, job.id)
                if cancelled and not job.terminal:
                    self._spawn(self._cancel_job(job.id))
        if cancelled:
            for seq in gone:
                await self._end_item(active, seq, CANCELLED, None)
        log.info(
            "%s batch %s: %d items to run, %d in flight",
            "adopting" if self.leased else "resuming",
            batch.id,
            len(active.pending),
            len(active.running),
        )
        if batch.cancel_requested and not active.cancelling:  # asked on another replica while nobody fed it
            await self._cancel_active(active)
        elif not active.pending and not active.running:
            await self._maybe_finish(active)
        self._wake.set()

    def _activate(self, active: Active) -> None:
        self._active[active.batch.id] = active
        self._order.append(active.batch.id)

    def _deactivate(self, batch_id: str) -> None:
        self._active.pop(batch_id, None)
        if batch_id in self._order:
            self._order.remove(batch_id)

    # -- leases: several replicas on one store ------------------------------------------------------------------
    async def _keep_leases(self) -> None:
        """Renew every third of a lease, so one late renewal never loses a batch; then adopt."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self._renew()
                await self._adopt()
            except Exception:
                log.exception("renewing batch leases or adopting batches failed; retrying")

    async def _renew(self) -> None:
        """Renew this runner's batch leases; let go of the batches another runner took over; cancel those someone
        asked, on any replica, to cancel."""
        asked = time.monotonic()
        renewal = await self.store.renew(self.runner, self.lease_seconds)
        held = set(renewal.held)
        for batch_id, active in list(self._active.items()):
            if batch_id not in held and active.claimed_at < asked:
                self._relinquish(active)
        for batch_id in renewal.cancel_requested:
            asked_here = self._active.get(batch_id)
            if asked_here is not None and not asked_here.cancelling:
                await self._cancel_active(asked_here)

    async def _adopt(self) -> None:
        """Claim and carry on the open batches whose runner stopped renewing (or gave them back)."""
        if self._stopping:
            return
        for batch in await self.store.adoptable(self.lease_seconds):
            if batch.id in self._active or not await self.store.claim(
                batch.id, self.runner, self.lease_seconds
            ):
                continue  # another replica was quicker
            try:
                await self._resume(batch)
            except Exception:
                # not fed here after all: give it back rather than renew a lease nothing here feeds
                self._deactivate(batch.id)
                await self.store.release(batch.id, self.runner)
                raise

    def _relinquish(self, active: Active) -> None:
        """Another runner feeds this batch now (this one was too slow to renew): stop feeding it here. Its items'
        jobs run on: the new feeder follows them."""
        if active.lost:
            return
        if not active.batch.terminal or active.running:
            log.warning(
                "batch %s was taken over by another runner; no longer feeding it here", active.batch.id
            )
        active.lost = True
        self._deactivate(active.batch.id)
        for task in list(active.follows):
            task.cancel()
        self._notify()

    # -- submission ---------------------------------------------------------------------------------------------
    async def submit(
        self,
        owner: str | None,
        model_id: str,
        options: dict[str, Any],
        items: Sequence[ItemSpec],
        source: str,
    ) -> Batch:
        """Store a new batch (all of it, before anyone hears of it, held by this runner) and start feeding it."""
        limit = self.settings.max_batches_in_flight
        batch = Batch(
            id=new_id(),
            owner=owner,
            status=QUEUED,
            model_id=model_id,
            options=options,
            source=source,
            total=len(items),
            created_at=time.time(),
        )
        try:
            await self.store.create(batch, items, limit, self._holder, self.lease_seconds)
        except TooManyBatches:
            raise SchedulerError(
                429,
                f"you have {limit} unfinished batches, the most one client may have (MAX_BATCHES_IN_FLIGHT); "
                "wait for one to finish or cancel one",
                reason="batches_in_flight",
                retry_after=30,
            ) from None
        stored = await self.store.get(batch.id)
        assert stored is not None
        pending = deque(seq for seq, spec in enumerate(items) if spec.error is None)
        active = Active(stored, pending)
        self._activate(active)
        if not pending:
            await self._maybe_finish(active)
        self._wake.set()
        self._notify()
        return stored

    # -- the feed -----------------------------------------------------------------------------------------------
    def _in_flight(self) -> int:
        return sum(len(a.running) for a in self._active.values())

    def _next(self) -> tuple[Active, int] | None:
        """The next item to submit, round robin between the batches with items waiting."""
        for _ in range(len(self._order)):
            batch_id = self._order[0]
            self._order.rotate(-1)
            active = self._active.get(batch_id)
            if active is not None and active.pending and not active.cancelling:
                return active, active.pending.popleft()
        return None

    async def _feed_loop(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            while self._in_flight() < self.depth and (nxt := self._next()) is not None:
                active, seq = nxt
                if not await self._start_item(active, seq):
                    active.pending.appendleft(seq)
                    await asyncio.sleep(BACKOFF_SECONDS)

    async def _start_item(self, active: Active, seq: int) -> bool:
        """Submit one item as an analysis job; False when the server has no room now (try again later)."""
        batch = active.batch
        failure: str | None = None
        active.starting.add(
            seq
        )  # neither pending nor running while it is submitted, yet the batch is not over
        try:
            request, item_id, line = await self.store.request(batch.id, seq)
            try:
                job = await self._submit(
                    {**request, BATCH_KEY: batch.id},
                    model_id=batch.model_id,
                    client_request_id=None,
                    # the owner's job (its /status, its cached rows), counted against the batch's limits instead
                    # of the owner's interactive cap, and listed with its batch instead of in the owner's history
                    owner=batch.owner,
                )
            except SchedulerError as exc:
                if exc.status in (429, 503):
                    return False
                failure = exc.detail
            except UnknownModel as exc:
                failure = str(exc)
            if failure is None:
                if active.lost or not await self.store.set_item(batch.id, seq, RUNNING, job.id, self._holder):
                    # another runner took the batch meanwhile: it submits the item itself, this job is not needed
                    self._relinquish(active)
                    await self._cancel_job(job.id)
                    return True
                active.running[seq] = job.id
        finally:
            active.starting.discard(seq)
        if failure is not None:
            await self._end_item(active, seq, FAILED, result_line(item_id, FAILED, line, error=failure))
            return True
        if active.cancelling:  # the batch was cancelled while this item was being submitted
            await self._cancel_job(job.id)
        if batch.status == QUEUED:
            batch.status, batch.started_at = RUNNING, time.time()
            await self.store.set_batch(batch.id, RUNNING, "started_at", batch.started_at, self._holder)
        self._follow_item(active, seq, job.id)
        return True

    def _follow_item(self, active: Active, seq: int, job_id: str) -> None:
        task = self._spawn(self._follow(active, seq, job_id))
        active.follows.add(task)
        task.add_done_callback(active.follows.discard)

    async def _follow(self, active: Active, seq: int, job_id: str) -> None:
        """Wait for an item's job, then store its outcome (the result line before anyone can read it)."""
        try:
            job = await self.scheduler.wait(job_id)
        except UnknownRequest:  # its job is gone from the store: run the item again
            job = None
        if active.lost:
            return
        batch = active.batch
        interrupted = job is None or (job.status == CANCELLED and not active.cancelling)
        if interrupted and active.resubmits.get(seq, 0) < RESUBMITS:
            active.resubmits[seq] = active.resubmits.get(seq, 0) + 1
            active.running.pop(seq, None)
            if not await self.store.set_item(batch.id, seq, PENDING, runner=self._holder):
                self._relinquish(active)
                return
            active.pending.appendleft(seq)
            self._wake.set()
            return
        _, item_id, line = await self.store.request(batch.id, seq)
        if job is None:
            await self._end_item(
                active, seq, FAILED, result_line(item_id, FAILED, line, error="its job was lost")
            )
        elif job.status == COMPLETED and job.result is not None:
            result = job.result
            tokens = result.get("tokens", [])
            if active.since is None:
                active.since = job.started_at or time.time()
            active.positions_since += len(tokens)
            text = result_line(
                item_id,
                COMPLETED,
                line,
                request_id=job.id,
                tokens=tokens,
                metadata=result.get("metadata", {}),
            )
            await self._end_item(active, seq, COMPLETED, text, positions=len(tokens))
        elif job.status == CANCELLED:
            await self._end_item(active, seq, CANCELLED, None)
        else:
            await self._end_item(
                active, seq, FAILED, result_line(item_id, FAILED, line, error=job.error or "failed")
            )

    async def _end_item(
        self, active: Active, seq: int, status: str, result: str | None, positions: int | None = None
    ) -> None:
        """Write an item's end (nothing is written once another runner feeds the batch, or when the item's end
        was written already: a line is never written twice)."""
        await self.store.record(active.batch.id, seq, status, positions, result, self._holder)
        active.running.pop(seq, None)
        self._notify()
        self._wake.set()
        await self._maybe_finish(active)

    async def _maybe_finish(self, active: Active) -> None:
        if active.pending or active.running or active.starting or active.lost:
            return
        batch = active.batch
        status = CANCELLED if active.cancelling else COMPLETED
        batch.status, batch.completed_at = status, time.time()
        await self.store.set_batch(batch.id, status, "completed_at", batch.completed_at, self._holder)
        self._deactivate(batch.id)
        self._notify()

    def _notify(self) -> None:
        """Wake every reader following results or progress here (they read the store again)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float, batch_id: str | None = None) -> None:
        """Return once something changed in a batch this process feeds, or after `timeout` seconds; for a
        `batch_id` fed elsewhere (another replica), after `POLL_SECONDS` at most, so that its reader re-reads the
        store while no event here tells of that batch."""
        if batch_id is not None and batch_id not in self._active:
            timeout = min(timeout, POLL_SECONDS)
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def _purge_loop(self) -> None:
        retention = self.settings.result_retention_days * 86400
        while True:
            try:
                n = await self.store.purge(time.time() - retention)
                if n:
                    log.info("purged %d finished batches", n)
            except Exception:
                log.exception("purging old batches failed")
            await asyncio.sleep(self.settings.purge_interval_seconds)

    # -- reading, cancelling, deleting --------------------------------------------------------------------------
    async def get(self, batch_id: str) -> Batch:
        batch = await self.store.get(batch_id)
        if batch is None:
            raise UnknownRequest(batch_id)
        return batch

    async def listing(self, owner: str | None, limit: int, offset: int) -> tuple[list[Batch], int]:
        return await self.store.listing(owner, limit, offset)

    def progress(self, batch: Batch) -> dict[str, Any]:
        """What `GET /api/v1/batches/{id}` answers: counts, positions, rate and ETA. The rate is measured where the
        batch is fed (its items' live progress included); elsewhere it is the batch's average since it started."""
        counts = batch.counts
        active = self._active.get(batch.id)
        positions = batch.positions
        live = 0
        rate = None
        if active is not None and not batch.terminal:
            for job_id in active.running.values():
                live += self._live_positions(job_id)
            if active.since is not None:
                elapsed = time.time() - active.since
                if elapsed > 0 and active.positions_since:
                    rate = active.positions_since / elapsed
        elif not batch.terminal and batch.started_at is not None and positions:
            elapsed = time.time() - batch.started_at
            rate = positions / elapsed if elapsed > 0 else None
        done = counts.get(COMPLETED, 0) + counts.get(FAILED, 0)
        remaining = counts.get(PENDING, 0) + counts.get(RUNNING, 0)
        eta = None
        completed = counts.get(COMPLETED, 0)
        if rate and completed and not batch.terminal:
            per_item = positions / completed
            eta = round(max(0.0, remaining * per_item - live) / rate, 1)
        return {
            "batch_id": batch.id,
            "status": batch.status,
            "model_id": batch.model_id,
            "created_at": iso(batch.created_at),
            "started_at": iso(batch.started_at),
            "completed_at": iso(batch.completed_at),
            "items": {
                "total": batch.total,
                "done": done,
                "completed": completed,
                "failed": counts.get(FAILED, 0),
                "cancelled": counts.get(CANCELLED, 0),
                "running": counts.get(RUNNING, 0),
                "pending": counts.get(PENDING, 0),
            },
            "positions_done": positions + live,
            "positions_per_second": round(rate, 3) if rate else None,
            "eta_seconds": eta,
            "options": batch.options,
        }

    def _live_positions(self, job_id: str) -> int:
        """Positions an item's job in flight has explained so far (its progress, while it runs)."""
        job = self.scheduler.jobs.get(job_id)
        if job is None:
            return 0
        return int(job.progress.get("done_positions") or 0)

    async def results(self, batch_id: str, after: int, limit: int = 500) -> list[str]:
        return await self.store.results(batch_id, after, limit)

    async def cancel(self, batch_id: str) -> Batch:
        """Cancel an unfinished batch: items not started never run, items running stop; finished items stay. On
        any replica: the batch's feeder applies it (here, or told through the store)."""
        batch = await self.get(batch_id)
        if batch.terminal:
            raise SchedulerError(409, f"batch {batch_id} is already {batch.status}")
        active = self._active.get(batch_id)
        if active is not None:
            await self._cancel_active(active)
            return await self.get(batch_id)
        if not self.leased:  # stored unfinished but not run by this process (cannot happen after start)
            await self.store.cancel_pending(batch_id)
            await self.store.set_batch(batch_id, CANCELLED, "completed_at", time.time())
            return await self.get(batch_id)
        return await self._cancel_elsewhere(batch_id)

    async def _cancel_active(self, active: Active) -> None:
        """Cancel a batch this process feeds: terminal for its readers at once; the items still running record
        their ends as their jobs stop."""
        batch_id = active.batch.id
        active.cancelling = True
        active.pending.clear()
        await self.store.cancel_pending(batch_id, self._holder)
        active.batch.status, active.batch.completed_at = CANCELLED, time.time()
        await self.store.set_batch(
            batch_id, CANCELLED, "completed_at", active.batch.completed_at, self._holder
        )
        for job_id in list(active.running.values()):
            self._spawn(self._cancel_job(job_id))  # a job another replica runs takes up to a lease to stop
        await self._maybe_finish(active)
        self._notify()

    async def _cancel_elsewhere(self, batch_id: str) -> Batch:
        """Cancel a batch this process does not feed: when nobody feeds it (its runner died or gave it back), take
        it and cancel it here; else flag it for its feeder and wait, a lease at a time, for the feeder to apply
        it (a feeder that dies meanwhile leaves it to the next round's claim)."""
        for _ in range(CANCEL_ROUNDS):
            if await self.store.claim(batch_id, self.runner, self.lease_seconds):
                batch = await self.get(batch_id)
                if batch_id not in self._active:
                    await self._resume(batch)
                active = self._active.get(batch_id)
                if active is not None and not active.cancelling:
                    await self._cancel_active(active)
                return await self._cancelled(batch_id)
            if not await self.store.request_cancel(batch_id):
                return await self._cancelled(batch_id)  # it ended meanwhile
            until = time.monotonic() + self.lease_seconds
            while time.monotonic() < until:
                await asyncio.sleep(POLL_SECONDS)
                batch = await self.get(batch_id)
                if batch.terminal:
                    return await self._cancelled(batch_id)
        return await self.get(batch_id)  # flagged: its feeder or the next adopter applies it

    async def _cancelled(self, batch_id: str) -> Batch:
        batch = await self.get(batch_id)
        if batch.terminal and batch.status != CANCELLED:
            raise SchedulerError(409, f"batch {batch_id} is already {batch.status}")
        return batch

    async def _cancel_job(self, job_id: str) -> None:
        with contextlib.suppress(SchedulerError, UnknownRequest):  # it ended meanwhile: its end is recorded
            await self.scheduler.cancel(job_id, reason="cancelled: its batch was cancelled")

    async def delete(self, batch_id: str) -> None:
        """Remove a batch and its results (an unfinished one is cancelled first, and its running items' ends are
        awaited, so that nothing writes to it again)."""
        batch = await self.get(batch_id)
        if not batch.terminal:
            await self.cancel(batch_id)
        await self._settle(batch_id)
        self._deactivate(batch_id)
        job_ids = await self.store.job_ids(batch_id)
        await self.store.delete(batch_id)
        self._notify()
        self._spawn(self._forget_jobs(job_ids))  # the batch is gone at once; its items' jobs follow

    async def _settle(self, batch_id: str) -> None:
        """Wait until no item of a cancelled batch is running: here by this process's events, for a batch fed
        elsewhere by reading the store (for two leases at most: a feeder that died leaves its items to adoption)."""
        active = self._active.get(batch_id)
        while active is not None and active.running and not active.lost:
            await self.changed(1.0)
        if active is not None or not self.leased:
            return
        until = time.monotonic() + 2 * self.lease_seconds
        while time.monotonic() < until:
            batch = await self.store.get(batch_id)
            if batch is None or not batch.counts.get(RUNNING):
                return
            await asyncio.sleep(POLL_SECONDS)

    async def _forget_jobs(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            with contextlib.suppress(UnknownRequest):
                await self._forget(job_id)
