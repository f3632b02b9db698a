"""The batches' tables of the job store's database: a batch and its items (`batches`, `batch_items`, in
`migrations.py`), each item's result line once it is done, and the batch's lease.

Leases. When several ingress replicas share one database, each open batch is fed by one of them at a time: the
runner that created or `claim`ed it, for as long as it `renew`s its lease (on the database's clock, which every
replica shares). A replica that dies stops renewing; once its lease expires, the batch is `adoptable` and another
replica claims it and carries it on. Every write the feeder makes (an item submitted, an item's outcome, the
batch's status) names its runner and lands only while that runner still holds the batch, so a replica that lost
its lease (it was slow, not dead) writes nothing; an item's outcome lands only while the item is still pending or
running, so an item's line is written once even when two replicas briefly both believed they fed it.
`request_cancel` lets any replica ask the feeder to cancel a batch; the feeder hears of it in its next `renew`. The
local backend passes no runner: one process owns every batch, and the writes are not guarded by a lease.

A batch is *open* while a runner still has work on it: it is queued or running, or it was cancelled while items
ran whose ends are not recorded yet (their jobs are being stopped). Open batches are the ones carried on after a
restart and the ones leases cover.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .database import Database, Row, Tables
from .record import CANCELLED, COMPLETED, FAILED
from .store import Renewal

#: batch statuses: queued (no item started yet) -> running -> completed | cancelled (terminal)
QUEUED, RUNNING = "queued", "running"
UNFINISHED = (QUEUED, RUNNING)
#: item statuses: pending -> running -> completed | failed | cancelled
PENDING = "pending"
#: the item statuses whose outcome is still to be written
OPEN_ITEMS = (PENDING, RUNNING)

#: the batches a runner still has work on (see the module's docstring); constants only, no parameters
OPEN = (
    f"(status IN ('{QUEUED}', '{RUNNING}') OR (status = '{CANCELLED}' AND EXISTS (SELECT 1 FROM batch_items"
    f" WHERE batch_items.batch_id = batches.id AND batch_items.status = '{RUNNING}')))"
)
#: a guarded write lands only while the runner named holds the batch (its parameters: batch id, runner)
HELD = "EXISTS (SELECT 1 FROM batches WHERE batches.id = ? AND batches.runner = ?)"


class TooManyBatches(Exception):
    """The owner already has as many unfinished batches as one client may have."""


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
    cancel_requested: bool = False  # someone asked its feeder, from any replica, to cancel it

    @property
    def terminal(self) -> bool:
        return self.status not in UNFINISHED


def result_line(spec_id: Any, status: str, line: int | None, **fields: Any) -> str:
    """One result line: `{id, status, [line], tokens, metadata}` or `{id, status, [line], error}`."""
    body: dict[str, Any] = {"id": spec_id, "status": status}
    if line is not None:
        body["line"] = line
    body.update(fields)
    return json.dumps(body, separators=(",", ":"), allow_nan=False)


class BatchStore(Tables):
    """The batches' tables of the job store's database, on a channel of their own (the event loop never waits on
    the database, and the job store's calls never wait behind the batches').

    The writes of a batch's feeder take `runner`: its runner id with leases (the write lands only while it holds
    the batch), or None for the local backend's one process."""

    def __init__(self, database: Database | Path) -> None:
        super().__init__(database, "batch-store")

    def _guard(self, batch_id: str, runner: str | None) -> tuple[str, tuple[Any, ...]]:
        """The condition (and its parameters) a feeder's write adds: that `runner` still holds the batch."""
        if runner is None:
            return "", ()
        return f" AND {HELD}", (batch_id, runner)

    # -- on the store thread ------------------------------------------------------------------------------------
    def _create(
        self,
        batch: Batch,
        items: Sequence[ItemSpec],
        limit: int,
        runner: str | None,
        lease_seconds: float,
    ) -> None:
        conn = self._conn()
        # the owner's count and the new batch as one, on every replica: a key's limit holds cluster-wide
        with conn.transaction(lock=f"batches-of:{batch.owner}"):
            if self._in_flight(batch.owner) >= limit:
                raise TooManyBatches(batch.owner)
            conn.execute(
                "INSERT INTO batches (id, owner, status, model_id, options, source, total, created_at, runner,"
                f" lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, {self.dialect.now} + ?)",
                (
                    batch.id,
                    batch.owner,
                    batch.status,
                    batch.model_id,
                    json.dumps(batch.options),
                    batch.source,
                    batch.total,
                    batch.created_at,
                    runner,
                    lease_seconds if runner is not None else None,
                ),
            )
            done = itertools.count(1)
            rows: list[tuple[Any, ...]] = []
            for seq, spec in enumerate(items):
                if spec.error is not None:  # unreadable: failed at once, first in completion order
                    result = result_line(spec.item_id, FAILED, spec.line, error=spec.error)
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
            cancel_requested=bool(row["cancel_requested"]),
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

    def _open(self) -> list[Batch]:
        rows = self._conn().execute(f"SELECT * FROM batches WHERE {OPEN} ORDER BY created_at").fetchall()
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

    def _set_item(self, batch_id: str, seq: int, status: str, job_id: str | None, runner: str | None) -> bool:
        guard, held = self._guard(batch_id, runner)
        cur = self._conn().execute(
            f"UPDATE batch_items SET status = ?, job_id = ? WHERE batch_id = ? AND seq = ?{guard}",
            (status, job_id, batch_id, seq, *held),
        )
        return cur.rowcount == 1

    def _record(
        self,
        batch_id: str,
        seq: int,
        status: str,
        positions: int | None,
        result: str | None,
        runner: str | None,
    ) -> bool:
        """An item's end, numbered in completion order (a line only for completed and failed items); written only
        while the item's outcome is still open and, with `runner`, while that runner holds the batch."""
        conn = self._conn()
        guard, held = self._guard(batch_id, runner)
        # read-then-write (the next completion number): one writer of a batch's items at a time
        with conn.transaction(lock=f"batch:{batch_id}"):
            done = None
            if result is not None:
                row = conn.execute(
                    "SELECT COALESCE(MAX(done_seq), 0) FROM batch_items WHERE batch_id = ?", (batch_id,)
                ).fetchone()
                done = int(row[0]) + 1
            cur = conn.execute(
                "UPDATE batch_items SET status = ?, done_seq = ?, positions = ?, result = ?"
                f" WHERE batch_id = ? AND seq = ? AND status IN (?, ?){guard}",
                (status, done, positions, result, batch_id, seq, *OPEN_ITEMS, *held),
            )
        return cur.rowcount == 1

    def _set_batch(
        self, batch_id: str, status: str, column: str | None, when: float | None, runner: str | None
    ) -> bool:
        guard, held = ("", ()) if runner is None else (" AND runner = ?", (runner,))
        sets = "status = ?"
        args: list[Any] = [status]
        if column is not None:
            assert column in ("started_at", "completed_at")
            sets += f", {column} = ?"
            args.append(when)
        cur = self._conn().execute(f"UPDATE batches SET {sets} WHERE id = ?{guard}", (*args, batch_id, *held))
        return cur.rowcount == 1

    def _cancel_pending(self, batch_id: str, runner: str | None) -> None:
        guard, held = self._guard(batch_id, runner)
        self._conn().execute(
            f"UPDATE batch_items SET status = ? WHERE batch_id = ? AND status = ?{guard}",
            (CANCELLED, batch_id, PENDING, *held),
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

    # -- leases (on the store thread; each one statement, atomic on both backends) -------------------------------
    def _claim(self, batch_id: str, runner: str, lease_seconds: float) -> bool:
        now = self.dialect.now
        cur = self._conn().execute(
            f"UPDATE batches SET runner = ?, lease_until = {now} + ? WHERE id = ? AND {OPEN}"
            f" AND (runner IS NULL OR runner = ? OR lease_until IS NULL OR lease_until < {now})",
            (runner, lease_seconds, batch_id, runner),
        )
        return cur.rowcount == 1

    def _renew(self, runner: str, lease_seconds: float) -> Renewal:
        rows = (
            self._conn()
            .execute(
                f"UPDATE batches SET lease_until = {self.dialect.now} + ? WHERE runner = ? AND {OPEN}"
                " RETURNING id, cancel_requested",
                (lease_seconds, runner),
            )
            .fetchall()
        )
        return Renewal(sorted(r["id"] for r in rows), sorted(r["id"] for r in rows if r["cancel_requested"]))

    def _release(self, batch_id: str, runner: str) -> None:
        self._conn().execute(
            "UPDATE batches SET runner = NULL, lease_until = NULL WHERE id = ? AND runner = ?",
            (batch_id, runner),
        )

    def _adoptable(self, lease_grace: float, limit: int) -> list[Batch]:
        now = self.dialect.now
        rows = self._conn().execute(
            f"SELECT * FROM batches WHERE {OPEN} AND ("
            f"(runner IS NULL AND created_at < {now} - ?) OR (runner IS NOT NULL AND lease_until < {now}))"
            " ORDER BY created_at LIMIT ?",
            (lease_grace, limit),
        )
        return [self._batch(r) for r in rows.fetchall()]

    def _request_cancel(self, batch_id: str) -> bool:
        cur = self._conn().execute(
            "UPDATE batches SET cancel_requested = 1 WHERE id = ? AND status IN (?, ?)",
            (batch_id, *UNFINISHED),
        )
        return cur.rowcount == 1

    def _runner(self, batch_id: str) -> str | None:
        row = self._conn().execute("SELECT runner FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return row["runner"] if row else None

    # -- awaited ------------------------------------------------------------------------------------------------
    async def create(
        self,
        batch: Batch,
        items: Sequence[ItemSpec],
        limit: int,
        runner: str | None = None,
        lease_seconds: float = 0.0,
    ) -> None:
        """The batch and all its items in one transaction (either the client hears of all of it, or of none),
        claimed for `runner` when it is given; `TooManyBatches` instead when the owner already has `limit`
        unfinished batches."""
        await self._call(self._create, batch, items, limit, runner, lease_seconds)

    async def get(self, batch_id: str) -> Batch | None:
        return await self._call(self._get, batch_id)

    async def listing(self, owner: str | None, limit: int, offset: int = 0) -> tuple[list[Batch], int]:
        """A page of batches (one owner's, or everyone's for None), newest first, and how many there are."""
        return await self._call(self._listing, owner, limit, offset)

    async def open(self) -> list[Batch]:
        """The batches a runner still has work on, oldest first (what a restarted process carries on)."""
        return await self._call(self._open)

    async def in_flight(self, owner: str | None) -> int:
        return await self._call(self._in_flight, owner)

    async def items(self, batch_id: str, status: str) -> list[tuple[int, str | None]]:
        """(seq, job id) of a batch's items in a status, in submission order."""
        return await self._call(self._items, batch_id, status)

    async def request(self, batch_id: str, seq: int) -> tuple[dict[str, Any], Any, int | None]:
        """An item's engine request, its client id and its line."""
        return await self._call(self._request, batch_id, seq)

    async def set_item(
        self, batch_id: str, seq: int, status: str, job_id: str | None = None, runner: str | None = None
    ) -> bool:
        """Whether it was written (False: `runner` no longer holds the batch)."""
        return await self._call(self._set_item, batch_id, seq, status, job_id, runner)

    async def record(
        self,
        batch_id: str,
        seq: int,
        status: str,
        positions: int | None = None,
        result: str | None = None,
        runner: str | None = None,
    ) -> bool:
        """Write an item's end; False, and nothing written, when it had ended already or `runner` lost the
        batch."""
        return await self._call(self._record, batch_id, seq, status, positions, result, runner)

    async def set_batch(
        self,
        batch_id: str,
        status: str,
        column: str | None = None,
        when: float | None = None,
        runner: str | None = None,
    ) -> bool:
        return await self._call(self._set_batch, batch_id, status, column, when, runner)

    async def cancel_pending(self, batch_id: str, runner: str | None = None) -> None:
        await self._call(self._cancel_pending, batch_id, runner)

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

    async def claim(self, batch_id: str, runner: str, lease_seconds: float) -> bool:
        """Take an open batch for `runner` for `lease_seconds`: when nobody holds it, its lease expired, or
        `runner` holds it already. Of runners claiming at once, exactly one gets True."""
        return await self._call(self._claim, batch_id, runner, lease_seconds)

    async def renew(self, runner: str, lease_seconds: float) -> Renewal:
        """Extend every lease `runner` holds on open batches; an open batch it fed that is missing from `held`
        was taken over by another runner. `cancel_requested`: those of them someone asked to cancel."""
        return await self._call(self._renew, runner, lease_seconds)

    async def release(self, batch_id: str, runner: str) -> None:
        """Give a batch back unfinished (nothing when `runner` does not hold it): it is adoptable at once."""
        await self._call(self._release, batch_id, runner)

    async def adoptable(self, lease_grace: float, limit: int = 100) -> list[Batch]:
        """Open batches nobody feeds, oldest first: their lease expired, or nobody holds them (given back, or left
        by the local backend) and they are older than `lease_grace`."""
        return await self._call(self._adoptable, lease_grace, limit)

    async def request_cancel(self, batch_id: str) -> bool:
        """Ask a batch's feeder, whichever replica it is, to cancel it (it hears of it in its next `renew`); False
        when the batch is unknown or already ended."""
        return await self._call(self._request_cancel, batch_id)

    async def runner(self, batch_id: str) -> str | None:
        """The runner holding (or last holding) a batch's lease; None when nobody does or it is unknown."""
        return await self._call(self._runner, batch_id)
