"""A worker replica's runner without Ray: today's scheduler over a fake engine, fed whole jobs as the ingress
sends them (its stream of messages, merging across the jobs it holds, cancellation when the caller stops
listening, switching between groups, loading ahead of jobs)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from scheduler_fakes import REGISTRY, Engine, FakeResidency, words

from talkative.nla.analysis import AnalysisError
from talkative.nla.options import resolve
from talkative.serve.catalog.registry import parse_registry
from talkative.serve.catalog.residency import GroupRuntime
from talkative.serve.cluster.runner import ReplicaRunner
from talkative.serve.settings import Settings


def with_runner(
    tmp_path: Path,
    body: Callable[[ReplicaRunner, Engine], Awaitable[None]],
    broken: frozenset[str] = frozenset(),
    *,
    engine: Engine | None = None,
    residency: type[FakeResidency] = FakeResidency,
) -> None:
    engine = engine or Engine()
    registry = parse_registry(REGISTRY)
    settings = Settings(
        model_groups_file=tmp_path / "none.json",
        data_dir=tmp_path / "data",
        devices=["cpu"],
        request_timeout=0,
        env_overrides={},
        _env_file=None,
    )

    async def main() -> None:
        runner = ReplicaRunner(
            settings,
            registry,
            "cpu",
            residency=residency(registry, broken),  # type: ignore[arg-type]
            engine=engine,
        )
        await runner.start()
        try:
            await asyncio.wait_for(body(runner, engine), 60)
        finally:
            await runner.stop()
        assert not runner.scratch.exists()  # the replica's scratch store goes with it

    asyncio.run(main())


async def collect(
    runner: ReplicaRunner, model_id: str, text: str, scope: str | None = None, **options: Any
) -> list[dict[str, Any]]:
    request = {
        "text": text,
        "options": {"batch_size": 4, "optimize_explanations_config": {"best_of_k": 1}, **options},
    }
    return [m async for m in runner.run("analyze", request, model_id, scope)]


class IdentifiedResidency(FakeResidency):
    """Loads models with a content identity, as the real residency does (the result cache keys rows by it)."""

    def acquire(self, gid: str, device: str) -> GroupRuntime:
        rt = super().acquire(gid, device)
        rt.identities.update({m: f"identity-of-{m}" for m in rt.nlas})
        return rt


class PickyEngine(Engine):
    """Refuses a tuned lens, as a model without one does."""

    def check_options(self, nla: Any, opts: Any, tuned: Any = None) -> None:
        if opts.tuned_lens:
            raise AnalysisError("tuned_lens needs a tuned lens directory")


def test_a_job_streams_accepted_progress_then_its_end_with_the_whole_result(tmp_path: Path) -> None:
    async def body(runner: ReplicaRunner, engine: Engine) -> None:
        messages = await collect(runner, "a1", words(5))
        types = [m["type"] for m in messages]
        assert types[0] == "accepted" and types[-1] == "end" and "processing" in types
        assert "queued" not in types and "result" not in types  # the ingress tells its listeners those itself
        end = messages[-1]
        assert end["status"] == "completed" and end["error"] is None
        assert [r["position"] for r in end["result"]["tokens"]] == list(range(5))

    with_runner(tmp_path, body)


def test_jobs_the_replica_holds_at_once_share_engine_batches(tmp_path: Path) -> None:
    async def body(runner: ReplicaRunner, engine: Engine) -> None:
        engine.delay = 0.05
        first, second = await asyncio.gather(
            collect(runner, "a1", words(12, "a"), seed=1), collect(runner, "a1", words(12, "b"), seed=2)
        )
        assert first[-1]["status"] == second[-1]["status"] == "completed"
        merged = [b for b in engine.batches if len(b) > 1]
        assert merged and all(engine.jobs_in(b) == {words(12, "a"), words(12, "b")} for b in merged)
        assert runner.describe()["stats"]["merged_batches"] >= 1

    with_runner(tmp_path, body)


def test_a_caller_that_stops_listening_cancels_the_job_on_the_replica(tmp_path: Path) -> None:
    async def body(runner: ReplicaRunner, engine: Engine) -> None:
        engine.delay = 0.05
        options = {"batch_size": 1, "optimize_explanations_config": {"best_of_k": 1}}
        stream = runner.run("analyze", {"text": words(40), "options": options}, "a1")
        async for message in stream:
            if message["type"] == "processing" and message.get("done_positions"):
                break
        await stream.aclose()  # what Serve does when the ingress cancels the call
        assert runner.describe()["stats"]["cancelled"] == 1
        while runner.describe()["jobs"]:  # its end is being stored
            await asyncio.sleep(0.01)
        batches = len(engine.batches)
        await asyncio.sleep(0.2)
        assert len(engine.batches) <= batches + 1  # at most the batch in flight ran: the job stopped

    with_runner(tmp_path, body)


def test_a_replica_switches_groups_for_the_jobs_it_gets_and_loads_ahead_when_idle(tmp_path: Path) -> None:
    async def body(runner: ReplicaRunner, engine: Engine) -> None:
        assert runner.holds() == []
        await runner.ensure("gb")  # an idle, empty device: loaded at once
        assert runner.holds() == ["gb"]
        assert (await collect(runner, "a1", words(3)))[-1]["status"] == "completed"
        assert runner.holds()[0] == "ga"
        assert (await collect(runner, "b1", words(3)))[-1]["status"] == "completed"
        assert runner.holds()[0] == "gb" and runner.describe()["stats"]["group_loads"] == 3

    with_runner(tmp_path, body)


def test_a_group_that_cannot_load_is_reported_and_fails_its_jobs(tmp_path: Path) -> None:
    async def body(runner: ReplicaRunner, engine: Engine) -> None:
        facts = await runner.load("gb")
        assert "broken checkpoint" in facts["errors"]["*"] and runner.load_errors["gb"]
        end = (await collect(runner, "b1", words(3)))[-1]
        assert end["status"] == "failed" and "broken checkpoint" in end["error"]

    with_runner(tmp_path, body, broken=frozenset({"gb"}))


def test_a_completed_analysis_ends_with_its_cache_plan_keyed_for_the_ingress_clients_scope(
    tmp_path: Path,
) -> None:
    async def body(runner: ReplicaRunner, engine: Engine) -> None:
        mine = (await collect(runner, "a1", words(4), "client-1"))[-1]
        again = (await collect(runner, "a1", words(4), "client-1"))[-1]
        theirs = (await collect(runner, "a1", words(4), "client-2"))[-1]
        plan = mine["cache_plan"]
        assert sorted(plan.row_keys) == [0, 1, 2, 3] and not plan.cached
        assert (
            plan.row_keys == again["cache_plan"].row_keys and plan.input_key == again["cache_plan"].input_key
        )
        assert not set(plan.row_keys.values()) & set(
            theirs["cache_plan"].row_keys.values()
        )  # scoped per client
        assert runner.plans.plans == {}  # handed over, none kept
        assert "cache_plan" not in (await collect(runner, "a1", "boom x", "client-1"))[-1]  # failed: no rows

    with_runner(tmp_path, body, residency=IdentifiedResidency)


def test_the_replica_checks_options_of_a_model_on_its_device_for_the_ingress(tmp_path: Path) -> None:
    async def body(runner: ReplicaRunner, engine: Engine) -> None:
        bad, good = resolve({"tuned_lens": True}), resolve({})
        assert await runner.check("a1", bad) is None  # not on this device: its job's preparation checks it
        await runner.load("ga")
        assert await runner.check("a1", bad) == "tuned_lens needs a tuned lens directory"
        assert await runner.check("a1", good) is None

    with_runner(tmp_path, body, engine=PickyEngine())
