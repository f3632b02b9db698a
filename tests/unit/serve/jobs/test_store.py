"""The job store on both backends: round trips, unfinished jobs in order, retention, reopening, history pages; and
the SQLite file's WAL mode and privacy."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from talkative.serve.jobs.database import Database
from talkative.serve.jobs.record import Job, iso
from talkative.serve.jobs.store import JobStore


def job(i: int, status: str = "queued", completed_at: float | None = None) -> Job:
    return Job(
        id=f"j{i}",
        kind="analyze",
        request={"text": f"text {i}", "options": {"seed": i}},
        model_id="m",
        group_id="g",
        client_request_id=f"c{i}",
        status=status,
        created_at=1000.0 + i,
        completed_at=completed_at,
    )


def test_round_trip_order_and_retention(open_database: Callable[[], Database]) -> None:
    async def go() -> None:
        store = JobStore(open_database())
        done = job(0, "completed", completed_at=time.time() - 10 * 86400)
        done.result = {
            "tokens": [{"position": 0, "token": "a", "mse": 0.5, "explanation": "é ✓"}],
            "metadata": {},
        }
        await store.put(done)
        await store.put(job(2, "processing"))
        await store.put(job(1))
        await store.put(job(3, "failed", completed_at=time.time()))
        got = await store.get("j0")
        assert got is not None and got.result == done.result and got.request == done.request
        assert got.client_request_id == "c0" and got.status == "completed"
        assert got.created_at == 1000.0 and got.completed_at == done.completed_at  # doubles, not floats
        assert [j.id for j in await store.unfinished()] == ["j1", "j2"]
        assert await store.get("nope") is None
        assert await store.purge(7 * 86400) == 1  # only the old finished job
        assert await store.get("j0") is None and await store.count() == 3
        store.close()
        reopened = JobStore(open_database())
        assert [j.id for j in await reopened.unfinished()] == ["j1", "j2"]
        reopened.close()

    asyncio.run(go())


def test_history_lists_an_owners_jobs_without_batch_items(database: Database) -> None:
    async def go() -> None:
        store = JobStore(database)
        for i in range(4):
            j = job(i, "completed", completed_at=2000.0 + i)
            j.owner = "key:a"
            j.result = {"tokens": [{"position": p} for p in range(i + 1)], "metadata": {"summary": {"n": i}}}
            await store.put(j)
        item = job(9)
        item.owner, item.request = "key:a", {"text": "in a batch", "batch_id": "b1"}
        await store.put(item)
        other = job(8)
        other.owner = "key:b"
        await store.put(other)
        rows, total = await store.owned("key:a", ("analyze",), limit=2, offset=1)
        assert total == 4 and [r["id"] for r in rows] == ["j2", "j1"]  # newest first, the batch item left out
        assert (
            rows[0]["summary"] == {"n": 2}
            and rows[0]["n_tokens"] == 3
            and rows[0]["request"]["text"] == "text 2"
        )
        assert "result" not in rows[0]
        await store.put(job(5))  # no owner, no result: nothing to summarise
        assert await store.delete("j0") and not await store.delete("j0")
        assert (await store.owned("key:a", ("analyze",), limit=10))[1] == 3
        store.close()

    asyncio.run(go())


def test_history_lists_jobs_whose_text_and_tokens_hold_nul_characters(database: Database) -> None:
    """A text may hold any character, NUL included; PostgreSQL's jsonb refuses the escaped NUL, so the history's
    JSON reads must not go through it (a single such job would otherwise break its owner's whole history)."""

    async def go() -> None:
        store = JobStore(database)
        j = job(1, "completed", completed_at=2000.0)
        j.owner, j.request = "key:a", {"text": "a\x00b"}
        j.result = {"tokens": [{"token": "\x00"}, {"token": "b"}], "metadata": {"summary": {"fve": 0.5}}}
        await store.put(j)
        rows, total = await store.owned("key:a", ("analyze",), limit=10, offset=0)
        assert total == 1 and rows[0]["request"]["text"] == "a\x00b"
        assert rows[0]["n_tokens"] == 2 and rows[0]["summary"] == {"fve": 0.5}
        assert (await store.get("j1")).result == j.result  # type: ignore[union-attr]
        store.close()

    asyncio.run(go())


def test_the_sqlite_store_runs_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "data" / "jobs.sqlite3"
    JobStore(path).close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_status_body_times_are_iso_utc() -> None:
    j = job(1)
    j.started_at = 1700000000.25
    body = j.status_body(queue_position=3)
    assert body["created_at"] == "1970-01-01T00:16:41.000Z"
    assert body["started_at"] == iso(1700000000.25) == "2023-11-14T22:13:20.250Z"
    assert body["completed_at"] is None and body["queue_position"] == 3 and body["result"] is None


def test_the_store_is_private_to_its_account(tmp_path: Path) -> None:
    """Every user's texts and results live here: the directory is created 0700 and the database files 0600."""
    import stat

    path = tmp_path / "fresh" / "data" / "jobs.sqlite3"

    async def go() -> None:
        store = JobStore(path)
        await store.put(job(1))
        wal = path.with_name(path.name + "-wal")
        assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
        store.close()

    asyncio.run(go())
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)  # loosened by hand: reopening tightens it again
    JobStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
