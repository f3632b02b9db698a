"""The scheduler in process, with a fake engine that records every batch: interleaving, merging within the row
budget, cancellation, failure isolation, group phases, switches, handlers, backpressure and recovery."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from scheduler_fakes import BUDGET, Engine, FakeResidency, Sink, analyze, run, until, words

from talkative.serve.jobs.choices import ModelChoices
from talkative.serve.jobs.kinds import WholeJobKind
from talkative.serve.jobs.record import Job
from talkative.serve.jobs.store import JobStore
from talkative.serve.scheduling.scheduler import Scheduler
from talkative.serve.scheduling.types import SchedulerError
from talkative.serve.scheduling.workers import JobContext


def test_short_job_interleaves_with_a_long_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        long_text = words(40, "L")
        long_id = await analyze(sched, long_text, batch_size=2)
        await until(lambda: len(engine.batches) >= 2)
        short_id = await analyze(sched, "s1 s2 s3", optimize_explanations_config={"best_of_k": 2})
        short = await sched.wait(short_id, 20)
        assert short.status == "completed"
        assert (await sched.get(long_id)).status == "processing"  # type: ignore[union-attr]
        first_short = next(i for i, b in enumerate(engine.batches) if "s1 s2 s3" in engine.jobs_in(b))
        assert first_short <= 4  # at most the batch in flight and one more of the long job before it
        assert (await sched.wait(long_id, 30)).status == "completed"
        assert types_ok(sink.types(short_id))

    run(tmp_path, body)


def types_ok(types: list[str]) -> bool:
    return types[0] == "queued" and types[1] == "processing" and types[-1] == "result"


def test_compatible_jobs_merge_up_to_the_row_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        engine.delay = 0.03
        k1 = {"best_of_k": 1}
        a = await analyze(sched, words(12, "a"), batch_size=4, seed=1, optimize_explanations_config=k1)
        b = await analyze(sched, words(12, "b"), batch_size=4, seed=2, optimize_explanations_config=k1)
        c = await analyze(sched, words(6, "c"), batch_size=4, optimize_explanations_config={"best_of_k": 2})
        ja, jb, jc = [await sched.wait(x, 20) for x in (a, b, c)]
        assert ja.status == jb.status == jc.status == "completed"
        for batch in engine.batches:
            k = 2 if any(t.startswith("c0") for t, _ in batch) else 1  # a and b: k=1
            assert sum(len(pos) for _, pos in batch) * k <= BUDGET
            assert not (any(t.startswith("c0") for t, _ in batch) and len(batch) > 1)  # other k: never merged
        merged = [b for b in engine.batches if len(b) > 1]
        assert merged and all(engine.jobs_in(b) == {words(12, "a"), words(12, "b")} for b in merged)
        assert ja.result and jb.result
        assert [r["explanation"] for r in ja.result["tokens"]] == [f"1:{q}:a1" for q in range(12)]
        assert [r["explanation"] for r in jb.result["tokens"]] == [f"2:{q}:a1" for q in range(12)]
        shared = set(ja.result["metadata"]["engine_batches"]) & set(jb.result["metadata"]["engine_batches"])
        assert shared and ja.result["metadata"]["merged_batches"] == len(shared)
        assert sched.stats["merged_batches"] == len(merged)

    run(tmp_path, body)


def test_cancel_running_and_queued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        engine.delay = 0.05
        text = words(40, "L")
        running = await analyze(sched, text, batch_size=2)
        queued = await analyze(sched, words(5, "Q"))
        assert (await sched.get(queued)).status == "queued"  # type: ignore[union-attr]
        await sched.cancel(queued)
        await until(lambda: len(engine.batches) >= 2)
        await sched.cancel(running)
        seen = len(engine.batches)
        await asyncio.sleep(0.3)
        later = [b for b in engine.batches[seen:] if text in engine.jobs_in(b)]
        assert not later
        for jid in (running, queued):
            job = await sched.wait(jid)
            assert job.status == "cancelled" and job.result is None
            assert sink.types(jid)[-1] == "request_cancelled"
        assert all(words(5, "Q") not in engine.jobs_in(b) for b in engine.batches)
        with pytest.raises(SchedulerError) as err:
            await sched.cancel(running)
        assert err.value.status == 409
        with pytest.raises(KeyError):
            await sched.cancel("nope")

    run(tmp_path, body, max_active_jobs=1)


def test_a_failing_part_fails_only_its_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        engine.delay = 0.03
        boom = await analyze(sched, "boom " + words(5), batch_size=3)
        fine = await analyze(sched, "fine " + words(5), batch_size=3)
        bad = await analyze(sched, "bad input here")
        jb, jf, jbad = [await sched.wait(x, 20) for x in (boom, fine, bad)]
        assert jb.status == "failed" and "boom" in (jb.error or "")
        assert jf.status == "completed" and jf.result and len(jf.result["tokens"]) == 6
        assert jbad.status == "failed" and jbad.error == "bad input"
        assert sink.types(boom)[-1] == "error"

    run(tmp_path, body)


def test_group_phases_never_break_running_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        engine.delay = 0.02
        a1 = await analyze(sched, words(20, "A"), batch_size=2)
        await until(lambda: len(engine.batches) >= 1)
        b1 = await analyze(sched, words(4, "B"), model="b1")
        a2 = await analyze(sched, words(4, "C"), model="a2")  # same group as a1, but after b1: waits its turn
        ja1, jb1, ja2 = [await sched.wait(x, 30) for x in (a1, b1, a2)]
        assert ja1.status == jb1.status == ja2.status == "completed"
        assert ja1.result and len(ja1.result["tokens"]) == 20
        assert jb1.result and jb1.result["tokens"][0]["explanation"].endswith(":b1")
        assert ja2.result and ja2.result["tokens"][0]["explanation"].endswith(":a2")
        assert ja1.completed_at and jb1.started_at and jb1.completed_at and ja2.started_at
        assert ja1.completed_at <= jb1.started_at and jb1.completed_at <= ja2.started_at
        assert res.log == [
            ("acquire", "ga"),
            ("release", "ga"),
            ("acquire", "gb"),
            ("release", "gb"),
            ("acquire", "ga"),
        ]
        statuses = [
            (m["status"], m["group_id"]) for m in sink.broadcasts if m["type"] == "group_switch_status"
        ]
        assert ("starting", "gb") in statuses and ("completed", "gb") in statuses

    run(tmp_path, body)


def test_switch_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        assert await sched.server_model() == "a1"
        same = await sched.submit("switch", {"model_id": "a2"}, model_id="a2")
        assert same.status == "completed" and await sched.server_model() == "a2"  # same group: at once
        assert same.result and same.result["group_switched"] is False
        other = await sched.submit("switch", {"model_id": "b1"}, model_id="b1")
        assert sink.types(other.id) == ["group_switch_queued"]
        done = await sched.wait(other.id, 10)
        assert done.status == "completed" and await sched.server_model() == "b1"
        assert (
            done.result and done.result["group_switched"] is True and done.result["model_info"]["is_loaded"]
        )
        assert await sched.resolve_model(None) == "b1"
        assert sink.types(other.id)[-1] == "model_switch_complete"

    run(tmp_path, body)


def test_a_group_that_cannot_load_fails_its_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        b = await analyze(sched, "x y", model="b1")
        job = await sched.wait(b, 10)
        assert job.status == "failed" and "could not be loaded" in (job.error or "")
        a = await sched.wait(await analyze(sched, "x y z"), 10)  # the device serves the next group
        assert a.status == "completed"

    run(tmp_path, body, broken=frozenset({"gb"}))


class Greeting(WholeJobKind):
    """A whole-job kind: one message, then its result."""

    names = ("generate",)

    def run(self, ctx: JobContext) -> dict[str, Any]:
        ctx.emit({"type": "token", "token": "hi", "position": 0, "finish_reason": None})
        return {"completions": [f"from {ctx.nla}"]}


def test_kinds_given_at_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        job = await sched.submit("generate", {"text": "x"}, model_id="a1")
        done = await sched.wait(job.id, 10)
        assert done.status == "completed" and done.result == {"completions": ["from a1"]}
        assert sink.types(job.id) == ["queued", "token", "generate_complete"]
        unknown = await sched.submit("nonsense", {}, model_id="a1")
        assert (await sched.wait(unknown.id, 10)).status == "failed"

    run(tmp_path, body, kinds=[Greeting()])


def test_queue_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        engine.delay = 0.2
        await analyze(sched, words(10))
        await analyze(sched, words(10))
        with pytest.raises(SchedulerError) as err:
            await analyze(sched, words(10))
        assert err.value.status == 429 and err.value.reason == "queue_full" and err.value.retry_after

    run(tmp_path, body, max_queue_size=2)


def test_recovery_requeues_unfinished_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def old(i: int, status: str, attempts: int) -> Job:
        return Job(
            id=f"old{i}",
            kind="analyze",
            request={"text": words(3), "options": {}},
            model_id="a1",
            group_id="ga",
            status=status,
            created_at=time.time() - 100 + i,
            attempts=attempts,
            started_at=time.time() - 50 if status == "processing" else None,
        )

    async def before(store: JobStore) -> None:
        await store.put(old(0, "processing", 1))
        await store.put(old(1, "queued", 0))
        await store.put(old(2, "processing", 3))

    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        j0, j1, j2 = [await sched.wait(f"old{i}", 10) for i in range(3)]
        assert j0.status == j1.status == "completed" and j0.attempts == 2
        assert j2.status == "failed" and "giving up" in (j2.error or "")

    run(tmp_path, body, before=before)


def test_timeout_between_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        engine.delay = 0.05
        sched.settings.request_timeout = 0.2
        job = await sched.wait(await analyze(sched, words(40), batch_size=1), 10)
        assert job.status == "failed" and "REQUEST_TIMEOUT" in (job.error or "")

    run(tmp_path, body)


@pytest.mark.parametrize("fill", [False, True])
def test_batches_that_finish_a_job_are_filled_only_where_rows_are_cheap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fill: bool
) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        engine.delay = 0.05
        k1 = {"best_of_k": 1}
        long_id = await analyze(sched, words(30, "L"), batch_size=4, optimize_explanations_config=k1)
        await until(lambda: len(engine.batches) >= 1)
        short_id = await analyze(sched, "s1 s2", batch_size=4, optimize_explanations_config=k1)
        await sched.wait(short_id, 10)
        short_batches = [b for b in engine.batches if "s1 s2" in engine.jobs_in(b)]
        assert len(short_batches) == 1
        assert (len(short_batches[0]) > 1) is fill  # alone on a CPU, filled up to the budget on a GPU
        await sched.cancel(long_id)
        # jobs that all finish in one batch share it either way
        engine.batches.clear()
        pair = [
            await analyze(sched, f"p{i} q{i}", batch_size=4, optimize_explanations_config=k1)
            for i in range(3)
        ]
        for jid in pair:
            await sched.wait(jid, 10)
        assert any(len(b) > 1 for b in engine.batches), engine.batches

    run(tmp_path, body, fill_finishing_batches=fill)


def test_lazy_loading_waits_for_the_first_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        assert sched.ready and res.log == [] and await sched.server_model() == "a1"
        job = await sched.wait(await analyze(sched, "x y"), 10)
        assert job.status == "completed" and res.log == [("acquire", "ga")]

    run(tmp_path, body, lazy_load_model=True)


def test_a_process_that_owns_its_store_forgets_the_current_models_at_start(tmp_path: Path) -> None:
    """One process (no leases): a restart starts every client on the configured default, as when the choices were
    kept in its memory; replicas sharing a store keep them (test_leases)."""

    async def before(store: JobStore) -> None:
        left = ModelChoices(store.database)
        await left.choose("key:bob", "a2")
        await left.set_default("b1", None)
        left.close()

    async def body(sched: Scheduler, engine: Engine, sink: Sink, res: FakeResidency) -> None:
        assert await sched.resolve_model(None, "key:bob") == "a1" and await sched.server_model() == "a1"

    run(tmp_path, body, before=before)
