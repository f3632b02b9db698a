"""Schema migrations: a SQLite file made before migrations existed opens with its data, each migration runs once
(even when several processes start at once on one database), a failed migration leaves nothing behind, and a schema
newer than the code is refused."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from at_once import at_once

from talkative.serve.jobs.batches import BatchStore
from talkative.serve.jobs.database import Database
from talkative.serve.jobs.migrations import LATEST, MIGRATIONS, Migration, SchemaTooNew, migrate
from talkative.serve.jobs.shares import ShareStore
from talkative.serve.jobs.sqlite import SQLiteDatabase
from talkative.serve.jobs.store import JobStore

#: the schema the job store created before versioned migrations (its SCHEMA, as released), for files made then
LEGACY_SCHEMA = """
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


def _scalar(database: Database, sql: str) -> object:
    channel = database.channel("test-read")
    try:
        return channel.call_sync(lambda: channel.conn().execute(sql).fetchone()[0])
    finally:
        channel.close()


def _versions(database: Database) -> list[int]:
    channel = database.channel("test-read")
    try:
        rows = channel.call_sync(
            lambda: (
                channel.conn().execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
            )
        )
        return [int(r[0]) for r in rows]
    finally:
        channel.close()


def test_a_file_made_before_migrations_opens_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(LEGACY_SCHEMA)
    old.execute(
        "INSERT OR REPLACE INTO jobs (id, kind, status, model_id, group_id, client_request_id, owner, created_at,"
        " request, result, progress, attempts) VALUES ('old', 'analyze', 'queued', 'm', 'g', 'c1', 'key:a', 1000.5,"
        " '{\"text\":\"kept\"}', NULL, '{}', 1)"
    )
    old.execute(
        "INSERT INTO batches (id, owner, status, model_id, options, source, total, created_at)"
        " VALUES ('b1', 'key:a', 'queued', 'm', '{}', 'json', 1, 1000.0)"
    )
    old.execute(
        "INSERT INTO shares (id, request_id, owner, anchor, comment, created_at)"
        " VALUES ('s1', 'old', 'key:a', '{\"position\":1}', 'see', 1000.0)"
    )
    old.close()

    async def go() -> None:
        database = SQLiteDatabase(path)
        assert _versions(database) == [m.version for m in MIGRATIONS]
        store, batches, shares = JobStore(database), BatchStore(database), ShareStore(database)
        got = await store.get("old")
        assert (
            got is not None and got.request == {"text": "kept"} and got.attempts == 1 and got.owner == "key:a"
        )
        assert [j.id for j in await store.unfinished()] == ["old"]
        assert await store.claim("old", "a", 60) and await store.runner("old") == "a"  # the new columns work
        batch = await batches.get("b1")
        assert batch is not None and batch.total == 1
        share = await shares.get("s1")
        assert share is not None and share.anchor == {"position": 1}
        for s in (store, batches, shares):
            s.close()
        database.close()

    asyncio.run(go())


def test_migrations_run_once(open_database: Callable[[], Database]) -> None:
    first = open_database()
    assert _versions(first) == list(range(1, LATEST + 1))
    second = open_database()  # a restart: nothing left to do
    assert _versions(second) == list(range(1, LATEST + 1))
    assert _scalar(second, "SELECT COUNT(*) FROM schema_migrations") == LATEST


def test_processes_starting_at_once_migrate_once(open_database: Callable[[], Database]) -> None:
    """Replicas starting together on one empty database: one migrates, the others wait for it and find nothing to
    do (without the schema lock, concurrent CREATE TABLEs collide on PostgreSQL)."""
    opened: list[Database] = []
    failures = at_once(6, lambda: opened.append(open_database()))
    assert failures == [] and len(opened) == 6
    assert _versions(opened[0]) == list(range(1, LATEST + 1))


def test_a_failed_migration_leaves_nothing_behind(database: Database) -> None:
    broken = (
        *MIGRATIONS,
        Migration(LATEST + 1, "a table, then a mistake", ("CREATE TABLE half (x INTEGER)", "NOT SQL AT ALL")),
    )
    channel = database.channel("test-migrate")
    with pytest.raises(Exception, match=r"(?i)syntax"):
        channel.call_sync(lambda: migrate(channel.conn(), broken))
    channel.close()
    assert _versions(database) == list(range(1, LATEST + 1))
    assert _scalar(database, "SELECT COUNT(*) FROM jobs") == 0  # the database still works
    channel = database.channel("test-migrate")
    with pytest.raises(Exception, match="half"):  # the table of the failed migration is gone with it
        channel.call_sync(lambda: channel.conn().execute("SELECT COUNT(*) FROM half").fetchone())
    channel.close()


def test_a_schema_newer_than_the_code_is_refused(open_database: Callable[[], Database]) -> None:
    database = open_database()
    channel = database.channel("test-write")
    channel.call_sync(
        lambda: channel.conn().execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
            (LATEST + 1, "from the future", 0.0),
        )
    )
    channel.close()
    with pytest.raises(SchemaTooNew, match=f"version {LATEST + 1}"):
        open_database()
