"""Job leases on both backends: claim, renew, release, adoptable jobs, finishing once, cancel requests; and two
runners (two processes' databases, two threads) racing for the same jobs: exactly one wins each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from talkative.serve.jobs.database import Database
from talkative.serve.jobs.record import CANCELLED, COMPLETED, FAILED, PROCESSING, Job
from talkative.serve.jobs.store import JobStore, Renewal

LONG = 60.0  # a lease that does not expire during a test
SHORT = 0.3  # one that does, after a short sleep


def job(i: int, created_at: float | None = None) -> Job:
    return Job(
        id=f"j{i}",
        kind="analyze",
        request={"text": f"text {i}"},
        model_id="m",
        group_id="g",
        created_at=time.time() if created_at is None else created_at,
    )


def ended(j: Job, status: str = COMPLETED, text: str = "done") -> Job:
    out = Job(**{**j.__dict__})
    out.status, out.completed_at = status, time.time()
    out.result = {"tokens": [], "metadata": {"by": text}} if status == COMPLETED else None
    out.error = None if status == COMPLETED else text
    return out


def test_claim_renew_release(database: Database) -> None:
    async def go() -> None:
        store = JobStore(database)
        for i in range(3):
            await store.put(job(i))
        assert await store.claim("j0", "a", LONG)
        assert not await store.claim("j0", "b", LONG)  # a holds it
        assert await store.claim("j0", "a", LONG)  # a claiming again keeps it
        assert await store.claim("j1", "a", SHORT) and await store.claim("j2", "b", LONG)
        assert not await store.claim("nope", "a", LONG)
        assert await store.runner("j0") == "a"

        progressed = job(0)
        progressed.status = PROCESSING
        await store.put(progressed)  # writing the record keeps its lease
        assert await store.runner("j0") == "a" and not await store.claim("j0", "b", LONG)

        await asyncio.sleep(SHORT + 0.2)
        assert await store.claim("j1", "b", LONG)  # a's lease on j1 expired: b takes it over
        renewal = await store.renew("a", LONG)
        assert renewal == Renewal(held=["j0"], cancel_requested=[])  # j1 is b's now
        assert (await store.renew("b", LONG)).held == ["j1", "j2"]

        assert await store.request_cancel("j2")
        assert await store.renew("b", LONG) == Renewal(held=["j1", "j2"], cancel_requested=["j2"])
        await store.release("j2", "a")  # not a's: nothing happens
        assert await store.runner("j2") == "b"
        await store.release("j2", "b")
        assert await store.runner("j2") is None and (await store.renew("b", LONG)).held == ["j1"]
        assert await store.claim("j2", "a", LONG)  # given back: anyone may take it
        store.close()

    asyncio.run(go())


def test_terminal_jobs_are_never_claimed_renewed_or_cancelled(database: Database) -> None:
    async def go() -> None:
        store = JobStore(database)
        j = job(0)
        await store.put(j)
        assert await store.claim("j0", "a", LONG)
        assert await store.finish(ended(j), "a")
        assert not await store.claim("j0", "a", LONG) and not await store.claim("j0", "b", LONG)
        assert await store.renew("a", LONG) == Renewal(held=[], cancel_requested=[])
        assert not await store.request_cancel("j0") and not await store.request_cancel("nope")
        store.close()

    asyncio.run(go())


def test_adoptable_jobs_are_the_expired_and_the_old_unclaimed(database: Database) -> None:
    async def go() -> None:
        store = JobStore(database)
        now = time.time()
        await store.put(job(0, created_at=now - 100))  # never claimed, old: its writer died before claiming
        await store.put(job(1, created_at=now))  # never claimed, new: its writer is about to claim it
        await store.put(job(2, created_at=now - 90))
        await store.put(job(3, created_at=now - 80))
        await store.put(job(4, created_at=now - 70))
        done = job(5, created_at=now - 200)
        await store.put(done)
        assert await store.finish(ended(done, FAILED, "boom"), None)
        assert await store.claim("j2", "a", SHORT) and await store.claim("j3", "b", LONG)
        assert await store.claim("j4", "c", LONG)
        await store.release("j4", "c")  # given back
        assert [j.id for j in await store.adoptable(lease_grace=30)] == ["j0", "j4"]
        await asyncio.sleep(SHORT + 0.2)
        adoptable = await store.adoptable(lease_grace=30)
        assert [j.id for j in adoptable] == ["j0", "j2", "j4"]  # oldest first
        assert adoptable[1].request == {"text": "text 2"} and adoptable[1].status == "queued"
        assert [j.id for j in await store.adoptable(lease_grace=30, limit=2)] == ["j0", "j2"]
        assert "j1" in [j.id for j in await store.adoptable(lease_grace=0.0)]
        store.close()

    asyncio.run(go())


def test_finish_writes_once_and_only_for_the_holder(database: Database) -> None:
    async def go() -> None:
        store = JobStore(database)
        for i in range(3):
            await store.put(job(i))
        assert await store.claim("j0", "a", LONG)
        with pytest.raises(ValueError):
            await store.finish(job(0), "a")  # not terminal: finish is for the end
        assert await store.finish(ended(job(0), text="a's result"), "a")
        assert not await store.finish(ended(job(0), text="again"), "a")  # complete once
        assert not await store.finish(ended(job(0), CANCELLED, "late cancel"), None)
        got = await store.get("j0")
        assert (
            got is not None
            and got.status == COMPLETED
            and got.result == {"tokens": [], "metadata": {"by": "a's result"}}
        )

        assert await store.claim("j1", "a", SHORT)
        await asyncio.sleep(SHORT + 0.2)
        assert await store.claim("j1", "b", LONG)  # a was slow, not dead: b took over
        assert not await store.finish(ended(job(1), text="a's stale result"), "a")
        got = await store.get("j1")
        assert got is not None and got.status == "queued" and got.result is None  # nothing written
        assert await store.finish(ended(job(1), text="b's result"), "b")

        assert await store.finish(ended(job(2), FAILED, "no runner: the local backend"), None)
        assert not await store.finish(ended(job(9)), None)  # unknown
        store.close()

    asyncio.run(go())


def test_unfinished_still_lists_claimed_jobs_for_a_local_restart(database: Database) -> None:
    """The local backend runs every unfinished job again at start, whoever held it."""

    async def go() -> None:
        store = JobStore(database)
        await store.put(job(0, created_at=1.0))
        await store.put(job(1, created_at=2.0))
        assert await store.claim("j0", "local", LONG)
        assert [j.id for j in await store.unfinished()] == ["j0", "j1"]
        store.close()

    asyncio.run(go())


def test_two_runners_racing_each_win_exactly_what_the_other_lost(
    open_database: Callable[[], Database],
) -> None:
    """Two replicas (a database each: their own connections and threads) claim the same jobs at once, then both
    try to finish them: one claim and one finish per job succeed, and the stored result is the winner's."""
    n = 40

    async def go() -> None:
        first, second = JobStore(open_database()), JobStore(open_database())
        for i in range(n):
            await first.put(job(i))
        ids = [f"j{i}" for i in range(n)]
        claims = await asyncio.gather(
            *(
                store.claim(job_id, runner, LONG)
                for job_id in ids
                for store, runner in ((first, "a"), (second, "b"))
            )
        )
        won = {}
        for k, job_id in enumerate(ids):
            a, b = claims[2 * k], claims[2 * k + 1]
            assert a != b, f"{job_id}: both or neither claimed it"
            won[job_id] = "a" if a else "b"
        finishes = await asyncio.gather(
            *(
                store.finish(ended(job(i), text=runner), runner)
                for i in range(n)
                for store, runner in ((first, "a"), (second, "b"))
            )
        )
        for i, job_id in enumerate(ids):
            assert finishes[2 * i : 2 * i + 2] == [won[job_id] == "a", won[job_id] == "b"]
            got = await second.get(job_id)
            assert got is not None and got.result is not None and got.result["metadata"]["by"] == won[job_id]
        first.close()
        second.close()

    asyncio.run(go())


def test_two_finishes_at_once_complete_once(open_database: Callable[[], Database]) -> None:
    async def go() -> None:
        first, second = JobStore(open_database()), JobStore(open_database())
        for i in range(20):
            await first.put(job(i))
        results = await asyncio.gather(
            *(
                store.finish(ended(job(i), text=name), None)
                for i in range(20)
                for store, name in ((first, "1"), (second, "2"))
            )
        )
        assert all(results[2 * i] != results[2 * i + 1] for i in range(20))
        first.close()
        second.close()

    asyncio.run(go())
