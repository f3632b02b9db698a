"""Several runners (ingress replicas) on one job store: a job is followed, cancelled and read from any of them,
adopted when its runner stops renewing, and ends once. Two schedulers in one process over one SQLite file stand
in for two replicas on a shared store (the store's leases are the same SQL on PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from scheduler_fakes import REGISTRY, Engine, FakeResidency, Recorder, Sink, until, words

from talkative.serve.catalog.registry import parse_registry
from talkative.serve.jobs.analysis import AnalysisKind
from talkative.serve.jobs.choices import ModelChoices
from talkative.serve.jobs.record import CANCELLED, COMPLETED, PROCESSING, QUEUED, Job, new_id
from talkative.serve.jobs.store import JobStore
from talkative.serve.lifecycle import cancel_abandoned
from talkative.serve.scheduling.leases import Leases
from talkative.serve.scheduling.policy import FifoGroupPhases
from talkative.serve.scheduling.queue import JobQueue
from talkative.serve.scheduling.scheduler import Scheduler
from talkative.serve.scheduling.types import SchedulerError
from talkative.serve.scheduling.workers import LocalWorker
from talkative.serve.settings import Settings

LEASE = 0.6  # seconds: renewed every 0.2 s


class Replica:
    def __init__(self, sched: Scheduler, sink: Sink, engine: Engine, store: JobStore) -> None:
        self.sched, self.sink, self.engine, self.store = sched, sink, engine, store


@asynccontextmanager
async def replica(tmp_path: Path, runner: str, *, delay: float = 0.01) -> AsyncIterator[Replica]:
    cfg = Settings(
        model_groups_file=tmp_path / "none.json",
        data_dir=tmp_path / "data",
        devices=["cpu"],
        default_group="ga",
        request_timeout=0,
        purge_interval_seconds=3600,
        lease_seconds=LEASE,
    )
    registry = parse_registry(REGISTRY)
    engine = Engine()
    engine.delay = delay
    store = JobStore(cfg.store_path())
    choices = ModelChoices(store.database)
    sink = Sink()
    policy = FifoGroupPhases()
    worker = LocalWorker(
        "cpu",
        slots=cfg.num_workers_per_gpu,
        residency=FakeResidency(registry),  # type: ignore[arg-type]
        max_tokens=cfg.max_tokens,
        row_token_budget=cfg.row_token_budget,
        engine=engine,
    )
    sched = Scheduler(
        cfg,
        registry,
        store,
        workers=[worker],
        kinds=[AnalysisKind(cfg, registry, policy)],
        queue=JobQueue(),
        sink=sink,
        monitor=Recorder(),
        policy=policy,
        client_cap=lambda owner: None,
        choices=choices,
        leases=Leases(store, runner, LEASE),
    )
    await sched.start()
    await until(lambda: sched.ready)
    try:
        yield Replica(sched, sink, engine, store)
    finally:
        await sched.stop()
        choices.close()
        store.close()


def go(tmp_path: Path, body: Callable[[Path], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(tmp_path), 60))


async def submit(r: Replica, text: str) -> Job:
    return await r.sched.submit("analyze", {"text": text, "options": {}}, model_id="a1", owner="alice")


def finals(events: list[tuple[str, dict[str, Any]]], job_id: str) -> list[str]:
    ends = {"result", "error", "request_cancelled"}
    return [m["type"] for jid, m in events if jid == job_id and m["type"] in ends]


def test_a_job_run_on_one_replica_is_read_followed_and_awaited_on_the_other(tmp_path: Path) -> None:
    async def body(tmp: Path) -> None:
        async with replica(tmp, "a", delay=0.05) as a, replica(tmp, "b") as b:
            job = await submit(a, words(30))
            seen = await b.sched.get(job.id)
            assert seen is not None and seen.owner == "alice" and not seen.terminal
            b.sched.follow(seen, object())
            ended = await b.sched.wait(job.id, timeout=30)
            assert ended.status == COMPLETED and len(ended.result["tokens"]) == 30
            await until(lambda: finals(b.sink.relayed, job.id) == ["result"])
            assert finals(a.sink.events, job.id) == ["result"]
            assert b.engine.batches == []  # b ran nothing of it
            assert b.sink.events == []  # and did not count it as its own work
            await asyncio.sleep(0.3)
            assert finals(b.sink.relayed, job.id) == ["result"]  # once

    go(tmp_path, body)


def test_a_cancel_asked_on_another_replica_reaches_the_runner(tmp_path: Path) -> None:
    async def body(tmp: Path) -> None:
        async with replica(tmp, "a", delay=0.2) as a, replica(tmp, "b") as b:
            job = await submit(a, words(200))
            await until(lambda: a.sched.jobs[job.id].status == PROCESSING)
            cancelled = await b.sched.cancel(job.id)
            assert cancelled.status == CANCELLED
            await until(lambda: finals(a.sink.events, job.id) == ["request_cancelled"])
            stored = await b.store.get(job.id)
            assert stored is not None and stored.status == CANCELLED and stored.result is None

    go(tmp_path, body)


def test_the_jobs_of_a_runner_that_stopped_renewing_are_adopted_and_run_once(tmp_path: Path) -> None:
    async def body(tmp: Path) -> None:
        store = JobStore(tmp / "data" / "jobs.sqlite3")
        now = time.time()
        # a job the dead runner was running, one it had queued, and one never claimed (a whole-cluster restart)
        running = Job(new_id(), "analyze", {"text": words(5), "options": {}}, model_id="a1", group_id="ga")
        running.status, running.attempts, running.started_at = PROCESSING, 1, now
        queued = Job(new_id(), "analyze", {"text": words(4), "options": {}}, model_id="a1", group_id="ga")
        orphan = Job(
            new_id(),
            "analyze",
            {"text": words(3), "options": {}},
            model_id="a1",
            group_id="ga",
            created_at=now - 60,
        )
        for job in (running, queued, orphan):
            await store.put(job)
        assert await store.claim(running.id, "dead", 0.3) and await store.claim(queued.id, "dead", 0.3)
        async with replica(tmp, "b") as b, replica(tmp, "c") as c:
            for job in (running, queued, orphan):
                ended = await b.sched.wait(job.id, timeout=30)
                assert ended.status == COMPLETED, (ended.status, ended.error)
            ran = [text for r in (b, c) for batch in r.engine.batches for text, _ in batch]
            assert sorted(set(ran)) == sorted({words(5), words(4), words(3)})
            # each adopted once: by one replica, never by both
            for text in (words(5), words(4), words(3)):
                assert (
                    sum(1 for r in (b, c) if any(t == text for batch in r.engine.batches for t, _ in batch))
                    == 1
                )
        store.close()

    go(tmp_path, body)


def test_a_runner_that_lost_its_lease_writes_nothing_and_its_listeners_hear_the_new_end_once(
    tmp_path: Path,
) -> None:
    async def body(tmp: Path) -> None:
        async with replica(tmp, "a", delay=0.2) as a:
            job = await submit(a, words(100))
            await until(lambda: a.sched.jobs.get(job.id) is not None and job.status == PROCESSING)
            # another runner takes the job over (as after a's lease expired while it stalled) and ends it
            await a.store.release(job.id, "a")
            assert await a.store.claim(job.id, "other", 60)
            await until(lambda: job.id not in a.sched.jobs)  # a's next renewal gives it up
            a.sched.follow(job, object())
            done = Job(**{**job.__dict__, "status": COMPLETED, "result": {"tokens": [], "metadata": {}}})
            done.completed_at = time.time()
            assert await a.store.finish(done, "other")
            await until(lambda: finals(a.sink.relayed, job.id) == ["result"])
            await asyncio.sleep(0.5)
            assert finals(a.sink.events, job.id) == []  # a announced no end of its own
            stored = await a.store.get(job.id)
            assert stored is not None and stored.status == COMPLETED and stored.result == done.result

    go(tmp_path, body)


def test_a_stopping_replica_gives_its_unfinished_jobs_back_at_once(tmp_path: Path) -> None:
    async def body(tmp: Path) -> None:
        async with replica(tmp, "a", delay=0.3) as a:
            first = await submit(a, words(60))
            second = await submit(a, words(2, "z"))
        store = JobStore(tmp / "data" / "jobs.sqlite3")
        for job in (first, second):
            stored = await store.get(job.id)
            assert stored is not None and stored.status in (QUEUED, PROCESSING)
            assert await store.claim(job.id, "next", 5)  # nobody holds them any more
        store.close()

    go(tmp_path, body)


def test_cancelling_a_job_another_replica_finished_is_a_conflict(tmp_path: Path) -> None:
    async def body(tmp: Path) -> None:
        async with replica(tmp, "a") as a, replica(tmp, "b") as b:
            job = await submit(a, words(3))
            assert (await a.sched.wait(job.id, timeout=30)).status == COMPLETED
            with pytest.raises(SchedulerError, match="already completed") as refused:
                await b.sched.cancel(job.id)
            assert refused.value.status == 409

    go(tmp_path, body)


def test_a_closing_connection_cancels_the_jobs_it_followed_that_another_replica_runs(tmp_path: Path) -> None:
    """The disconnect rule of one process holds across replicas: the closing connection's caller's unfinished jobs
    that no other open connection follows are cancelled, through the store, on the replica that runs them."""

    async def body(tmp: Path) -> None:
        async with replica(tmp, "a", delay=0.2) as a, replica(tmp, "b") as b:
            mine = await submit(a, words(200))
            watched = await submit(a, words(200))  # another open connection on b still follows it
            theirs = await a.sched.submit(
                "analyze", {"text": words(200), "options": {}}, model_id="a1", owner="bob"
            )
            await until(lambda: a.sched.jobs[mine.id].status == PROCESSING)
            closing = SimpleNamespace(id="c1", identity=SimpleNamespace(key="alice"), closed=True)
            still_open = SimpleNamespace(closed=False)
            svc = SimpleNamespace(
                scheduler=b.sched, hub=SimpleNamespace(subscribers={watched.id: [still_open]})
            )
            followed = [mine.id, watched.id, theirs.id]
            assert await cancel_abandoned(svc, closing, followed) == 1  # type: ignore[arg-type]
            await until(lambda: finals(a.sink.events, mine.id) == ["request_cancelled"])
            stored = await b.store.get(mine.id)
            assert stored is not None and stored.status == CANCELLED
            for kept in (watched, theirs):
                assert not a.sched.jobs[kept.id].terminal

    go(tmp_path, body)


def test_a_switch_on_one_replica_is_what_a_request_on_the_other_runs_on(tmp_path: Path) -> None:
    """A client's current model and the server's default are the store's, not a replica's: a switch answered on
    one replica decides what the next request that names no model runs on, on any replica."""

    async def body(tmp: Path) -> None:
        async with replica(tmp, "a") as a, replica(tmp, "b") as b:
            assert await b.sched.resolve_model(None, "key:bob") == "a1"
            mine = await a.sched.submit(
                "switch", {"model_id": "a2", "scope": "client"}, model_id="a2", owner="key:bob"
            )
            assert (await a.sched.wait(mine.id, timeout=30)).status == COMPLETED
            assert await b.sched.resolve_model(None, "key:bob") == "a2"
            assert await b.sched.resolve_model(None, "key:alice") == "a1"  # nobody else's changes
            model = await b.sched.resolve_model(None, "key:bob")
            job = await b.sched.submit(
                "analyze", {"text": words(3), "options": {}}, model_id=model, owner="key:bob"
            )
            ran = await b.sched.wait(job.id, timeout=30)
            assert ran.status == COMPLETED and ran.model_id == "a2"
            # the administrator's switch on b moves the default a resolves with
            moved = await b.sched.submit(
                "switch", {"model_id": "b1", "scope": "server"}, model_id="b1", owner="key:admin"
            )
            assert (await b.sched.wait(moved.id, timeout=30)).status == COMPLETED
            assert await a.sched.server_model() == "b1"
            assert await a.sched.resolve_model(None, "key:alice") == "b1"
            assert await a.sched.resolve_model(None, "key:bob") == "a2"  # its own choice stands

    go(tmp_path, body)
