"""The ingress side of the Ray backend without Ray: the dispatcher over a scripted transport (relaying, sending a
job again when its replica dies, de-duplicating what listeners heard, refusals, cancellation)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from talkative.nla.analysis import AnalysisError
from talkative.nla.options import Resolved, resolve
from talkative.serve.catalog.registry import parse_registry
from talkative.serve.cluster.dispatch import (
    MAX_REDISPATCH,
    CallCancelled,
    ClusterBusy,
    Dispatcher,
    ReplicaLost,
    ServeWorker,
)
from talkative.serve.jobs.cache import CachePlan
from talkative.serve.jobs.record import Job
from talkative.serve.scheduling.types import SchedulerError
from talkative.serve.scheduling.workers import LoadFailed, WorkFailed

END = {"type": "end", "status": "completed", "result": {"tokens": [1, 2, 3]}, "error": None}


class Scripted:
    """One call: its messages in order; an exception in the script is raised at that point."""

    def __init__(self, script: list[dict[str, Any] | Exception], hold: asyncio.Event | None = None) -> None:
        self.script = script
        self.hold = hold
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.hold is not None:
            self.hold.set()

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        for item in self.script:
            if self.hold is not None and item is END:
                await self.hold.wait()
                if self.cancelled:
                    raise CallCancelled("cancelled")
            if isinstance(item, Exception):
                raise item
            yield item
            await asyncio.sleep(0)


class Transport:
    def __init__(self, *calls: Scripted) -> None:
        self.calls = list(calls)
        self.opened: list[tuple[str, dict[str, Any]]] = []

    def open(self, group_id: str, payload: dict[str, Any]) -> Scripted:
        self.opened.append((group_id, payload))
        return self.calls[len(self.opened) - 1]

    async def load(self, group_id: str) -> dict[str, Any]:
        return {"group_id": group_id, "errors": {}}

    async def check(self, group_id: str, model_id: str, options: Resolved) -> str | None:
        return None


def job() -> Job:
    return Job(id="j1", kind="generate", request={"prompt": "hi"}, model_id="m", group_id="g")


def token(position: int, completion: int = 0) -> dict[str, Any]:
    return {"type": "token", "position": position, "completion": completion, "token": f"t{position}"}


def run(dispatcher: Dispatcher, emitted: list[dict[str, Any]]) -> dict[str, Any]:
    return asyncio.run(dispatcher.run(job(), emitted.append))


def test_relays_messages_and_returns_the_result() -> None:
    transport = Transport(Scripted([{"type": "accepted", "replica": "r1"}, token(0), token(1), END]))
    emitted: list[dict[str, Any]] = []
    assert run(Dispatcher(transport, backoff=0), emitted) == END["result"]
    assert [m["position"] for m in emitted] == [0, 1]  # `accepted` and `end` stay at the ingress
    group, payload = transport.opened[0]
    assert group == "g" and payload == {
        "kind": "generate",
        "request": {"prompt": "hi"},
        "model_id": "m",
        "job_id": "j1",
        "cache_scope": None,
    }


def test_a_job_whose_replica_died_is_sent_again_and_listeners_hear_each_token_once() -> None:
    transport = Transport(
        Scripted([{"type": "accepted"}, token(0), token(1), ReplicaLost("ActorDiedError")]),
        Scripted([{"type": "accepted"}, token(0), token(1), token(2), END]),
    )
    emitted: list[dict[str, Any]] = []
    assert run(Dispatcher(transport, backoff=0), emitted) == END["result"]
    assert len(transport.opened) == 2
    assert [m["position"] for m in emitted] == [0, 1, 2]


def test_tokens_of_several_completions_are_kept_apart() -> None:
    transport = Transport(
        Scripted([token(5, 0), token(5, 1), token(6, 0), ReplicaLost("gone")]),
        Scripted([token(5, 0), token(5, 1), token(6, 0), token(6, 1), END]),
    )
    emitted: list[dict[str, Any]] = []
    run(Dispatcher(transport, backoff=0), emitted)
    assert [(m["completion"], m["position"]) for m in emitted] == [(0, 5), (1, 5), (0, 6), (1, 6)]


def test_progress_never_goes_backwards_after_a_resend() -> None:
    progress = [{"type": "processing", "done_positions": n} for n in (0, 4, 8)]
    transport = Transport(
        Scripted([progress[0], progress[1], progress[2], ReplicaLost("gone")]),
        Scripted([progress[0], progress[1], progress[2], END]),
    )
    emitted: list[dict[str, Any]] = []
    run(Dispatcher(transport, backoff=0), emitted)
    assert [m["done_positions"] for m in emitted] == [0, 4, 8, 8]


def test_a_job_whose_replicas_keep_dying_fails_after_the_last_resend() -> None:
    transport = Transport(*[Scripted([ReplicaLost("gone")]) for _ in range(MAX_REDISPATCH + 1)])
    with pytest.raises(WorkFailed, match="died"):
        run(Dispatcher(transport, backoff=0), [])
    assert len(transport.opened) == MAX_REDISPATCH + 1


def test_a_failure_on_the_replica_fails_the_job_with_its_reason() -> None:
    failed = {"type": "end", "status": "failed", "result": None, "error": "input over MAX_TOKENS"}
    with pytest.raises(WorkFailed, match="MAX_TOKENS"):
        run(Dispatcher(Transport(Scripted([{"type": "accepted"}, failed])), backoff=0), [])


def test_serves_refusal_is_the_submitters_answer_with_retry_after() -> None:
    busy = ClusterBusy("full", status=429, retry_after=3.0)

    async def go() -> tuple[BaseException | None, BaseException | None]:
        dispatcher = Dispatcher(Transport(Scripted([busy])), backoff=0)
        j = job()
        dispatcher.begin(j)
        running = asyncio.ensure_future(dispatcher.run(j, lambda m: None))
        refusal: BaseException | None = None
        try:
            await dispatcher.accepted(j.id)
        except SchedulerError as exc:
            refusal = exc
        try:
            await running
        except WorkFailed as exc:
            return refusal, exc
        return refusal, None

    refusal, failure = asyncio.run(go())
    assert isinstance(refusal, SchedulerError) and refusal.status == 429 and refusal.retry_after == 3
    assert failure is not None and "refused" in str(failure)


def test_a_refusal_nobody_is_answered_with_waits_and_sends_again() -> None:
    """A job already acknowledged (or adopted) keeps its place when Serve refuses it: it is sent again."""
    transport = Transport(
        Scripted([ClusterBusy("full", status=429, retry_after=0.01)]), Scripted([{"type": "accepted"}, END])
    )
    assert run(Dispatcher(transport, backoff=0), []) == END["result"]
    assert len(transport.opened) == 2


def test_acceptance_times_out_into_queued_when_serve_holds_the_call() -> None:
    async def go() -> None:
        hold = asyncio.Event()
        dispatcher = Dispatcher(Transport(Scripted([END], hold=hold)), accept_wait=0.05, backoff=0)
        j = job()
        dispatcher.begin(j)
        running = asyncio.ensure_future(dispatcher.run(j, lambda m: None))
        await dispatcher.accepted(j.id)  # nothing from the replica yet: acknowledged as queued
        assert not running.done()
        hold.set()
        assert await running == END["result"]

    asyncio.run(go())


def test_cancelling_ends_the_call_and_the_job() -> None:
    async def go() -> Scripted:
        call = Scripted([{"type": "accepted"}, token(0), END], hold=asyncio.Event())
        dispatcher = Dispatcher(Transport(call), backoff=0)
        j = job()
        dispatcher.begin(j)
        running = asyncio.ensure_future(dispatcher.run(j, lambda m: None))
        while call.hold is not None and not dispatcher.live[j.id].stream:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        dispatcher.cancel(j.id)
        with pytest.raises(WorkFailed, match="cancelled"):
            await running
        assert j.id not in dispatcher.live
        return call

    assert asyncio.run(go()).cancelled


def test_an_ingress_that_stops_ends_the_replicas_call() -> None:
    async def go() -> Scripted:
        call = Scripted([{"type": "accepted"}, END], hold=asyncio.Event())
        dispatcher = Dispatcher(Transport(call), backoff=0)
        running = asyncio.ensure_future(dispatcher.run(job(), lambda m: None))
        await asyncio.sleep(0.05)
        running.cancel()  # the scheduler's tasks are cancelled when the ingress stops
        with pytest.raises(asyncio.CancelledError):
            await running
        return call

    assert asyncio.run(go()).cancelled


class Loader(Transport):
    def __init__(self, answer: dict[str, Any] | Exception) -> None:
        super().__init__()
        self.answer = answer

    async def load(self, group_id: str) -> dict[str, Any]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def serve_worker(answer: dict[str, Any] | Exception) -> ServeWorker:
    registry = parse_registry(
        {
            "model_groups": [
                {
                    "group_id": "g",
                    "models": [
                        {"id": m, "checkpoint": "init:bundled:smollm2-135m-instruct@4"} for m in ("m1", "m2")
                    ],
                }
            ]
        }
    )
    return ServeWorker("serve:0", registry, Dispatcher(Loader(answer), backoff=0))


def test_a_virtual_device_holds_what_the_replica_loaded_and_its_facts() -> None:
    worker = serve_worker({"errors": {"m2": "bad checkpoint"}, "facts": {"m1": {"d_model": 64}}})
    loaded = asyncio.run(worker.load("g"))
    assert loaded.models == ("m1",) and loaded.missing("m2") == "bad checkpoint"
    assert worker.model_facts("m1") == {"d_model": 64} and worker.model_facts("m2") is None
    assert worker.describe() == {"device": "serve:0", "group_id": "g", "models": ["m1", "m2"]}


def test_a_replica_that_cannot_be_asked_is_no_load_failure_but_a_group_that_did_not_load_is() -> None:
    busy = serve_worker(ClusterBusy("full", status=429, retry_after=1))
    assert asyncio.run(busy.load("g")).models == ("m1", "m2")  # its first job loads it
    with pytest.raises(LoadFailed, match="out of memory"):
        asyncio.run(serve_worker({"errors": {"*": "out of memory"}}).load("g"))


class Checker(Transport):
    def __init__(self, answer: str | Exception | None) -> None:
        super().__init__()
        self.answer = answer
        self.checked: list[tuple[str, str, Resolved]] = []

    async def check(self, group_id: str, model_id: str, options: Resolved) -> str | None:
        self.checked.append((group_id, model_id, options))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def checking_worker(answer: str | Exception | None) -> tuple[ServeWorker, Checker]:
    worker = serve_worker({})
    transport = Checker(answer)
    worker.dispatcher.transport = transport
    return worker, transport


def test_options_the_replica_refuses_are_refused_at_the_ingress() -> None:
    refusing, transport = checking_worker("tuned_lens needs a tuned lens directory")
    options = resolve({"tuned_lens": True})
    with pytest.raises(AnalysisError, match="tuned lens"):
        asyncio.run(refusing.check("m2", options))
    assert transport.checked == [("g", "m2", options)]  # asked of a replica holding the model's group
    asyncio.run(checking_worker(None)[0].check("m2", options))  # accepted


def test_a_replica_that_cannot_check_now_leaves_the_check_to_the_jobs_preparation() -> None:
    busy, _transport = checking_worker(ClusterBusy("full", status=429, retry_after=1))
    asyncio.run(busy.check("m1", resolve({})))  # no refusal: the replica checks when it prepares the job


class Cache:
    """The ingress's result cache, as the dispatcher uses it."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, CachePlan, list[Any], dict[str, Any]]] = []

    def scope(self, owner: str | None) -> str:
        return f"scope:{owner}"

    def record(self, job_id: str, plan: CachePlan, rows: list[Any], metadata: dict[str, Any]) -> None:
        self.recorded.append((job_id, plan, rows, metadata))


def test_a_completed_analysis_rows_are_cached_under_the_ingress_job_id() -> None:
    plan = CachePlan("input", {0: "k0", 1: "k1"}, {})
    rows = [{"position": 0}, {"position": 1}]
    end = {**END, "result": {"tokens": rows, "metadata": {"replica": "r1"}}, "cache_plan": plan}
    transport = Transport(Scripted([{"type": "accepted", "replica": "r1"}, end]))
    cache = Cache()
    analysis = Job(
        id="ingress-7", kind="analyze", request={"text": "x"}, model_id="m", group_id="g", owner="c1"
    )
    dispatcher = Dispatcher(transport, backoff=0, cache=cache)  # type: ignore[arg-type]
    assert asyncio.run(dispatcher.run(analysis, lambda m: None))["tokens"] == rows
    assert transport.opened[0][1]["cache_scope"] == "scope:c1"  # the replica keys rows by the client's scope
    assert cache.recorded == [("ingress-7", plan, rows, {"replica": "r1"})]
