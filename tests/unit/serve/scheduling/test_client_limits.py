"""The scheduler's limits and failures, in process with the fake engine of test_scheduler: out-of-memory and other
engine failures, REQUEST_TIMEOUT against a stuck engine call, backpressure (queue, per-client cap, not ready,
draining), the drain itself, a failed switch leaving the previous group serving, and the metrics monitor."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from scheduler_fakes import Engine, FakeResidency, Recorder, Sink, analyze, run, until, words

from talkative.nla.analysis import Cancelled
from talkative.serve.jobs.kinds import WholeJobKind
from talkative.serve.lifecycle import drain
from talkative.serve.scheduling.scheduler import Scheduler
from talkative.serve.scheduling.types import SchedulerError
from talkative.serve.scheduling.workers import JobContext


def test_out_of_memory_fails_only_its_job_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        real = engine.run_batch

        def run_batch(nla: Any, parts: Any, opts: Any, **kw: Any) -> Any:
            if any(p.text.startswith("oom") for p, _ in parts):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            if any(p.text.startswith("ram") for p, _ in parts):
                raise MemoryError()
            return real(nla, parts, opts, **kw)

        monkeypatch.setattr(engine, "run_batch", run_batch)
        oom = await sched.wait(await analyze(sched, "oom " + words(3)), 10)
        ram = await sched.wait(await analyze(sched, "ram " + words(3)), 10)
        for job in (oom, ram):
            assert job.status == "failed", job
            assert (job.error or "").startswith("out of memory on cpu while explaining"), job.error
            assert "smaller batch_size or best_of_k" in (job.error or "")
        fine = await sched.wait(await analyze(sched, words(5)), 10)  # the worker keeps serving
        assert fine.status == "completed"
        boom = await sched.wait(await analyze(sched, "boom " + words(3)), 10)
        assert boom.status == "failed" and (boom.error or "").startswith("internal error while explaining")

    run(tmp_path, body)


def test_a_stuck_engine_call_fails_its_job_at_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        real = engine.run_batch

        def run_batch(nla: Any, parts: Any, opts: Any, **kw: Any) -> Any:
            if any(p.text.startswith("stuck") for p, _ in parts):
                release.wait(30)  # an engine call that does not come back on its own
            return real(nla, parts, opts, **kw)

        monkeypatch.setattr(engine, "run_batch", run_batch)
        sched.settings.request_timeout = 1.0
        t0 = time.monotonic()
        stuck = await sched.wait(await analyze(sched, "stuck " + words(3)), 10)
        waited = time.monotonic() - t0
        assert stuck.status == "failed" and "REQUEST_TIMEOUT (1 s)" in (stuck.error or ""), stuck
        assert waited < 5, waited  # the watchdog, not the next chunk, ended it
        release.set()
        after = await sched.wait(await analyze(sched, words(4)), 10)  # the slot comes back when the call does
        assert after.status == "completed"

    try:
        run(tmp_path, body)
    finally:
        release.set()


def test_a_whole_job_past_the_timeout_is_failed_and_told_to_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stopped = threading.Event()

    class Endless(WholeJobKind):
        names = ("generate",)

        def run(self, ctx: JobContext) -> dict[str, Any]:
            while not ctx.cancelled():
                time.sleep(0.01)
            stopped.set()
            return {}

    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        sched.settings.request_timeout = 1.0
        job = await sched.submit("generate", {"text": "x"}, model_id="a1")
        done = await sched.wait(job.id, 10)
        assert done.status == "failed" and "REQUEST_TIMEOUT" in (done.error or "")
        await until(stopped.is_set, 5)
        after = await sched.wait(await analyze(sched, words(3)), 10)
        assert after.status == "completed"

    run(tmp_path, body, kinds=[Endless()])


def test_backpressure_queue_client_cap_and_not_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()

    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        engine.delay = 0.2
        for _ in range(2):
            await sched.submit("analyze", {"text": words(10), "options": {}}, model_id="a1", owner="key:a")
        with pytest.raises(SchedulerError) as busy:
            await sched.submit("analyze", {"text": words(3), "options": {}}, model_id="a1", owner="key:a")
        assert busy.value.status == 429 and busy.value.reason == "client_busy" and busy.value.retry_after
        assert "MAX_JOBS_PER_CLIENT" in busy.value.detail
        await sched.submit("analyze", {"text": words(3), "options": {}}, model_id="a1", owner="key:b")
        await sched.submit("analyze", {"text": words(3), "options": {}}, model_id="a1", owner="ip:127.0.0.1")
        with pytest.raises(SchedulerError) as full:
            await sched.submit("analyze", {"text": words(3), "options": {}}, model_id="a1", owner="key:c")
        assert full.value.status == 429 and full.value.reason == "queue_full"
        with pytest.raises(SchedulerError) as switch_full:
            await sched.submit("switch", {"model_id": "a2"}, model_id="a2", owner="key:d")
        assert switch_full.value.reason == "queue_full"  # a switch counts like any other job
        sched.ready = False  # as while the startup group loads
        with pytest.raises(SchedulerError) as starting:
            await sched.submit("analyze", {"text": words(3), "options": {}}, model_id="a1", owner="key:c")
        assert starting.value.status == 503 and starting.value.reason == "not_ready"
        sched.ready = True
        assert recorder.rejections == ["client_busy", "queue_full", "queue_full", "not_ready"]

    run(
        tmp_path,
        body,
        monitor=recorder,
        client_cap=lambda owner: 2 if owner and owner.startswith("key:") else None,
        max_queue_size=4,
    )


def test_drain_keeps_work_for_the_next_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        engine.delay = 0.15
        sched.settings.max_active_jobs = 1
        running = await analyze(sched, words(40))  # 5 chunks of 8 positions
        queued = await analyze(sched, words(5))
        await until(lambda: sched.jobs[running].progress.get("done_positions", 0) > 0)
        counts = await drain(SimpleNamespace(scheduler=sched, store=sched.store), timeout=5)  # type: ignore[arg-type]
        assert counts == {"queued": 1, "requeued": 1, "still_running": 0}
        batches = len(engine.batches)
        await asyncio.sleep(0.5)
        assert len(engine.batches) == batches, "a new engine batch started during the drain"
        stored = {j.id: j for j in await sched.store.unfinished()}
        assert stored[running].status == "queued" and stored[running].attempts == 0
        assert stored[queued].status == "queued" and stored[queued].attempts == 0
        with pytest.raises(SchedulerError) as closed:
            await analyze(sched, words(3))
        assert closed.value.status == 503 and closed.value.reason == "draining"

    run(tmp_path, body)


def test_a_failed_switch_leaves_the_previous_group_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        switch = await sched.submit("switch", {"model_id": "b1"}, model_id="b1")
        done = await sched.wait(switch.id, 10)
        assert done.status == "failed" and "group gb could not be loaded: broken checkpoint" in (
            done.error or ""
        )
        assert sched.devices[0].group_id == "ga" and await sched.server_model() == "a1"
        assert res.log == [("acquire", "ga"), ("release", "ga"), ("acquire", "gb"), ("acquire", "ga")]
        job = await sched.wait(await analyze(sched, words(3)), 10)
        assert job.status == "completed"
        assert res.log[-1] == ("acquire", "ga")  # served without another load

    run(tmp_path, body, broken=frozenset({"gb"}))


def test_the_monitor_hears_every_engine_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()

    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        real = engine.run_batch

        def run_batch(nla: Any, parts: Any, opts: Any, **kw: Any) -> Any:
            timings = kw["timings"]
            for stage in ("verbalize", "reconstruct", "kl"):
                timings[stage] = timings.get(stage, 0.0) + 0.001
            return real(nla, parts, opts, **kw)

        monkeypatch.setattr(engine, "run_batch", run_batch)
        assert (await sched.wait(await analyze(sched, words(3)), 10)).status == "completed"
        assert {"verbalize", "reconstruct", "kl"} <= set(recorder.stages)

    run(tmp_path, body, monitor=recorder)


def test_switches_are_per_client_counted_and_coalesced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One client's switch never changes what another's requests run on; the administrator's moves the default;
    switches count against the per-client cap, and repeated ones replace each other in the queue."""

    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        mine = await sched.submit(
            "switch", {"model_id": "a2", "scope": "client"}, model_id="a2", owner="key:bob"
        )
        assert mine.status == "completed" and await sched.server_model() == "a1"
        assert (
            await sched.resolve_model(None, "key:bob") == "a2"
            and await sched.resolve_model(None, "key:alice") == "a1"
        )
        alice = await sched.wait(await analyze_as(sched, "key:alice"), 10)
        assert alice.model_id == "a1"
        await sched.submit("switch", {"model_id": "a2", "scope": "server"}, model_id="a2", owner="key:admin")
        assert (
            await sched.resolve_model(None, "key:alice") == "a2"
            and await sched.resolve_model(None, "key:bob") == "a2"
        )
        await sched.submit("switch", {"model_id": "a1", "scope": "server"}, model_id="a1", owner="key:admin")
        assert (
            await sched.resolve_model(None, "key:alice") == "a1"
            and await sched.resolve_model(None, "key:bob") == "a2"
        )
        engine.delay = 0.3  # the device stays busy with group a, so switches to group b wait in the queue
        await analyze(sched, words(30))
        ids = []
        for _ in range(6):
            await sched.supersede_switches("key:bob", "b1")
            job = await sched.submit(
                "switch", {"model_id": "b1", "scope": "client"}, model_id="b1", owner="key:bob"
            )
            ids.append(job.id)
        waiting = [j.id for j in sched.queue if j.kind == "switch"]
        assert waiting == ids[-1:]
        for old in ids[:-1]:
            got = await sched.get(old)
            assert got is not None and got.status == "cancelled" and "superseded" in (got.error or "")
        await analyze_as(sched, "key:bob")
        await analyze_as(sched, "key:bob")
        with pytest.raises(SchedulerError) as busy:  # two analyses and the queued switch: the cap of 3
            await analyze_as(sched, "key:bob")
        assert busy.value.reason == "client_busy"
        done = await sched.wait(ids[-1], 20)
        assert done.status == "completed" and await sched.resolve_model(None, "key:bob") == "b1"
        assert await sched.server_model() == "a1"

    run(tmp_path, body, client_cap=lambda owner: 3 if owner and owner.startswith("key:") else None)


async def analyze_as(sched: Scheduler, owner: str) -> str:
    model = await sched.resolve_model(None, owner)
    job = await sched.submit("analyze", {"text": words(3), "options": {}}, model_id=model, owner=owner)
    return job.id


def test_a_job_waiting_behind_a_long_batch_does_not_time_out_and_the_long_one_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REQUEST_TIMEOUT counts a job's own engine time: bob's job, admitted while alice's batch holds the only
    worker, waits longer than the limit yet completes; alice's batch, past the limit, is told to stop and does."""
    ended = threading.Event()

    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        real = engine.run_batch
        started = threading.Event()

        def run_batch(nla: Any, parts: Any, opts: Any, **kw: Any) -> Any:
            if any(p.text.startswith("slow") for p, _ in parts):
                started.set()
                deadline = time.monotonic() + 20
                while (
                    time.monotonic() < deadline
                ):  # a long engine call asking its cancel callable between steps
                    if kw["cancelled"]():
                        ended.set()
                        raise Cancelled()
                    time.sleep(0.01)
            return real(nla, parts, opts, **kw)

        monkeypatch.setattr(engine, "run_batch", run_batch)
        sched.settings.request_timeout = 0.5
        alice = await analyze(sched, "slow " + words(3))
        await until(started.is_set, 5)
        t0 = time.monotonic()
        bob = await analyze(sched, words(2))
        done_alice = await sched.wait(alice, 10)
        assert done_alice.status == "failed" and "REQUEST_TIMEOUT" in (done_alice.error or "")
        await until(ended.is_set, 5)  # the engine call itself returned early
        done_bob = await sched.wait(bob, 10)
        assert done_bob.status == "completed", done_bob.error
        assert time.monotonic() - t0 > 0.5  # bob waited past the limit for the worker alice held

    run(tmp_path, body, num_workers_per_gpu=1)
