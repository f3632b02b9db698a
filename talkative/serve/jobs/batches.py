"""Batch jobs: many analyses submitted as one, run as ordinary analysis jobs, kept item by item in the store.

A batch is a list of items (`{id, text | messages, options}`) with shared defaults (a model, options). It is
written to the job store's database (tables `batches` and `batch_items`, in `jobs/migrations.py`) before the
client hears of it; then `Batches` feeds its items to the scheduler as analysis jobs, a few at a time, marked as
batch items so that the scheduling policy gives interactive requests priority (`scheduling/policy.py`). Each item's
result line is written to the store the moment its job ends, before any reader can see it; results are read back in
completion order (`done_seq`).

Durable: a restart finds the unfinished batches in the store and carries on. An item whose job the previous process
had submitted is followed again (the scheduler recovers the job itself, or it already finished and its stored
result is taken), so nothing that finished is computed again; only items never finished run.

Why items are whole jobs rather than chunks of one big job: every job already has the scheduler's durability,
timeouts, cancellation, chunking into shared engine batches and failure isolation, so a batch adds bookkeeping, not
a second execution path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..catalog.registry import UnknownModel
from ..scheduling.types import SchedulerError
from .database import Database, Row, Tables
from .record import CANCELLED, COMPLETED, FAILED, Job, UnknownRequest, iso, new_id

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger("talkative.serve.jobs.batches")

#: the key of an analysis job's request that names the batch it is an item of (what marks it as batch work)
BATCH_KEY = "batch_id"
#: batch statuses: queued (no item started yet) -> running -> completed | cancelled (terminal)
QUEUED, RUNNING = "queued", "running"
UNFINISHED = (QUEUED, RUNNING)
#: item statuses: pending -> running -> completed | failed | cancelled
PENDING = "pending"
#: an item whose job was cancelled by someone else than its batch (an administrator's reset) runs again, this often
RESUBMITS = 3
#: how long a waiting item submission backs off when the queue is full or the server is not ready
BACKOFF_SECONDS = 1.0


def is_batch_item(job: Job) -> bool:
    """Whether an analysis job is an item of a batch (it then yields to interactive jobs)."""
    return job.request.get(BATCH_KEY) is not None


# -- the records -------------------------------------------------------------------------------------------------------
@dataclass
class ItemSpec:
    """One item as submitted: its client id, the line of the upload it came from, and either the engine request
    (`{text | messages, options}`) or why it could not be read (then it fails at once)."""

    item_id: Any  # the client's id, a string or an integer (None when a malformed line had none)
    request: dict[str, Any] | None
    error: str | None = None
    line: int | None = None


@dataclass
class Batch:
    """A batch as stored, with its items counted by status and the positions its finished items hold."""

    id: str
    owner: str | None
    status: str
    model_id: str
    options: dict[str, Any]
    source: str  # json | jsonl: whether result lines carry the upload's line numbers
    total: int
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    positions: int = 0  # positions of the completed items

    @property
    def terminal(self) -> bool:
        return self.status not in UNFINISHED


def _line(spec_id: Any, status: str, line: int | None, **fields: Any) -> str:
    """One result line: `{id, status, [line], tokens, metadata}` or `{id, status, [line], error}`."""
    body: dict[str, Any] = {"id": spec_id, "status": status}
    if line is not None:
        body["line"] = line
    body.update(fields)
    return json.dumps(body, separators=(",", ":"), allow_nan=False)


# -- the store ---------------------------------------------------------------------------------------------------------
class BatchStore(Tables):
    """The batches' tables of the job store's database, on a channel of their own (the event loop never waits on
    the database, and the job store's calls never wait behind the batches')."""

    def __init__(self, database: Database | Path) -> None:
        super().__init__(database, "batch-store")

    # -- on the store thread ------------------------------------------------------------------------------------
    def _create(self, batch: Batch, items: Sequence[ItemSpec]) -> None:
        conn = self._conn()
        with conn.transaction():
            conn.execute(
                "INSERT INTO batches (id, owner, status, model_id, options, source, total, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    batch.id,
                    batch.owner,
                    batch.status,
                    batch.model_id,
                    json.dumps(batch.options),
                    batch.source,
                    batch.total,
                    batch.created_at,
                ),
            )
            done = itertools.count(1)
            rows: list[tuple[Any, ...]] = []
            for seq, spec in enumerate(items):
                if spec.error is not None:  # unreadable: failed at once, first in completion order
                    result = _line(spec.item_id, FAILED, spec.line, error=spec.error)
                    rows.append(
                        (batch.id, seq, json.dumps(spec.item_id), spec.line, None, FAILED, next(done), result)
                    )
                else:
                    request = json.dumps(spec.request)
                    rows.append(
                        (batch.id, seq, json.dumps(spec.item_id), spec.line, request, PENDING, None, None)
                    )
            conn.executemany(
                "INSERT INTO batch_items (batch_id, seq, item_id, line, request, status, done_seq, result)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def _batch(self, row: Row) -> Batch:
        conn = self._conn()
        counts: dict[str, int] = {}
        positions = 0
        for status, n, pos in conn.execute(
            "SELECT status, COUNT(*), COALESCE(SUM(positions), 0) FROM batch_items WHERE batch_id = ? GROUP BY status",
            (row["id"],),
        ):
            counts[status] = int(n)
            if status == COMPLETED:
                positions = int(pos)
        return Batch(
            id=row["id"],
            owner=row["owner"],
            status=row["status"],
            model_id=row["model_id"],
            options=json.loads(row["options"]),
            source=row["source"],
            total=row["total"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            completed_at=row["completed_at"],
            counts=counts,
            positions=positions,
        )

    def _get(self, batch_id: str) -> Batch | None:
        row = self._conn().execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return self._batch(row) if row else None

    def _listing(self, owner: str | None, limit: int, offset: int) -> tuple[list[Batch], int]:
        conn = self._conn()
        where, args = (f"WHERE owner {self.dialect.same} ?", (owner,)) if owner is not None else ("", ())
        total = int(conn.execute(f"SELECT COUNT(*) FROM batches {where}", args).fetchone()[0])
        rows = conn.execute(
            f"SELECT * FROM batches {where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
            (*args, limit, offset),
        ).fetchall()
        return [self._batch(r) for r in rows], total

    def _unfinished(self) -> list[Batch]:
        rows = (
            self._conn()
            .execute("SELECT * FROM batches WHERE status IN (?, ?) ORDER BY created_at", UNFINISHED)
            .fetchall()
        )
        return [self._batch(r) for r in rows]

    def _in_flight(self, owner: str | None) -> int:
        row = (
            self._conn()
            .execute(
                f"SELECT COUNT(*) FROM batches WHERE owner {self.dialect.same} ? AND status IN (?, ?)",
                (owner, *UNFINISHED),
            )
            .fetchone()
        )
        return int(row[0])

    def _items(self, batch_id: str, status: str) -> list[tuple[int, str | None]]:
        rows = self._conn().execute(
            "SELECT seq, job_id FROM batch_items WHERE batch_id = ? AND status = ? ORDER BY seq",
            (batch_id, status),
        )
        return [(int(r["seq"]), r["job_id"]) for r in rows]

    def _request(self, batch_id: str, seq: int) -> tuple[dict[str, Any], Any, int | None]:
        row = (
            self._conn()
            .execute(
                "SELECT request, item_id, line FROM batch_items WHERE batch_id = ? AND seq = ?",
                (batch_id, seq),
            )
            .fetchone()
        )
        return json.loads(row["request"]), json.loads(row["item_id"]), row["line"]

    def _set_item(self, batch_id: str, seq: int, status: str, job_id: str | None) -> None:
        self._conn().execute(
            "UPDATE batch_items SET status = ?, job_id = ? WHERE batch_id = ? AND seq = ?",
            (status, job_id, batch_id, seq),
        )

    def _record(
        self, batch_id: str, seq: int, status: str, positions: int | None, result: str | None
    ) -> int | None:
        """An item's end, numbered in completion order; a line only for completed and failed items."""
        conn = self._conn()
        # read-then-write (the next completion number): one writer of a batch's items at a time
        with conn.transaction(lock=f"batch:{batch_id}"):
            done = None
            if result is not None:
                row = conn.execute(
                    "SELECT COALESCE(MAX(done_seq), 0) FROM batch_items WHERE batch_id = ?", (batch_id,)
                ).fetchone()
                done = int(row[0]) + 1
            conn.execute(
                "UPDATE batch_items SET status = ?, done_seq = ?, positions = ?, result = ?"
                " WHERE batch_id = ? AND seq = ?",
                (status, done, positions, result, batch_id, seq),
            )
        return done

    def _set_batch(self, batch_id: str, status: str, column: str | None, when: float | None) -> None:
        if column is None:
            self._conn().execute("UPDATE batches SET status = ? WHERE id = ?", (status, batch_id))
        else:
            assert column in ("started_at", "completed_at")
            self._conn().execute(
                f"UPDATE batches SET status = ?, {column} = ? WHERE id = ?", (status, when, batch_id)
            )

    def _cancel_pending(self, batch_id: str) -> None:
        self._conn().execute(
            "UPDATE batch_items SET status = ? WHERE batch_id = ? AND status = ?",
            (CANCELLED, batch_id, PENDING),
        )

    def _results(self, batch_id: str, after: int, limit: int) -> list[str]:
        rows = self._conn().execute(
            "SELECT result FROM batch_items WHERE batch_id = ? AND done_seq > ? ORDER BY done_seq LIMIT ?",
            (batch_id, after, limit),
        )
        return [r["result"] for r in rows]

    def _job_ids(self, batch_id: str) -> list[str]:
        rows = self._conn().execute(
            "SELECT job_id FROM batch_items WHERE batch_id = ? AND job_id IS NOT NULL", (batch_id,)
        )
        return [r["job_id"] for r in rows]

    def _delete(self, batch_id: str) -> None:
        """The batch and its items (their jobs are removed by the job store and the result cache, `Batches`)."""
        conn = self._conn()
        with conn.transaction():
            conn.execute("DELETE FROM batch_items WHERE batch_id = ?", (batch_id,))
            conn.execute("DELETE FROM batches WHERE id = ?", (batch_id,))

    def _purge(self, before: float) -> int:
        rows = (
            self._conn()
            .execute(
                "SELECT id FROM batches WHERE status NOT IN (?, ?) AND completed_at < ?",
                (*UNFINISHED, before),
            )
            .fetchall()
        )
        for r in rows:
            self._delete(r["id"])
        return len(rows)

    # -- awaited ------------------------------------------------------------------------------------------------
    async def create(self, batch: Batch, items: Sequence[ItemSpec]) -> None:
        """The batch and all its items in one transaction: either the client hears of all of it, or of none."""
        await self._call(self._create, batch, items)

    async def get(self, batch_id: str) -> Batch | None:
        return await self._call(self._get, batch_id)

    async def listing(self, owner: str | None, limit: int, offset: int = 0) -> tuple[list[Batch], int]:
        """A page of batches (one owner's, or everyone's for None), newest first, and how many there are."""
        return await self._call(self._listing, owner, limit, offset)

    async def unfinished(self) -> list[Batch]:
        return await self._call(self._unfinished)

    async def in_flight(self, owner: str | None) -> int:
        return await self._call(self._in_flight, owner)

    async def items(self, batch_id: str, status: str) -> list[tuple[int, str | None]]:
        """(seq, job id) of a batch's items in a status, in submission order."""
        return await self._call(self._items, batch_id, status)

    async def request(self, batch_id: str, seq: int) -> tuple[dict[str, Any], Any, int | None]:
        """An item's engine request, its client id and its line."""
        return await self._call(self._request, batch_id, seq)

    async def set_item(self, batch_id: str, seq: int, status: str, job_id: str | None = None) -> None:
        await self._call(self._set_item, batch_id, seq, status, job_id)

    async def record(
        self, batch_id: str, seq: int, status: str, positions: int | None = None, result: str | None = None
    ) -> int | None:
        return await self._call(self._record, batch_id, seq, status, positions, result)

    async def set_batch(
        self, batch_id: str, status: str, column: str | None = None, when: float | None = None
    ) -> None:
        await self._call(self._set_batch, batch_id, status, column, when)

    async def cancel_pending(self, batch_id: str) -> None:
        await self._call(self._cancel_pending, batch_id)

    async def results(self, batch_id: str, after: int = 0, limit: int = 500) -> list[str]:
        """Result lines (JSON text) after the first `after`, in completion order."""
        return await self._call(self._results, batch_id, after, limit)

    async def job_ids(self, batch_id: str) -> list[str]:
        """The jobs a batch's items ran as."""
        return await self._call(self._job_ids, batch_id)

    async def delete(self, batch_id: str) -> None:
        await self._call(self._delete, batch_id)

    async def purge(self, before: float) -> int:
        return await self._call(self._purge, before)


# -- feeding the scheduler ---------------------------------------------------------------------------------------------
class JobRunner(Protocol):
    """What `Batches` needs of the scheduler: its unfinished jobs (for live progress), wait for a job, look one up,
    cancel one."""

    @property
    def jobs(self) -> dict[str, Job]: ...

    async def wait(self, job_id: str, timeout: float | None = None) -> Job: ...
    async def get(self, job_id: str) -> Job | None: ...
    async def cancel(self, job_id: str, reason: str = ...) -> Job: ...


Submit = Callable[..., Awaitable[Job]]
Forget = Callable[[str], Awaitable[None]]


@dataclass
class Active:
    """An unfinished batch as this process runs it: its items not yet submitted, its items' jobs in flight, and
    what its rate is measured from."""

    batch: Batch
    pending: deque[int]
    running: dict[int, str] = field(default_factory=dict)  # seq -> job id
    resubmits: dict[int, int] = field(default_factory=dict)
    since: float | None = None  # when this process first had one of its items finish
    positions_since: int = 0
    cancelling: bool = False


class Batches:
    """Every batch of the server: submission (with the per-key limits), progress, results, cancel and delete; and
    the loop that feeds unfinished batches' items to the scheduler, round robin between batches, a few at a time.

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
    ) -> None:
        self.settings = settings
        self.store = store
        self.scheduler = scheduler
        self._submit = submit
        self._forget = forget  # removes a job for good: its record, its result and its cached rows
        self.depth = devices * settings.max_active_batch_jobs + 1
        self._active: dict[str, Active] = {}
        self._order: deque[str] = deque()  # round robin over active batches
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        # a key's in-flight count and its new batch, checked and stored as one
        self._admitting = asyncio.Lock()
        self._stopping = False

    # -- life cycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Carry on the batches a previous process left unfinished, then feed."""
        for batch in await self.store.unfinished():
            await self._resume(batch)
        self._spawn(self._feed_loop())
        self._spawn(self._purge_loop())
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
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
        pending = deque(seq for seq, _ in await self.store.items(batch.id, PENDING))
        active = Active(batch, pending)
        self._activate(active)
        for seq, job_id in await self.store.items(batch.id, RUNNING):
            job = await self.scheduler.get(job_id) if job_id else None
            if job is None:  # submitted, but its job never reached the store: run it again
                await self.store.set_item(batch.id, seq, PENDING)
                active.pending.appendleft(seq)
                continue
            active.running[seq] = job.id
            self._spawn(self._follow(active, seq, job.id))
        log.info(
            "resuming batch %s: %d items to run, %d in flight",
            batch.id,
            len(active.pending),
            len(active.running),
        )
        if not active.pending and not active.running:
            await self._maybe_finish(active)

    def _activate(self, active: Active) -> None:
        self._active[active.batch.id] = active
        self._order.append(active.batch.id)

    # -- submission ---------------------------------------------------------------------------------------------
    async def submit(
        self,
        owner: str | None,
        model_id: str,
        options: dict[str, Any],
        items: Sequence[ItemSpec],
        source: str,
    ) -> Batch:
        """Store a new batch (all of it, before anyone hears of it) and start feeding its items."""
        async with self._admitting:
            limit = self.settings.max_batches_in_flight
            if await self.store.in_flight(owner) >= limit:
                raise SchedulerError(
                    429,
                    f"you have {limit} unfinished batches, the most one client may have (MAX_BATCHES_IN_FLIGHT); "
                    "wait for one to finish or cancel one",
                    reason="batches_in_flight",
                    retry_after=30,
                )
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
            await self.store.create(batch, items)
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
        request, item_id, line = await self.store.request(batch.id, seq)
        try:
            job = await self._submit(
                {**request, BATCH_KEY: batch.id},
                model_id=batch.model_id,
                client_request_id=None,
                # the owner's job (its /status, its cached rows), counted against the batch's limits instead of
                # the owner's interactive cap, and listed with its batch instead of in the owner's history
                owner=batch.owner,
            )
        except SchedulerError as exc:
            if exc.status in (429, 503):
                return False
            await self._end_item(active, seq, FAILED, _line(item_id, FAILED, line, error=exc.detail))
            return True
        except UnknownModel as exc:
            await self._end_item(active, seq, FAILED, _line(item_id, FAILED, line, error=str(exc)))
            return True
        active.running[seq] = job.id
        await self.store.set_item(batch.id, seq, RUNNING, job.id)
        if active.cancelling:  # the batch was cancelled while this item was being submitted
            await self._cancel_job(job.id)
        if batch.status == QUEUED:
            batch.status, batch.started_at = RUNNING, time.time()
            await self.store.set_batch(batch.id, RUNNING, "started_at", batch.started_at)
        self._spawn(self._follow(active, seq, job.id))
        return True

    async def _follow(self, active: Active, seq: int, job_id: str) -> None:
        """Wait for an item's job, then store its outcome (the result line before anyone can read it)."""
        try:
            job = await self.scheduler.wait(job_id)
        except UnknownRequest:  # its job is gone from the store: run the item again
            job = None
        batch = active.batch
        interrupted = job is None or (job.status == CANCELLED and not active.cancelling)
        if interrupted and active.resubmits.get(seq, 0) < RESUBMITS:
            active.resubmits[seq] = active.resubmits.get(seq, 0) + 1
            active.running.pop(seq, None)
            await self.store.set_item(batch.id, seq, PENDING)
            active.pending.appendleft(seq)
            self._wake.set()
            return
        _, item_id, line = await self.store.request(batch.id, seq)
        if job is None:
            await self._end_item(active, seq, FAILED, _line(item_id, FAILED, line, error="its job was lost"))
        elif job.status == COMPLETED and job.result is not None:
            result = job.result
            tokens = result.get("tokens", [])
            if active.since is None:
                active.since = job.started_at or time.time()
            active.positions_since += len(tokens)
            text = _line(
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
                active, seq, FAILED, _line(item_id, FAILED, line, error=job.error or "failed")
            )

    async def _end_item(
        self, active: Active, seq: int, status: str, result: str | None, positions: int | None = None
    ) -> None:
        await self.store.record(active.batch.id, seq, status, positions, result)
        active.running.pop(seq, None)
        self._notify()
        self._wake.set()
        await self._maybe_finish(active)

    async def _maybe_finish(self, active: Active) -> None:
        if active.pending or active.running:
            return
        batch = active.batch
        status = CANCELLED if active.cancelling else COMPLETED
        batch.status, batch.completed_at = status, time.time()
        await self.store.set_batch(batch.id, status, "completed_at", batch.completed_at)
        self._active.pop(batch.id, None)
        if batch.id in self._order:
            self._order.remove(batch.id)
        self._notify()

    def _notify(self) -> None:
        """Wake every reader following results or progress (they read the store again)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float) -> None:
        """Return once something changed in any batch, or after `timeout` seconds."""
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
        """What `GET /api/v1/batches/{id}` answers: counts, positions, rate and ETA."""
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
        """Cancel an unfinished batch: items not started never run, items running stop; finished items stay."""
        batch = await self.get(batch_id)
        if batch.terminal:
            raise SchedulerError(409, f"batch {batch_id} is already {batch.status}")
        active = self._active.get(batch_id)
        if active is None:  # stored unfinished but not run by this process (cannot happen after start)
            await self.store.cancel_pending(batch_id)
            await self.store.set_batch(batch_id, CANCELLED, "completed_at", time.time())
            return await self.get(batch_id)
        active.cancelling = True
        active.pending.clear()
        await self.store.cancel_pending(batch_id)
        # terminal for its readers at once; the items still running record their ends as their jobs stop
        batch.status, batch.completed_at = CANCELLED, time.time()
        active.batch.status = CANCELLED
        await self.store.set_batch(batch_id, CANCELLED, "completed_at", batch.completed_at)
        for job_id in list(active.running.values()):
            await self._cancel_job(job_id)
        await self._maybe_finish(active)
        self._notify()
        return await self.get(batch_id)

    async def _cancel_job(self, job_id: str) -> None:
        with contextlib.suppress(SchedulerError, UnknownRequest):  # it ended meanwhile: its end is recorded
            await self.scheduler.cancel(job_id, reason="cancelled: its batch was cancelled")

    async def delete(self, batch_id: str) -> None:
        """Remove a batch and its results (an unfinished one is cancelled first)."""
        batch = await self.get(batch_id)
        if not batch.terminal:
            await self.cancel(batch_id)
            active = self._active.get(batch_id)
            while active is not None and active.running:  # its jobs' last outcomes, then nothing writes again
                await self.changed(1.0)
        self._active.pop(batch_id, None)
        if batch_id in self._order:
            self._order.remove(batch_id)
        job_ids = await self.store.job_ids(batch_id)
        await self.store.delete(batch_id)
        self._notify()
        self._spawn(self._forget_jobs(job_ids))  # the batch is gone at once; its items' jobs follow

    async def _forget_jobs(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            with contextlib.suppress(UnknownRequest):
                await self._forget(job_id)
