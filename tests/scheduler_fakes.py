"""A scheduler in process with a fake engine that records every batch, shared by the scheduling tests.

The scheduler is built as the app builds it, with its one device's `LocalWorker` given the fake engine and a fake
residency through its constructor (nothing is patched), and the sink, monitor, client cap and extra job kinds a
test names."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from talkative.nla.analysis import AnalysisError
from talkative.nla.lm import LMPool
from talkative.serve.catalog.registry import parse_registry
from talkative.serve.catalog.residency import GroupRuntime
from talkative.serve.jobs.analysis import AnalysisKind
from talkative.serve.jobs.choices import ModelChoices
from talkative.serve.jobs.kinds import JobKind
from talkative.serve.jobs.record import Job
from talkative.serve.jobs.store import JobStore
from talkative.serve.scheduling.policy import FifoGroupPhases
from talkative.serve.scheduling.queue import JobQueue
from talkative.serve.scheduling.scheduler import Scheduler
from talkative.serve.scheduling.types import Monitor
from talkative.serve.scheduling.workers import LocalWorker
from talkative.serve.settings import Settings

BUDGET = 8  # rows per engine batch (auto_batch_size_max of every fake model)


@dataclass
class FakePrep:
    text: str
    positions: list[int]
    seed: int
    extract_seconds: float = 0.0
    ids: list[int] = field(default_factory=list)  # one per word: what the result cache keys rows by
    flags: dict[int, list[str]] = field(default_factory=dict)


class Engine:
    """Stands in for the engine functions of `nla.analysis`: positions are words, rows say which seed explained
    which position; options always fit, and a batch takes as many positions as the row budget allows."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, list[int]]]] = []
        self.delay = 0.01

    def prepare(
        self,
        nla: Any,
        text: str | None = None,
        messages: Any = None,
        options: Any = None,
        max_tokens: Any = None,
    ) -> FakePrep:
        assert text is not None
        if text.startswith("bad"):
            raise AnalysisError("bad input")
        words = text.split()
        return FakePrep(
            text, list(range(len(words))), options.seed, ids=[zlib.crc32(w.encode()) for w in words]
        )

    def run_batch(
        self, nla: Any, parts: Any, opts: Any, tuned: Any = None, timings: Any = None, **kw: Any
    ) -> list[list[dict[str, Any]]]:
        self.batches.append([(p.text, list(pos)) for p, pos in parts])
        time.sleep(self.delay)
        if any(p.text.startswith("boom") for p, _ in parts):
            raise RuntimeError("boom")
        return [
            [{"position": q, "token": str(q), "explanation": f"{p.seed}:{q}:{nla}"} for q in pos]
            for p, pos in parts
        ]

    def check_options(self, nla: Any, opts: Any, tuned: Any = None) -> None:
        pass

    def max_positions(self, nla: Any, opts: Any, row_budget: int, row_token_budget: int) -> int:
        return row_budget // opts.best_of_k

    def metadata(self, nla: Any, prep: FakePrep, *rest: Any) -> dict[str, Any]:
        return {"n_positions": len(prep.positions)}

    def jobs_in(self, batch: list[tuple[str, list[int]]]) -> set[str]:
        return {text for text, _ in batch}


class FakeResidency:
    def __init__(self, registry: Any, broken: frozenset[str] = frozenset()) -> None:
        self.registry = registry
        self.broken = broken
        self.log: list[tuple[str, str]] = []
        self.capacity = 0  # no CPU cache

    def acquire(self, gid: str, device: str) -> GroupRuntime:
        self.log.append(("acquire", gid))
        time.sleep(0.02)
        if gid in self.broken:
            raise RuntimeError("broken checkpoint")
        nlas: dict[str, Any] = {m.id: m.id for m in self.registry.group(gid).models}
        return GroupRuntime(group_id=gid, device=device, pool=LMPool(), nlas=nlas)

    def release(self, rt: GroupRuntime) -> None:
        self.log.append(("release", rt.group_id))

    def drop(self, runtimes: list[GroupRuntime]) -> list[str]:
        return [rt.group_id for rt in runtimes]

    def clear_cache(self) -> list[str]:
        return []

    def preload(self, gid: str) -> bool:
        return False

    def cached_groups(self) -> list[str]:
        return []

    def cached_models(self) -> list[str]:
        return []


class Recorder:
    """A monitor that keeps what it hears."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.rejections: list[str] = []

    def stage(self, name: str, seconds: float) -> None:
        self.stages.append(name)

    def reject(self, reason: str) -> None:
        self.rejections.append(reason)


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.relayed: list[tuple[str, dict[str, Any]]] = []  # ends of jobs other runners ran
        self.broadcasts: list[dict[str, Any]] = []

    def subscribe(self, job: Job, subscriber: Any) -> None:
        pass

    def job_event(self, job: Job, message: dict[str, Any]) -> None:
        self.events.append((job.id, message))

    def relay(self, job: Job, message: dict[str, Any]) -> None:
        self.relayed.append((job.id, message))

    def queue_changed(self) -> None:
        pass

    def broadcast(self, message: dict[str, Any]) -> None:
        self.broadcasts.append(message)

    def types(self, job_id: str) -> list[str]:
        return [m["type"] for jid, m in self.events if jid == job_id]


REGISTRY = {
    "model_groups": [
        {
            "group_id": "ga",
            "models": [
                {"id": "a1", "checkpoint": "init:x@1", "auto_batch_size_max": BUDGET},
                {"id": "a2", "checkpoint": "init:x@2", "auto_batch_size_max": BUDGET},
            ],
        },
        {"group_id": "gb", "models": [{"id": "b1", "checkpoint": "init:y@1", "auto_batch_size_max": BUDGET}]},
    ]
}


Run = Callable[[Scheduler, Engine, Sink, FakeResidency], Awaitable[None]]


def run(
    tmp_path: Path,
    body: Run,
    *,
    broken: frozenset[str] = frozenset(),
    before: Callable[[JobStore], Awaitable[None]] | None = None,
    monitor: Monitor | None = None,
    client_cap: Callable[[str | None], int | None] = lambda owner: None,
    kinds: Sequence[JobKind] = (),
    **settings: Any,
) -> None:
    engine = Engine()
    cfg = Settings(
        model_groups_file=tmp_path / "none.json",
        data_dir=tmp_path / "data",
        devices=["cpu"],
        default_group="ga",
        request_timeout=0,
        purge_interval_seconds=3600,
        **settings,
    )
    registry = parse_registry(REGISTRY)
    residency = FakeResidency(registry, broken)

    async def main() -> None:
        store = JobStore(cfg.store_path())
        choices = ModelChoices(store.database)
        if before is not None:
            await before(store)
        sink = Sink()
        policy = FifoGroupPhases()
        worker = LocalWorker(
            "cpu",
            slots=cfg.num_workers_per_gpu,
            residency=residency,  # type: ignore[arg-type]
            max_tokens=cfg.max_tokens,
            row_token_budget=cfg.row_token_budget,
            engine=engine,
        )
        sched = Scheduler(
            cfg,
            registry,
            store,
            workers=[worker],
            kinds=[AnalysisKind(cfg, registry, policy), *kinds],
            queue=JobQueue(),
            sink=sink,
            monitor=monitor if monitor is not None else Recorder(),
            policy=policy,
            client_cap=client_cap,
            choices=choices,
        )
        await sched.start()
        for _ in range(200):
            if sched.ready:
                break
            await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(body(sched, engine, sink, residency), 60)
        finally:
            await sched.stop()
            choices.close()
            store.close()

    asyncio.run(main())


def words(n: int, head: str = "w") -> str:
    return " ".join(f"{head}{i}" for i in range(n))


async def analyze(sched: Scheduler, text: str, model: str = "a1", **options: Any) -> str:
    job = await sched.submit("analyze", {"text": text, "options": options}, model_id=model)
    return job.id


async def until(pred: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, "timed out"
        await asyncio.sleep(0.005)
