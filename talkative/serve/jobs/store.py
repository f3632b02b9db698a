"""The job store: every job's record, in the database the stores share (`database.py`: SQLite under DATA_DIR by
default, PostgreSQL for a cluster).

A job is written before the client hears of it, every status change is written as it happens, and results stay
for the retention period. On start, jobs a previous process left `queued` or `processing` are handed back to be
run again. The async methods queue their work on the store's channel thread, in order, so the event loop never
waits on the disk or the network.

Leases. When several processes (ingress replicas) share one store, each unfinished job is run by one of them at a
time: the runner that `claim`ed it, for as long as it keeps `renew`ing its lease (leases are measured on the
database's clock, which every replica shares). A runner that dies stops renewing; once its leases expire, its jobs
are `adoptable` and another replica claims and runs them again. A job's end is written by `finish`, once: only if
the job is not terminal yet and the runner still holds it, so a runner that lost its lease (it was slow, not dead)
writes nothing and cannot overwrite the result of the runner that took over. `request_cancel` lets any replica ask
the runner of a job to cancel it; the runner hears of it in its next `renew`. The local backend runs everything in
one process as runner `local`, and at start runs every unfinished job again, as before leases existed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .database import Database, Row, Tables
from .dialect import upsert
from .record import PROCESSING, QUEUED, TERMINAL, Job

log = logging.getLogger("talkative.serve.jobs.store")

#: the runner id of the local backend (one process runs every job)
LOCAL_RUNNER = "local"

COLUMNS = (
    "id",
    "kind",
    "status",
    "model_id",
    "group_id",
    "client_request_id",
    "owner",
    "created_at",
    "started_at",
    "completed_at",
    "request",
    "result",
    "error",
    "progress",
    "attempts",
)
JSON_COLUMNS = {"request", "result", "progress"}
#: what a history listing reads: everything but the result (and of the result only its summary and length)
SUMMARY_COLUMNS = (
    "id",
    "kind",
    "status",
    "model_id",
    "client_request_id",
    "created_at",
    "started_at",
    "completed_at",
    "request",
    "error",
)
JobSummary = dict[str, Any]


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), allow_nan=False)


def _row(job: Job) -> tuple[Any, ...]:
    values = []
    for col in COLUMNS:
        v = getattr(job, col)
        values.append(_dump(v) if col in JSON_COLUMNS else v)
    return tuple(values)


def _job(row: Row) -> Job:
    data = {col: row[col] for col in COLUMNS}
    for col in JSON_COLUMNS:
        data[col] = json.loads(data[col]) if data[col] is not None else None
    data["progress"] = data["progress"] or {}
    return Job(**data)


@dataclass(frozen=True)
class Renewal:
    """What a runner's `renew` found: the unfinished jobs it still holds (their leases now extended), and those of
    them someone asked to cancel."""

    held: list[str]
    cancel_requested: list[str]


class JobStore(Tables):
    def __init__(self, database: Database | Path) -> None:
        super().__init__(database, "job-store")
        #: where the jobs are, for log lines (a file, or a URL without its password)
        self.path = self.database.location

    # -- operations (run on the store thread) ---------------------------------------------------------------------
    def _put(self, job: Job) -> None:
        self._conn().execute(upsert("jobs", COLUMNS, "id"), _row(job))

    def _get(self, job_id: str) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def _unfinished(self) -> list[Job]:
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY created_at", (QUEUED, PROCESSING)
        )
        return [_job(r) for r in rows]

    def _purge(self, before: float) -> int:
        cur = self._conn().execute(
            f"DELETE FROM jobs WHERE status IN ({_marks(TERMINAL)}) AND completed_at < ?",
            (*sorted(TERMINAL), before),
        )
        return cur.rowcount

    def _delete(self, job_id: str) -> bool:
        return self._conn().execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0

    def _count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM jobs").fetchone()[0])

    def _owned(
        self, owner: str, kinds: tuple[str, ...], limit: int, offset: int
    ) -> tuple[list[JobSummary], int]:
        d = self.dialect
        # a batch's items are listed with their batch (GET /api/v1/batches), not one by one
        where = f"owner = ? AND kind IN ({_marks(kinds)}) AND {d.json_text('request', 'batch_id')} IS NULL"
        conn = self._conn()
        total = int(conn.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", (owner, *kinds)).fetchone()[0])
        rows = conn.execute(
            f"SELECT {','.join(SUMMARY_COLUMNS)}, {d.json_document('result', 'metadata.summary')} AS summary,"
            f" {d.json_length('result', 'tokens')} AS n_tokens FROM jobs WHERE {where}"
            " ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
            (owner, *kinds, limit, offset),
        )
        out = []
        for r in rows:
            item = {col: r[col] for col in SUMMARY_COLUMNS}
            item["request"] = json.loads(item["request"])
            item["summary"] = json.loads(r["summary"]) if r["summary"] else None
            item["n_tokens"] = r["n_tokens"]
            out.append(item)
        return out, total

    # -- leases (run on the store thread; each one statement, atomic on both backends) ----------------------------
    def _claim(self, job_id: str, runner: str, lease_seconds: float) -> bool:
        now = self.dialect.now
        cur = self._conn().execute(
            f"UPDATE jobs SET runner = ?, lease_until = {now} + ? WHERE id = ? AND status NOT IN ({_marks(TERMINAL)})"
            f" AND (runner IS NULL OR runner = ? OR lease_until IS NULL OR lease_until < {now})",
            (runner, lease_seconds, job_id, *sorted(TERMINAL), runner),
        )
        return cur.rowcount == 1

    def _renew(self, runner: str, lease_seconds: float) -> Renewal:
        rows = (
            self._conn()
            .execute(
                f"UPDATE jobs SET lease_until = {self.dialect.now} + ?"
                f" WHERE runner = ? AND status NOT IN ({_marks(TERMINAL)}) RETURNING id, cancel_requested",
                (lease_seconds, runner, *sorted(TERMINAL)),
            )
            .fetchall()
        )
        held = sorted(r["id"] for r in rows)
        return Renewal(held, sorted(r["id"] for r in rows if r["cancel_requested"]))

    def _release(self, job_id: str, runner: str) -> None:
        self._conn().execute(
            "UPDATE jobs SET runner = NULL, lease_until = NULL WHERE id = ? AND runner = ?", (job_id, runner)
        )

    def _adoptable(self, lease_grace: float, limit: int) -> list[Job]:
        now = self.dialect.now
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE status IN (?, ?) AND ("
            f"(runner IS NULL AND created_at < {now} - ?) OR (runner IS NOT NULL AND lease_until < {now}))"
            " ORDER BY created_at LIMIT ?",
            (QUEUED, PROCESSING, lease_grace, limit),
        )
        return [_job(r) for r in rows]

    def _finish(self, job: Job, runner: str | None) -> bool:
        values = dict(zip(COLUMNS, _row(job), strict=True))
        sets = ", ".join(f"{c} = ?" for c in COLUMNS if c != "id")
        where = f"id = ? AND status NOT IN ({_marks(TERMINAL)})"
        params: list[Any] = [values[c] for c in COLUMNS if c != "id"] + [job.id, *sorted(TERMINAL)]
        if runner is not None:
            where += " AND runner = ?"
            params.append(runner)
        return self._conn().execute(f"UPDATE jobs SET {sets} WHERE {where}", params).rowcount == 1

    def _request_cancel(self, job_id: str) -> bool:
        cur = self._conn().execute(
            f"UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status NOT IN ({_marks(TERMINAL)})",
            (job_id, *sorted(TERMINAL)),
        )
        return cur.rowcount == 1

    def _runner(self, job_id: str) -> str | None:
        row = self._conn().execute("SELECT runner FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row["runner"] if row else None

    # -- async API ------------------------------------------------------------------------------------------------
    async def put(self, job: Job) -> None:
        """Insert or update the whole record (jobs are small apart from results, written once); its lease stays."""
        await self._call(self._put, job)

    async def get(self, job_id: str) -> Job | None:
        return await self._call(self._get, job_id)

    async def unfinished(self) -> list[Job]:
        return await self._call(self._unfinished)

    async def purge(self, retention_seconds: float, now: float | None = None) -> int:
        return await self._call(self._purge, (now or time.time()) - retention_seconds)

    async def delete(self, job_id: str) -> bool:
        """Remove a job and its result for good; whether there was one."""
        return await self._call(self._delete, job_id)

    async def count(self) -> int:
        return await self._call(self._count)

    async def owned(
        self, owner: str, kinds: tuple[str, ...], limit: int, offset: int = 0
    ) -> tuple[list[JobSummary], int]:
        """One owner's jobs of the given kinds, newest first, without their results (a page of a history list),
        and how many there are in all."""
        return await self._call(self._owned, owner, kinds, limit, offset)

    async def claim(self, job_id: str, runner: str, lease_seconds: float) -> bool:
        """Take the job for `runner` for `lease_seconds`: when it is not terminal and nobody holds it, its lease
        expired, or `runner` already holds it. Of runners claiming at once, exactly one gets True."""
        return await self._call(self._claim, job_id, runner, lease_seconds)

    async def renew(self, runner: str, lease_seconds: float) -> Renewal:
        """Extend every lease `runner` holds on unfinished jobs to `lease_seconds` from now. A job missing from
        `held` was taken over (or ended): its runner stops working on it."""
        return await self._call(self._renew, runner, lease_seconds)

    async def release(self, job_id: str, runner: str) -> None:
        """Give a job back unfinished (nothing when `runner` does not hold it): it is adoptable at once."""
        await self._call(self._release, job_id, runner)

    async def adoptable(self, lease_grace: float, limit: int = 100) -> list[Job]:
        """Unfinished jobs nobody runs, oldest first: their lease expired, or they were never claimed (or given
        back) and are older than `lease_grace` (a job just written is about to be claimed by its writer)."""
        return await self._call(self._adoptable, lease_grace, limit)

    async def finish(self, job: Job, runner: str | None) -> bool:
        """Write a terminal job, once: only when its record is not terminal yet and (unless `runner` is None)
        `runner` still holds it. False, and nothing written, when it already ended or another runner took it."""
        if not job.terminal:
            raise ValueError(f"finish() writes terminal jobs; job {job.id} is {job.status}")
        return await self._call(self._finish, job, runner)

    async def request_cancel(self, job_id: str) -> bool:
        """Ask the job's runner, whichever replica it is, to cancel it (it hears of it in its next `renew`); False
        when the job is unknown or already ended."""
        return await self._call(self._request_cancel, job_id)

    async def runner(self, job_id: str) -> str | None:
        """The runner holding (or last holding) a job's lease; None when nobody claimed it or it is unknown."""
        return await self._call(self._runner, job_id)


def _marks(values: Any) -> str:
    return ", ".join("?" * len(values))
