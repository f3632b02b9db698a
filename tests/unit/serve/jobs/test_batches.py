"""Batches over a fake scheduler: stored before anyone hears of them, fed a few items at a time, results in
completion order, unreadable items failed at once, resumed after a restart without running finished items again,
cancelled, limited per key, and retried when the queue is full."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from batch_fakes import FakeScheduler, settings, settle, specs

from talkative.serve.jobs import batches as B
from talkative.serve.jobs.batches import Batches, BatchStore, ItemSpec, is_batch_item
from talkative.serve.jobs.database import Database
from talkative.serve.jobs.record import CANCELLED, COMPLETED, FAILED
from talkative.serve.scheduling.types import SchedulerError


def run(database: Database, body: Callable[[Database], Awaitable[None]]) -> None:
    asyncio.run(body(database))


async def started(database: Database, sched: FakeScheduler, **kw: Any) -> Batches:
    batches = Batches(settings(**kw), BatchStore(database), sched, sched.submit, sched.forget, devices=1)
    await batches.start()
    return batches


def test_items_are_fed_a_few_at_a_time_and_results_come_in_completion_order(database: Database) -> None:
    async def body(db: Database) -> None:
        sched = FakeScheduler()
        batches = await started(db, sched)
        batch = await batches.submit("key:a", "m", {"seed": 1}, specs(4), "json")
        other = BatchStore(db)  # another reader of the same database
        assert (await other.get(batch.id)) is not None  # stored before the submitter returns
        other.close()
        await settle()
        assert len(sched.submitted) == batches.depth == 2  # 1 device × 1 batch place + 1 waiting
        first, second = sched.submitted
        assert all(
            is_batch_item(j) and j.request["batch_id"] == batch.id and j.owner == "key:a"
            for j in (first, second)
        )
        sched.end(second, COMPLETED)
        sched.end(first, FAILED, error="boom")
        await settle()
        lines = [json.loads(x) for x in await batches.results(batch.id, 0)]
        assert [(x["id"], x["status"]) for x in lines] == [("i1", "completed"), ("i0", "failed")]
        assert lines[0]["tokens"] == [{"position": p} for p in range(3)] and lines[1]["error"] == "boom"
        while len(sched.submitted) < 4 or sched.jobs:
            for job in list(sched.jobs.values()):
                sched.end(job, COMPLETED)
            await settle()
        done = await batches.get(batch.id)
        progress = batches.progress(done)
        assert (
            done.status == COMPLETED
            and progress["items"]["completed"] == 3
            and progress["items"]["failed"] == 1
        )
        assert progress["positions_done"] == 9 and [
            x["id"] for x in map(json.loads, await batches.results(batch.id, 2))
        ] == [json.loads(x)["id"] for x in (await batches.results(batch.id, 0))[2:]]
        await batches.stop()

    run(database, body)


def test_unreadable_items_fail_at_once_and_never_run(database: Database) -> None:
    async def body(db: Database) -> None:
        sched = FakeScheduler()
        batches = await started(db, sched)
        items = [
            ItemSpec(None, None, "line 1: not JSON", 1),
            ItemSpec("ok", {"text": "x", "options": {}}, None, 2),
        ]
        batch = await batches.submit(None, "m", {}, items, "jsonl")
        assert batch.counts == {"failed": 1, "pending": 1}
        lines = [json.loads(x) for x in await batches.results(batch.id, 0)]
        assert lines == [{"id": None, "status": "failed", "line": 1, "error": "line 1: not JSON"}]
        await settle()
        assert [j.request["text"] for j in sched.submitted] == ["x"]
        await batches.stop()

    run(database, body)


def test_a_restart_follows_jobs_in_flight_and_runs_only_what_never_finished(database: Database) -> None:
    async def body(db: Database) -> None:
        sched = FakeScheduler()
        first = await started(db, sched)
        batch = await first.submit("key:a", "m", {}, specs(5), "json")
        await settle()
        done = sched.submitted[0]
        sched.end(done, COMPLETED)
        await settle()
        in_flight = list(sched.jobs.values())
        assert len(in_flight) == 2
        await first.stop()  # the process dies: one item finished, two in flight, two never started
        later = FakeScheduler()
        for job in in_flight:
            later.recover(job)  # the scheduler's own recovery of unfinished jobs
        second = await started(db, later)
        await settle()
        assert not {j.id for j in in_flight} & {
            j.id for j in later.submitted
        }  # followed, not submitted again
        assert done.request["text"] not in {
            j.request["text"] for j in later.submitted
        }  # never computed again
        for _ in range(100):
            if (await second.get(batch.id)).status == COMPLETED:
                break
            for job in list(later.jobs.values()):
                later.end(job, COMPLETED)
            await settle()
        lines = [json.loads(x)["id"] for x in await second.results(batch.id, 0)]
        assert sorted(lines) == [f"i{k}" for k in range(5)] and lines[0] == "i0"
        assert len(later.submitted) == 2  # exactly the two items that never started
        await second.stop()

    run(database, body)


def test_cancel_stops_running_items_and_never_starts_pending_ones(database: Database) -> None:
    async def body(db: Database) -> None:
        sched = FakeScheduler()
        batches = await started(db, sched)
        batch = await batches.submit("key:a", "m", {}, specs(6), "json")
        await settle()
        sched.end(sched.submitted[0], COMPLETED)
        await settle()
        cancelled = await batches.cancel(batch.id)
        await settle()
        assert cancelled.status == CANCELLED
        final = await batches.get(batch.id)
        assert final.counts == {"completed": 1, "cancelled": 5} and len(sched.submitted) == 3
        with pytest.raises(SchedulerError) as again:
            await batches.cancel(batch.id)
        assert again.value.status == 409
        await batches.delete(batch.id)
        assert await batches.store.get(batch.id) is None and await batches.results(batch.id, 0) == []
        await settle()
        assert sorted(sched.forgotten) == sorted(j.id for j in sched.submitted)  # their jobs removed too
        await batches.stop()

    run(database, body)


def test_batches_in_flight_per_key_are_limited(database: Database) -> None:
    async def body(db: Database) -> None:
        sched = FakeScheduler()
        batches = await started(db, sched, max_batches_in_flight=1)
        await batches.submit("key:a", "m", {}, specs(1), "json")
        with pytest.raises(SchedulerError) as refused:
            await batches.submit("key:a", "m", {}, specs(1), "json")
        assert refused.value.status == 429 and "MAX_BATCHES_IN_FLIGHT" in refused.value.detail
        await batches.submit("key:b", "m", {}, specs(1), "json")  # another key has its own limit
        await batches.stop()

    run(database, body)


def test_a_full_queue_delays_items_and_a_foreign_cancel_runs_them_again(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(B, "BACKOFF_SECONDS", 0.01)

    async def body(db: Database) -> None:
        sched = FakeScheduler()
        sched.refuse = 2
        batches = await started(db, sched)
        batch = await batches.submit(None, "m", {}, specs(1), "json")
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert len(sched.submitted) == 1  # refused twice, submitted the third time, not failed
        await sched.cancel(sched.submitted[0].id, reason="the server was reset")  # not the batch's doing
        await settle()
        assert len(sched.submitted) == 2
        sched.end(sched.submitted[1], COMPLETED)
        await settle()
        assert (await batches.get(batch.id)).counts == {"completed": 1}
        await batches.stop()

    run(database, body)


def test_a_restart_stops_the_items_a_cancelled_batch_left_running(database: Database) -> None:
    async def body(db: Database) -> None:
        sched = FakeScheduler()
        first = await started(db, sched)
        batch = await first.submit("key:a", "m", {}, specs(4), "json")
        await settle()
        in_flight = list(sched.jobs.values())
        await first.stop()
        # the batch was cancelled, and the process died before its running items' ends were recorded
        store = BatchStore(db)
        await store.cancel_pending(batch.id)
        await store.set_batch(batch.id, CANCELLED, "completed_at", time.time())
        store.close()
        later = FakeScheduler()
        for job in in_flight:
            later.recover(job)
        second = await started(db, later)
        await settle()
        assert all(j.status == CANCELLED for j in in_flight) and later.submitted == []
        assert (await second.get(batch.id)).counts == {
            "cancelled": 4
        }  # nothing left running: its readers stop
        await second.stop()

    run(database, body)
