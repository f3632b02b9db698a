"""Two replicas (two `Batches` with runner ids `a` and `b`, each with its own connection to one database) over one
fake job world (the job store every replica's scheduler reads): only the replica that accepted a batch feeds it; a
replica that dies leaves its batch to the other, which finishes it with every item once (the jobs in flight
followed, not submitted again); one that stops gives its batches back at once; a follower on the replica that does
not feed the batch sees every line as it comes; a cancel there ends the batch, even when its feeder died."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from batch_fakes import FakeScheduler, settings, settle, specs

from talkative.serve.api.routes.batches import FOLLOW_WAKE_SECONDS, _stream
from talkative.serve.jobs.batches import Batches, BatchStore
from talkative.serve.jobs.database import Database
from talkative.serve.jobs.record import CANCELLED, COMPLETED, Job

OpenDatabase = Callable[[], Database]  # the `open_database` fixture: another process's connection

LEASE = 0.6  # renewed every 0.2 s; a dead replica's batch is adoptable 0.6 s after its last renewal


class Replica:
    """One ingress replica's submissions into the shared job world, recorded to tell which replica fed what."""

    def __init__(self, world: FakeScheduler) -> None:
        self.world = world
        self.submitted: list[Job] = []

    async def submit(self, request: dict[str, Any], **kw: Any) -> Job:
        job = await self.world.submit(request, **kw)
        self.submitted.append(job)
        return job


async def replica(
    open_database: OpenDatabase, world: FakeScheduler, runner: str, lease: float = LEASE
) -> tuple[Batches, Replica]:
    rep = Replica(world)
    batches = Batches(
        settings(),
        BatchStore(open_database()),
        world,
        rep.submit,
        world.forget,
        devices=1,
        runner=runner,
        lease_seconds=lease,
    )
    await batches.start()
    return batches, rep


async def kill(batches: Batches) -> None:
    """The replica's process dies: its tasks stop where they are; nothing is written, nothing given back."""
    for task in list(batches._tasks):
        task.cancel()
    await asyncio.sleep(0)
    batches.store.close()


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def finish(world: FakeScheduler, batches: Batches, batch_id: str) -> None:
    """End every job as it comes until the batch has completed."""

    async def done() -> bool:
        world.end_all(COMPLETED)
        return (await batches.get(batch_id)).status == COMPLETED

    await until(done)


def ids(lines: list[str]) -> list[str]:
    return [json.loads(x)["id"] for x in lines]


def run(open_database: OpenDatabase, body: Callable[[OpenDatabase], Awaitable[None]]) -> None:
    asyncio.run(body(open_database))


def test_only_the_replica_that_accepted_a_batch_feeds_it(open_database: OpenDatabase) -> None:
    async def body(opening: OpenDatabase) -> None:
        world = FakeScheduler()
        a, ra = await replica(opening, world, "a")
        b, rb = await replica(opening, world, "b")
        first = await a.submit("key:a", "m", {}, specs(4), "json")
        second = await b.submit("key:a", "m", {}, specs(2), "json")
        await asyncio.sleep(4 * LEASE)  # many renewals and adoption rounds on both
        assert {j.request["batch_id"] for j in ra.submitted} == {first.id}
        assert {j.request["batch_id"] for j in rb.submitted} == {second.id}
        assert await a.store.runner(first.id) == "a" and await a.store.runner(second.id) == "b"
        await finish(world, a, first.id)
        await finish(world, b, second.id)
        assert sorted(ids(await b.results(first.id, 0))) == [f"i{k}" for k in range(4)]
        assert len(ra.submitted) == 4 and len(rb.submitted) == 2  # each item submitted once, by its feeder
        await a.stop()
        await b.stop()

    run(open_database, body)


def test_a_dead_replicas_batch_is_adopted_and_finished_with_every_item_once(
    open_database: OpenDatabase,
) -> None:
    async def body(opening: OpenDatabase) -> None:
        world = FakeScheduler()
        a, ra = await replica(opening, world, "a")
        b, rb = await replica(opening, world, "b")
        batch = await a.submit("key:a", "m", {}, specs(5), "json")
        await settle()
        world.end(ra.submitted[0], COMPLETED)
        await settle()
        in_flight = list(world.jobs.values())  # two item jobs alive; two items never started
        assert len(in_flight) == 2 and len(ra.submitted) == 3
        await kill(a)
        assert rb.submitted == [] and await b.store.runner(batch.id) == "a"  # its lease still holds
        await until(lambda: _runner_is(b, batch.id, "b"))
        await settle()
        assert rb.submitted == []  # the adopter follows the two jobs alive; its feed is full with them
        await finish(world, b, batch.id)
        lines = await b.results(batch.id, 0)
        assert sorted(ids(lines)) == [f"i{k}" for k in range(5)] and ids(lines)[0] == "i0"
        assert not {j.id for j in in_flight} & {j.id for j in rb.submitted}  # followed, never submitted again
        assert len(ra.submitted) + len(rb.submitted) == 5  # every item ran once
        await b.stop()

    run(open_database, body)


async def _runner_is(batches: Batches, batch_id: str, runner: str) -> bool:
    return await batches.store.runner(batch_id) == runner


def test_a_stopping_replica_gives_its_batches_back_at_once(open_database: OpenDatabase) -> None:
    async def body(opening: OpenDatabase) -> None:
        world = FakeScheduler()
        a, ra = await replica(opening, world, "a", lease=60.0)  # a lease that never expires in this test
        b, rb = await replica(opening, world, "b")
        batch = await a.submit("key:a", "m", {}, specs(3), "json")
        await settle()
        await asyncio.sleep(LEASE)  # older than the grace a batch nobody holds gets before adoption
        await a.stop()
        await until(lambda: _runner_is(b, batch.id, "b"), seconds=5 * LEASE)
        await finish(world, b, batch.id)
        assert sorted(ids(await b.results(batch.id, 0))) == ["i0", "i1", "i2"]
        assert len(ra.submitted) + len(rb.submitted) == 3
        await b.stop()

    run(open_database, body)


def test_a_follower_on_the_replica_that_does_not_feed_sees_every_line(open_database: OpenDatabase) -> None:
    async def body(opening: OpenDatabase) -> None:
        world = FakeScheduler()
        a, _ = await replica(opening, world, "a")
        b, _ = await replica(opening, world, "b")
        batch = await a.submit("key:a", "m", {}, specs(4), "json")
        seen: list[tuple[float, list[str]]] = []

        async def follow() -> None:  # the route's `GET /api/v1/batches/{id}/results?follow=true`, on b
            async for chunk in _stream(b, batch.id, 0, follow=True):
                seen.append((time.monotonic(), ids(chunk.splitlines())))

        follower = asyncio.create_task(follow())
        ended: list[float] = []
        for _ in range(4):
            await until(lambda: _has_jobs(world))
            world.end(next(iter(world.jobs.values())), COMPLETED)  # one line at a time
            ended.append(time.monotonic())
            await asyncio.sleep(0.3)
        await asyncio.wait_for(follower, timeout=FOLLOW_WAKE_SECONDS)
        assert sorted(x for _, chunk in seen for x in chunk) == [f"i{k}" for k in range(4)]
        # each line reached the follower soon after its job ended, not at the follower's slow wake-up
        assert seen[-1][0] - ended[-1] < FOLLOW_WAKE_SECONDS / 2
        progress = b.progress(await b.get(batch.id))
        assert progress["status"] == COMPLETED and progress["items"]["completed"] == 4
        await a.stop()
        await b.stop()

    run(open_database, body)


async def _has_jobs(world: FakeScheduler) -> bool:
    return bool(world.jobs)


def test_a_cancel_on_the_replica_that_does_not_feed_ends_the_batch(open_database: OpenDatabase) -> None:
    async def body(opening: OpenDatabase) -> None:
        world = FakeScheduler()
        a, ra = await replica(opening, world, "a")
        b, rb = await replica(opening, world, "b")
        batch = await a.submit("key:a", "m", {}, specs(6), "json")
        await settle()
        world.end(ra.submitted[0], COMPLETED)
        await settle()
        running = list(world.jobs.values())
        cancelled = await asyncio.wait_for(b.cancel(batch.id), timeout=5 * LEASE)
        assert cancelled.status == CANCELLED
        await until(lambda: _counts_are(b, batch.id, {COMPLETED: 1, CANCELLED: 5}))
        assert all(j.status == CANCELLED for j in running)  # the feeder stopped its items' jobs
        assert len(ra.submitted) == 3 and rb.submitted == []  # nothing started after the cancel
        await a.stop()
        await b.stop()

    run(open_database, body)


def test_a_cancel_reaches_a_batch_whose_feeder_died(open_database: OpenDatabase) -> None:
    async def body(opening: OpenDatabase) -> None:
        world = FakeScheduler()
        a, ra = await replica(opening, world, "a")
        b, rb = await replica(opening, world, "b")
        batch = await a.submit("key:a", "m", {}, specs(4), "json")
        await settle()
        await kill(a)
        cancelled = await asyncio.wait_for(b.cancel(batch.id), timeout=10 * LEASE)
        assert cancelled.status == CANCELLED
        await until(lambda: _counts_are(b, batch.id, {CANCELLED: 4}))
        assert all(j.status == CANCELLED for j in ra.submitted) and rb.submitted == []
        assert await b.store.runner(batch.id) == "b"  # taken over to be cancelled
        await b.stop()

    run(open_database, body)


async def _counts_are(batches: Batches, batch_id: str, counts: dict[str, int]) -> bool:
    return (await batches.get(batch_id)).counts == counts
