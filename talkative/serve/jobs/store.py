"""The job store: SQLite in WAL mode under DATA_DIR.

A job is written before the client hears of it, every status change is written as it happens, and results stay
for the retention period. On start, jobs a previous process left `queued` or `processing` are handed back to be
run again. One connection, used from one thread: the async methods queue their work on that thread, so the event
loop never waits on the disk.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

from .database import Database, Tables
from .record import PROCESSING, QUEUED, TERMINAL, Job

log = logging.getLogger("talkative.serve.jobs.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    model_id TEXT,
    group_id TEXT,
    client_request_id TEXT,
    owner TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    request TEXT NOT NULL,
    result TEXT,
    error TEXT,
    progress TEXT,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE INDEX IF NOT EXISTS jobs_completed ON jobs(completed_at);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, created_at);
-- batch jobs (jobs/batches.py): a batch, and each of its items with the item's result line once it is done
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    owner TEXT,
    status TEXT NOT NULL,
    model_id TEXT NOT NULL,
    options TEXT NOT NULL,
    source TEXT NOT NULL,
    total INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL
);
CREATE INDEX IF NOT EXISTS batches_owner ON batches(owner, created_at);
CREATE TABLE IF NOT EXISTS batch_items (
    batch_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    item_id TEXT,
    line INTEGER,
    request TEXT,
    status TEXT NOT NULL,
    job_id TEXT,
    done_seq INTEGER,
    positions INTEGER,
    result TEXT,
    PRIMARY KEY (batch_id, seq)
);
CREATE INDEX IF NOT EXISTS batch_items_done ON batch_items(batch_id, done_seq);
CREATE INDEX IF NOT EXISTS batch_items_status ON batch_items(batch_id, status);
-- the result cache (jobs/cache.py): rows by key, each analysed input's positions, and the job that computed them
CREATE TABLE IF NOT EXISTS cache_rows (
    key TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    row TEXT NOT NULL,
    size INTEGER NOT NULL,
    used_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cache_rows_job ON cache_rows(job_id);
CREATE INDEX IF NOT EXISTS cache_rows_used ON cache_rows(used_at);
CREATE TABLE IF NOT EXISTS cache_inputs (
    key TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    entry TEXT NOT NULL,
    size INTEGER NOT NULL,
    used_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cache_inputs_job ON cache_inputs(job_id);
CREATE INDEX IF NOT EXISTS cache_inputs_used ON cache_inputs(used_at);
-- shares (jobs/shares.py): a link to one result, anchored at a position or a span, with a comment
CREATE TABLE IF NOT EXISTS shares (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    owner TEXT,
    anchor TEXT NOT NULL,
    comment TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS shares_request ON shares(request_id);
"""
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


def _job(row: sqlite3.Row) -> Job:
    data = {col: row[col] for col in COLUMNS}
    for col in JSON_COLUMNS:
        data[col] = json.loads(data[col]) if data[col] is not None else None
    data["progress"] = data["progress"] or {}
    return Job(**data)


def _private_directory(directory: Path) -> None:
    """Create the store's directory 0700: it holds every user's texts and results, for this account only. A
    directory that already exists is the operator's choice and is left as it is, with a warning when others can
    list it."""
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode passes through the umask, which may not be 077
    elif directory.stat().st_mode & 0o077:
        log.warning(
            "the job store's directory %s is accessible to other users (mode %o); 0700 keeps their texts private",
            directory,
            stat.S_IMODE(directory.stat().st_mode),
        )


def _private_file(path: Path) -> None:
    """The database (and its WAL and shared-memory files, which SQLite creates with the database's mode) 0600."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if part.exists():
            os.chmod(part, 0o600)


class JobStore(Tables):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        _private_directory(self.path.parent)
        _private_file(self.path)
        self.db = Database(self.path, "job-store")
        self.db.call_sync(self._init)

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _init(self) -> None:
        self._conn().executescript(SCHEMA)

    # -- operations (run on the store thread) ---------------------------------------------------------------------
    def _put(self, job: Job) -> None:
        marks = ",".join("?" * len(COLUMNS))
        self._conn().execute(f"INSERT OR REPLACE INTO jobs ({','.join(COLUMNS)}) VALUES ({marks})", _row(job))

    def _get(self, job_id: str) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def _unfinished(self) -> list[Job]:
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY created_at", (QUEUED, PROCESSING)
        )
        return [_job(r) for r in rows]

    def _purge(self, before: float) -> int:
        marks = ",".join("?" * len(TERMINAL))
        cur = self._conn().execute(
            f"DELETE FROM jobs WHERE status IN ({marks}) AND completed_at < ?", (*sorted(TERMINAL), before)
        )
        return cur.rowcount

    def _delete(self, job_id: str) -> bool:
        return self._conn().execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0

    def _count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM jobs").fetchone()[0])

    def _owned(
        self, owner: str, kinds: tuple[str, ...], limit: int, offset: int
    ) -> tuple[list[JobSummary], int]:
        # a batch's items are listed with their batch (GET /api/v1/batches), not one by one
        where = f"owner = ? AND kind IN ({','.join('?' * len(kinds))}) AND json_extract(request, '$.batch_id') IS NULL"
        conn = self._conn()
        total = int(conn.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", (owner, *kinds)).fetchone()[0])
        rows = conn.execute(
            f"SELECT {','.join(SUMMARY_COLUMNS)}, json_extract(result, '$.metadata.summary') AS summary,"
            f" json_array_length(result, '$.tokens') AS n_tokens FROM jobs WHERE {where}"
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

    # -- async API ------------------------------------------------------------------------------------------------
    async def put(self, job: Job) -> None:
        """Insert or replace the whole record (jobs are small apart from results, written once)."""
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
