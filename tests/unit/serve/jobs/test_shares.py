"""The share store on both backends: a share round trips, is deleted, goes with its job, and outlives no job."""

from __future__ import annotations

import asyncio

from talkative.serve.jobs.database import Database
from talkative.serve.jobs.record import Job
from talkative.serve.jobs.shares import ShareStore
from talkative.serve.jobs.store import JobStore


def test_shares_round_trip_and_never_outlive_their_job(database: Database) -> None:
    async def go() -> None:
        jobs, shares = JobStore(database), ShareStore(database)
        for job_id in ("kept", "purged"):
            await jobs.put(Job(id=job_id, kind="analyze", request={"text": "t"}, model_id="m", group_id="g"))
        a = await shares.create("kept", "key:a", {"tokens": [1, 3]}, "look here ✓")
        b = await shares.create("kept", None, {"position": 2}, None)
        c = await shares.create("purged", "key:a", {"chars": [0, 4]}, "x")
        got = await shares.get(a.id)
        assert got == a and got.anchor == {"tokens": [1, 3]} and got.comment == "look here ✓"
        assert await shares.get("nope") is None
        await shares.delete(b.id)
        assert await shares.get(b.id) is None and await shares.get(a.id) is not None
        assert await jobs.delete("purged")
        assert await shares.purge_orphans() == 1  # c pointed at a job that is gone
        assert await shares.get(c.id) is None and await shares.get(a.id) is not None
        assert await shares.forget_request("kept") == 1 and await shares.get(a.id) is None
        shares.close()
        jobs.close()

    asyncio.run(go())
