"""Batch leases on both backends: claim, renew, release, adoptable batches, cancel requests; a cancelled batch whose
items still run stays open (its runner records their ends); the feeder's writes land only while it holds the batch,
and an item's end only once; two runners racing for one batch: exactly one wins."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from batch_fakes import specs

from talkative.serve.jobs.batch_store import PENDING, QUEUED, RUNNING, Batch, BatchStore, TooManyBatches
from talkative.serve.jobs.database import Database
from talkative.serve.jobs.record import CANCELLED, COMPLETED
from talkative.serve.jobs.store import Renewal

OpenDatabase = Callable[[], Database]  # the `open_database` fixture: another process's connection

LONG = 60.0  # a lease that does not expire during a test
SHORT = 0.3  # one that does, after a short sleep


def batch(i: int, created_at: float | None = None) -> Batch:
    return Batch(
        id=f"b{i}",
        owner="key:a",
        status=QUEUED,
        model_id="m",
        options={},
        source="json",
        total=2,
        created_at=time.time() if created_at is None else created_at,
    )


async def create(store: BatchStore, i: int, runner: str | None, lease: float = LONG, **kw: float) -> None:
    await store.create(batch(i, **kw), specs(2), 100, runner, lease)


def test_claim_renew_release_and_cancel_requests(database: Database) -> None:
    async def go() -> None:
        store = BatchStore(database)
        await create(store, 0, "a")  # created held: nobody else may take it
        await create(store, 1, "a", SHORT)
        await create(store, 2, None)  # the local backend holds nothing
        assert await store.runner("b0") == "a" and await store.runner("b2") is None
        assert not await store.claim("b0", "b", LONG)
        assert await store.claim("b0", "a", LONG)  # claiming again keeps it
        assert not await store.claim("nope", "a", LONG)

        await asyncio.sleep(SHORT + 0.2)
        assert await store.claim("b1", "b", LONG)  # a's lease on b1 expired: b takes it over
        assert await store.renew("a", LONG) == Renewal(held=["b0"], cancel_requested=[])
        assert await store.claim("b2", "b", LONG)  # nobody held it
        assert (await store.renew("b", LONG)).held == ["b1", "b2"]

        assert await store.request_cancel("b1") and not await store.request_cancel("nope")
        assert (await store.get("b1")).cancel_requested  # type: ignore[union-attr]
        assert await store.renew("b", LONG) == Renewal(held=["b1", "b2"], cancel_requested=["b1"])
        await store.release("b2", "a")  # not a's: nothing happens
        assert await store.runner("b2") == "b"
        await store.release("b2", "b")
        assert await store.runner("b2") is None and (await store.renew("b", LONG)).held == ["b1"]
        store.close()

    asyncio.run(go())


def test_adoptable_lists_expired_and_unheld_open_batches(database: Database) -> None:
    async def go() -> None:
        store = BatchStore(database)
        await create(store, 0, "a")  # held
        await create(store, 1, "a", SHORT)  # its lease will expire
        await create(store, 2, None, created_at=time.time() - 30)  # nobody holds it, and it is old
        await create(store, 3, None)  # just written: its writer is about to claim it
        await create(store, 4, "a", SHORT)
        assert await store.set_batch(
            "b4", COMPLETED, "completed_at", time.time(), "a"
        )  # ended: never adopted
        await asyncio.sleep(SHORT + 0.2)
        assert [b.id for b in await store.adoptable(5.0)] == ["b2", "b1"]  # oldest first
        assert [b.id for b in await store.adoptable(5.0, limit=1)] == ["b2"]
        assert not await store.claim("b4", "b", LONG)
        store.close()

    asyncio.run(go())


def test_a_cancelled_batch_stays_open_while_its_items_run(database: Database) -> None:
    async def go() -> None:
        store = BatchStore(database)
        await create(store, 0, "a", SHORT)
        assert await store.set_item("b0", 0, RUNNING, "job-0", "a")
        await store.cancel_pending("b0", "a")
        assert await store.set_batch("b0", CANCELLED, "completed_at", time.time(), "a")
        assert (await store.get("b0")).counts == {RUNNING: 1, CANCELLED: 1}  # type: ignore[union-attr]
        assert (await store.renew("a", SHORT)).held == ["b0"]  # its runner still has an end to record
        assert [b.id for b in await store.open()] == ["b0"]
        await asyncio.sleep(SHORT + 0.2)
        assert [b.id for b in await store.adoptable(5.0)] == [
            "b0"
        ]  # its runner died: someone records that end
        assert not await store.request_cancel("b0")  # already cancelled
        assert await store.record("b0", 0, CANCELLED, runner="a")
        assert (await store.renew("a", LONG)).held == [] and await store.open() == []
        store.close()

    asyncio.run(go())


def test_writes_land_only_while_their_runner_holds_the_batch_and_an_end_only_once(database: Database) -> None:
    async def go() -> None:
        store = BatchStore(database)
        await create(store, 0, "a", SHORT)
        assert await store.set_item("b0", 0, RUNNING, "job-a", "a")
        await asyncio.sleep(SHORT + 0.2)
        assert await store.claim("b0", "b", LONG)  # a was slow: b feeds it now
        # nothing a still writes lands: no item submitted, no end, no status, no cancel
        assert not await store.set_item("b0", 1, RUNNING, "job-a2", "a")
        assert not await store.record("b0", 0, COMPLETED, 3, '{"id":"i0","by":"a"}', "a")
        assert not await store.set_batch("b0", COMPLETED, "completed_at", time.time(), "a")
        await store.cancel_pending("b0", "a")
        assert (await store.get("b0")).counts == {RUNNING: 1, PENDING: 1}  # type: ignore[union-attr]
        # b's end of the item lands once; a second end (whoever writes it) does not
        assert await store.record("b0", 0, COMPLETED, 3, '{"id":"i0","by":"b"}', "b")
        assert not await store.record("b0", 0, COMPLETED, 3, '{"id":"i0","again":1}', "b")
        assert not await store.record("b0", 0, COMPLETED, 3, '{"id":"i0","local":1}', None)
        assert await store.results("b0") == ['{"id":"i0","by":"b"}']
        assert await store.record("b0", 1, COMPLETED, 3, '{"id":"i1"}', None)  # the local backend: no lease
        assert await store.results("b0", 1) == ['{"id":"i1"}']
        store.close()

    asyncio.run(go())


def test_two_runners_claiming_one_batch_at_once_one_wins(open_database: OpenDatabase) -> None:
    async def go() -> None:
        first, second = BatchStore(open_database()), BatchStore(open_database())
        for i in range(10):
            await create(first, i, None, created_at=time.time() - 30)
        for i in range(10):
            won = await asyncio.gather(first.claim(f"b{i}", "a", LONG), second.claim(f"b{i}", "b", LONG))
            assert sorted(won) == [False, True]
        first.close()
        second.close()

    asyncio.run(go())


def test_a_keys_unfinished_batches_are_limited_on_every_replica(open_database: OpenDatabase) -> None:
    async def go() -> None:
        first, second = BatchStore(open_database()), BatchStore(open_database())
        await first.create(batch(0), specs(1), 2, "a", LONG)
        await second.create(batch(1), specs(1), 2, "b", LONG)
        refused = False
        try:
            await first.create(batch(2), specs(1), 2, "a", LONG)
        except TooManyBatches:
            refused = True
        assert refused and await second.get("b2") is None
        first.close()
        second.close()

    asyncio.run(go())
