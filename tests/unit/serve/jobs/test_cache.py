"""The result cache in the store: what its keys depend on, rows and inputs written and read back (flagged for the
input they are read for), a job's rows forgotten, and the size bound evicting the least recently used first."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from talkative.nla.options import resolve
from talkative.serve.jobs.cache import (
    CachePlan,
    ResultCache,
    cached_metadata,
    input_key,
    options_key,
    prefix_digests,
    row_key,
)
from talkative.serve.jobs.database import Database
from talkative.serve.jobs.store import JobStore


class Counts:
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def cache_lookup(self, cached: int, total: int) -> None:
        self.seen.append((cached, total))


def test_options_key_leaves_presentation_out_and_keeps_what_changes_rows() -> None:
    base = options_key(resolve({}))
    assert options_key(resolve({"batch_size": 3, "last_n_messages": 2, "use_chat_format": True})) == base
    for changed in ({"seed": 1}, {"no_kl": True}, {"temperature": 0}, {"return_vectors": True}):
        assert options_key(resolve(changed)) != base, changed
    big = resolve({"optimize_explanations_config": {"best_of_k": 2}})
    assert options_key(big) != base


def test_a_position_is_keyed_by_its_prefix_only() -> None:
    short = prefix_digests([5, 6, 7], [0, 1, 2])
    longer = prefix_digests([5, 6, 7, 8, 9], [0, 1, 2, 3, 4])
    assert longer[:3] == short
    assert prefix_digests([5, 6, 9], [2]) != short[2:]  # a changed token changes its own position's key
    assert prefix_digests([4, 6, 7], [2]) != short[2:]  # and every later one
    assert prefix_digests([5, 6, 7], [2, 0]) == [short[2], short[0]]
    opts = options_key(resolve({}))
    assert row_key("alice", "nla", opts, short[0]) != row_key("bob", "nla", opts, short[0])
    assert row_key("", "nla", opts, short[0]) != row_key("", "other-nla", opts, short[0])
    a = input_key("", "nla", opts, {"text": "a b", "options": {}}, None)
    assert a == input_key("", "nla", opts, {"text": "a b", "options": {"batch_size": 2}}, None)
    assert a != input_key("", "nla", opts, {"text": "a b"}, 1)


def _stored_bytes(database: Database) -> int:
    """The bytes the cache's tables hold, summed by a scan of their own (on a channel of the test's)."""
    channel = database.channel("test-scan")

    def scan() -> int:
        conn = channel.conn()
        return sum(
            int(conn.execute(f"SELECT COALESCE(SUM(size), 0) FROM {t}").fetchone()[0])
            for t in ("cache_rows", "cache_inputs")
        )

    try:
        return channel.call_sync(scan)
    finally:
        channel.close()


def _row(q: int, flags: list[str]) -> dict[str, Any]:
    return {"position": q, "token": f"t{q}", "explanation": f"row {q}", "mse": 0.1 * q, "flags": flags}


def _plan(n: int, tag: str = "x") -> CachePlan:
    keys = {q: f"{tag}-key-{q}" for q in range(n)}
    return CachePlan(input_key="", row_keys=keys, flags={0: ["early_position"]})


def _store(database: Database | Path, max_bytes: int = 10**9) -> tuple[JobStore, ResultCache, Counts]:
    store = JobStore(database)
    counts = Counts()
    return store, ResultCache(database, max_bytes=max_bytes, shared=False, monitor=counts), counts


def test_rows_and_inputs_round_trip_and_a_deleted_job_takes_its_rows(database: Database) -> None:
    async def go() -> None:
        store, cache, _ = _store(database)
        plan = _plan(3)
        plan.input_key = "input-1"
        rows = [_row(0, ["early_position", "degenerate"]), _row(1, []), _row(2, ["low_confidence"])]
        cache.record("job-1", plan, rows, {"n_tokens": 3, "summary": {"positions": 3}, "cached": False})
        found = await cache.rows(["x-key-1", "x-key-2", "nope"])
        assert set(found) == {"x-key-1", "x-key-2"} and found["x-key-2"]["flags"] == ["low_confidence"]
        entry = await cache.answer("input-1")
        assert entry is not None and [r["position"] for r in entry["rows"]] == [0, 1, 2]
        assert entry["rows"][0]["flags"] == [
            "early_position",
            "degenerate",
        ]  # its input's flags, its own row flag
        meta = cached_metadata(entry, "m", "g")
        assert meta["cached"] is True and meta["positions_cached"] == 3 and meta["n_tokens"] == 3
        assert meta["engine_batches"] == [] and meta["processing_time"] == 0.0

        # a second job reuses rows 0..1 and computes a row 3: only row 3 is its own
        second = _plan(4)
        second.input_key = "input-2"
        second.cached = {0, 1, 2}
        cache.record("job-2", second, [*rows, _row(3, [])], {"n_tokens": 4})
        assert await cache.forget("job-1") == 3
        assert (
            await cache.answer("input-1") is None and await cache.answer("input-2") is None
        )  # rows are gone
        assert set(await cache.rows([f"x-key-{q}" for q in range(4)])) == {"x-key-3"}
        await cache.rows([])  # queued after the writes: they are done
        assert cache.size_bytes == _stored_bytes(database)  # kept without scanning, yet exact
        cache.close()
        store.close()

    asyncio.run(go())


def test_the_bound_evicts_the_least_recently_used_first(database: Database) -> None:
    async def go() -> None:
        store, cache, _ = _store(database, max_bytes=2500)
        for i in range(6):
            plan = _plan(4, tag=f"j{i}")
            plan.input_key = f"input-{i}"
            cache.record(f"job-{i}", plan, [_row(q, []) for q in range(4)], {})
            await cache.rows([f"j0-key-{q}" for q in range(4)])  # job 0's rows stay in use
            time.sleep(0.01)
        assert cache.size_bytes <= 2500 and cache.size_bytes == _stored_bytes(database)
        kept = await cache.rows([f"j{i}-key-0" for i in range(6)])
        assert "j0-key-0" in kept and "j5-key-0" in kept  # used recently, written last
        assert "j1-key-0" not in kept  # the least recently used went first
        cache.close()
        store.close()

    asyncio.run(go())


def test_rows_unused_for_the_retention_period_go_with_the_next_write(database: Database) -> None:
    async def go() -> None:
        store = JobStore(database)
        cache = ResultCache(database, max_bytes=10**9, shared=False, monitor=Counts(), retention_seconds=0.2)
        old = _plan(2, tag="old")
        old.input_key = "old-input"
        cache.record("old-job", old, [_row(0, []), _row(1, [])], {})
        assert len(await cache.rows(["old-key-0", "old-key-1"])) == 2
        time.sleep(0.3)
        new = _plan(2, tag="new")
        new.input_key = "new-input"
        cache.record("new-job", new, [_row(0, []), _row(1, [])], {})
        assert await cache.rows(["old-key-0", "old-key-1"]) == {}
        assert await cache.answer("old-input") is None and await cache.answer("new-input") is not None
        assert cache.size_bytes == _stored_bytes(database)
        cache.close()
        store.close()

    asyncio.run(go())


def test_recording_waits_for_another_writer_instead_of_failing(tmp_path: Path) -> None:
    """The cache shares its database file with the job, batch and share stores. A write transaction that starts
    as a reader (a deferred BEGIN, then a SELECT of the old sizes) and only then writes cannot wait for another
    connection's write: once that one commits, the reader's snapshot is stale and SQLite answers "database is
    locked" at once. Recording must take the write lock first and wait its turn."""
    store, cache, _ = _store(tmp_path / "jobs.sqlite3")
    other = sqlite3.connect(store.path, timeout=30, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another store is writing
    other.execute(
        "INSERT INTO cache_inputs (key, job_id, entry, size, used_at) VALUES ('other', 'j0', '{}', 2, 0)"
    )
    done = cache.channel.submit(cache._record, "j1", {"row-a": '{"q": 0}'}, "input-a", '{"n": 1}')
    time.sleep(0.5)  # the recording has begun and waits for the lock
    other.execute("COMMIT")
    done.result(timeout=30)  # recorded after the other writer, not refused
    other.close()
    assert asyncio.run(cache.rows(["row-a"])) != {}
    cache.close()
    store.close()


@pytest.mark.postgres
def test_replicas_on_one_postgresql_count_each_others_rows(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each replica's running size misses the other's writes; on a shared database it is counted exact again (here
    at every write), so the bound is checked against what the tables hold."""
    from talkative.serve.jobs import cache as cache_module
    from talkative.serve.jobs.postgres import PostgresDatabase

    monkeypatch.setattr(cache_module, "RECOUNT_SECONDS", 0.0)
    first_db, second_db = PostgresDatabase(pg_url), PostgresDatabase(pg_url)
    first = ResultCache(first_db, max_bytes=10**9, shared=False, monitor=Counts())
    second = ResultCache(second_db, max_bytes=10**9, shared=False, monitor=Counts())

    async def go() -> None:
        for i, cache in enumerate((first, second, first)):
            plan = _plan(3, tag=f"r{i}")
            plan.input_key = f"input-{i}"
            cache.record(f"job-{i}", plan, [_row(q, []) for q in range(3)], {})
            await cache.rows([])  # queued after the write: it is done
        assert first.size_bytes == _stored_bytes(first_db)  # the second's rows counted too

    asyncio.run(go())
    for c in (first, second):
        c.close()
    first_db.close()
    second_db.close()
