"""A scheduler in process with a fake engine that records every batch, shared by the scheduling tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from talkative.nla.analysis import AnalysisError
from talkative.nla.lm import LMPool
from talkative.serve.catalog.registry import parse_registry
from talkative.serve.catalog.residency import GroupRuntime
from talkative.serve.jobs import analysis as analysis_jobs
from talkative.serve.jobs.record import Job
from talkative.serve.jobs.store import JobStore
from talkative.serve.scheduling.scheduler import Scheduler
from talkative.serve.settings import Settings

BUDGET = 8  # rows per engine batch (auto_batch_size_max of every fake model)


@dataclass
class FakePrep:
    text: str
    positions: list[int]
    seed: int


class Engine:
    """Stands in for prepare/run_batch: positions are words, rows say which seed explained which position."""

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
        return FakePrep(text, list(range(len(text.split()))), options.seed)

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

    def jobs_in(self, batch: list[tuple[str, list[int]]]) -> set[str]:
        return {text for text, _ in batch}


class FakeResidency:
    def __init__(self, registry: Any, broken: frozenset[str] = frozenset()) -> None:
        self.registry = registry
        self.broken = broken
        self.log: list[tuple[str, str]] = []

    def acquire(self, gid: str, device: str) -> GroupRuntime:
        self.log.append(("acquire", gid))
        time.sleep(0.02)
        if gid in self.broken:
            raise RuntimeError("broken checkpoint")
        nlas: dict[str, Any] = {m.id: m.id for m in self.registry.group(gid).models}
        return GroupRuntime(group_id=gid, device=device, pool=LMPool(), nlas=nlas)

    def release(self, rt: GroupRuntime) -> None:
        self.log.append(("release", rt.group_id))

    def preload(self, gid: str) -> bool:
        return False

    def cached_groups(self) -> list[str]:
        return []

    def cached_models(self) -> list[str]:
        return []


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.broadcasts: list[dict[str, Any]] = []

    def subscribe(self, job: Job, subscriber: Any) -> None:
        pass

    def job_event(self, job: Job, message: dict[str, Any]) -> None:
        self.events.append((job.id, message))

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
    monkeypatch: pytest.MonkeyPatch,
    body: Run,
    *,
    broken: frozenset[str] = frozenset(),
    before: Callable[[JobStore], Awaitable[None]] | None = None,
    **settings: Any,
) -> None:
    engine = Engine()
    monkeypatch.setattr(analysis_jobs, "prepare", engine.prepare)
    monkeypatch.setattr(analysis_jobs, "run_batch", engine.run_batch)
    monkeypatch.setattr(analysis_jobs, "check_options", lambda nla, opts, tuned=None: None)
    monkeypatch.setattr(
        analysis_jobs, "max_positions", lambda nla, opts, rows, row_tokens: rows // opts.best_of_k
    )
    monkeypatch.setattr(analysis_jobs, "metadata", lambda nla, prep, *a: {"n_positions": len(prep.positions)})
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
        if before is not None:
            await before(store)
        sched = Scheduler(cfg, registry, residency, store)  # type: ignore[arg-type]
        sink = Sink()
        sched.sink = sink
        await sched.start()
        for _ in range(200):
            if sched.ready:
                break
            await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(body(sched, engine, sink, residency), 60)
        finally:
            await sched.stop()
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
