"""Today's engine inside one worker replica: a scheduler over the replica's one device, fed whole jobs.

A worker replica receives whole jobs (an analysis, a generation, a vector request) from the ingress and must still
do what one server process does with them: prepare each analysis on its device, then cut it into chunks that
share engine batches with the other analyses the replica holds (interleaving and merging), switch groups when a
job names another group, keep groups in its CPU cache. All of that is the scheduler's and the `LocalWorker`'s
work already, so the replica runs them unchanged: `ReplicaRunner` builds a `Scheduler` over one `LocalWorker`
(the replica's device) with the analysis, generation and vector kinds (its residency and engine can be given, as
tests give a fake), and turns one submitted job into a stream of messages: its progress (and a generation's
tokens) while it runs, then its end.

What stays at the ingress: the job's record in the shared store, admission, per-client caps, listeners and the
result cache. The replica's own store is scratch (a file in a temporary directory, gone with the replica), its
jobs are nobody's (no cap; their owner is only the client's cache scope at the ingress, which row keys are scoped
by), and it starts no group until a job or the ingress asks for one. A completed analysis's end message carries
its cache plan (`PlanRecorder`), so the ingress records its rows under its own job id.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...nla import analysis as nla_analysis
from ...nla.analysis import AnalysisError
from ...nla.options import Resolved
from ..catalog.registry import Registry
from ..catalog.residency import Residency
from ..jobs.analysis import AnalysisKind
from ..jobs.cache import CacheMonitor, CachePlan
from ..jobs.choices import ModelChoices
from ..jobs.generation import GenerateKind
from ..jobs.kinds import JobKind
from ..jobs.record import Job
from ..jobs.store import JobStore
from ..jobs.vectors import VectorKind
from ..scheduling.policy import DEFAULT_POLICY
from ..scheduling.queue import JobQueue
from ..scheduling.scheduler import Scheduler
from ..scheduling.types import SchedulerError
from ..scheduling.workers import AnalysisEngine, LocalWorker
from ..settings import Settings

log = logging.getLogger("talkative.serve.cluster.runner")

#: message types a replica keeps to itself: the ingress tells its listeners of queueing and of the end itself
LOCAL_ONLY = frozenset({"queued", "group_switch_queued"})


@dataclass(frozen=True)
class JobEnd:
    """How a job ended on the replica: the last item of its stream."""

    status: str
    result: dict[str, Any] | None
    error: str | None

    def message(self) -> dict[str, Any]:
        return {"type": "end", "status": self.status, "result": self.result, "error": self.error}


class StreamSink:
    """The replica scheduler's event sink: each job's messages go to the queue of the call that submitted it."""

    def __init__(self) -> None:
        self.streams: dict[str, asyncio.Queue[dict[str, Any] | JobEnd]] = {}

    def subscribe(self, job: Job, subscriber: Any) -> None:
        self.streams[job.id] = subscriber

    def job_event(self, job: Job, message: dict[str, Any]) -> None:
        stream = self.streams.get(job.id)
        if stream is None:
            return
        if job.terminal:  # its final message: stored and announced, so the end is known
            self.streams.pop(job.id, None)
            stream.put_nowait(JobEnd(job.status, job.result, job.error))
        elif message.get("type") not in LOCAL_ONLY:
            stream.put_nowait(message)

    def relay(self, job: Job, message: dict[str, Any]) -> None:
        """A replica shares no store with another, so it follows no job run elsewhere; relayed alike."""
        self.job_event(job, message)

    def queue_changed(self) -> None:
        """Queue positions inside a replica mean nothing to a client."""

    def broadcast(self, message: dict[str, Any]) -> None:
        """A replica's group switches are logged by its scheduler; the ingress broadcasts its own."""


class Counters:
    """The replica scheduler's monitor: seconds per stage and refusals, read back by `describe`."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.refusals: dict[str, int] = {}

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    def reject(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1


class PlanRecorder:
    """The replica's result cache: it looks nothing up (the cache's tables are in the shared database, which a
    replica never opens) and keeps each completed analysis's `CachePlan` (its row keys, scoped by the job's
    owner, the client's scope at the ingress) until the job's end message carries it to the ingress."""

    def __init__(self) -> None:
        self.plans: dict[str, CachePlan] = {}
        self.monitor: CacheMonitor = self

    def scope(self, owner: str | None) -> str:
        return owner or ""

    async def rows(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        return {}

    def cache_lookup(self, cached: int, total: int) -> None:
        """Nothing is looked up here."""

    def record(
        self, job_id: str, plan: CachePlan, rows: list[dict[str, Any]], metadata: dict[str, Any]
    ) -> None:
        self.plans[job_id] = plan


def replica_settings(settings: Settings, scratch: Path, max_jobs: int = 0) -> Settings:
    """The server's settings as one replica runs them: its store in scratch (never the shared database), no
    result cache, no group loaded at start, and room for every job Serve lets it hold (`max_jobs`, the pool's
    max_ongoing_requests: Serve bounds what a replica holds, so the replica never refuses a job it was sent)."""
    return settings.model_copy(
        update={
            "data_dir": scratch,
            "database_url": "",
            "result_cache": False,
            "lazy_load_model": True,
            "max_queue_size": max(settings.max_queue_size, settings.max_active_jobs, max_jobs),
        }
    )


class ReplicaRunner:
    """A scheduler over this replica's device, running the jobs the ingress dispatches (see the module)."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        device: str,
        *,
        max_jobs: int = 0,
        residency: Residency | None = None,
        engine: AnalysisEngine = nla_analysis,
    ) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="talkative-replica-"))
        self.settings = replica_settings(settings, self.scratch, max_jobs)
        self.registry = registry
        self.residency = residency if residency is not None else Residency(registry, self.settings)
        self.sink = StreamSink()
        self.counters = Counters()
        #: why a group last failed to load here (cleared when it loads), for the ingress that asks
        self.load_errors: dict[str, str] = {}
        self.plans = PlanRecorder()
        policy = DEFAULT_POLICY()
        kinds: list[JobKind] = [
            AnalysisKind(self.settings, registry, policy, self.plans),
            GenerateKind(self.settings),
            VectorKind(self.settings, registry),
        ]
        self.worker = LocalWorker(
            device,
            slots=self.settings.num_workers_per_gpu,
            residency=self.residency,
            max_tokens=self.settings.max_tokens,
            row_token_budget=self.settings.row_token_budget,
            engine=engine,
        )
        self.store = JobStore(self.settings.store_path())
        self.choices = ModelChoices(
            self.store.database
        )  # scratch too: the ingress keeps the clients' choices
        self.scheduler = Scheduler(
            self.settings,
            registry,
            self.store,
            workers=[self.worker],
            kinds=kinds,
            queue=JobQueue(),
            sink=self.sink,
            monitor=self.counters,
            policy=policy,
            client_cap=lambda _owner: None,
            choices=self.choices,
        )

    async def start(self) -> None:
        await self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()
        self.choices.close()
        self.store.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    # -- groups ---------------------------------------------------------------------------------------------------
    def holds(self) -> list[str]:
        """The groups this replica holds: the one on its device, then those parked in its CPU cache."""
        on_device = [d.group_id for d in self.scheduler.devices if d.group_id is not None]
        return on_device + [g for g in self.residency.cached_groups() if g not in on_device]

    async def ensure(self, group_id: str) -> None:
        """Make a group ready here ahead of its jobs: parked in the CPU cache when the device holds another (a
        later switch is then a move, not a load); with no CPU cache, the first job loads it."""
        self.registry.group(group_id)
        if group_id in self.holds() or any(d.loading == group_id for d in self.scheduler.devices):
            return
        if all(d.group_id is None and d.loading is None for d in self.scheduler.devices):
            await self.load(group_id)  # an idle, empty device: load it there at once
            return
        if self.residency.capacity <= 0:
            return
        try:
            await self.scheduler.preload(group_id)
        except SchedulerError as exc:  # no room: the first job loads it onto the device instead
            log.info("group %s not parked ahead of its jobs: %s", group_id, exc)

    async def load(self, group_id: str) -> dict[str, Any]:
        """Bring a group onto the device (a `switch` of this replica's own), waiting for it; what loaded."""
        model_id = self.registry.group(group_id).models[0].id
        job = await self.scheduler.submit("switch", {"scope": "server"}, model_id=model_id)
        done = await self.scheduler.wait(job.id)
        for dev in self.scheduler.devices:
            if dev.loaded is not None and dev.loaded.group_id == group_id:
                self.load_errors.pop(group_id, None)
                return {
                    "group_id": group_id,
                    "models": list(dev.loaded.models),
                    "errors": dict(dev.loaded.errors),
                }
        self.load_errors[group_id] = done.error or f"group {group_id} did not load"
        return {"group_id": group_id, "models": [], "errors": {"*": self.load_errors[group_id]}}

    async def check(self, model_id: str, options: Resolved) -> str | None:
        """Why the model refuses these options (`AnalysisError`'s reason), or None. Only a model on this
        replica's device is checked here (the check needs it loaded); another is checked when its job is
        prepared."""
        for dev in self.scheduler.devices:
            if dev.loaded is not None and model_id in dev.loaded.models:
                try:
                    await self.worker.check(model_id, options)
                except AnalysisError as exc:
                    return str(exc)
        return None

    def evict(self, group_id: str) -> None:
        """Serve's multiplexing dropped the group from this replica (least recently used): it leaves the CPU
        cache (blocking: Serve calls it on a thread); a group on the device stays until a job of another group
        replaces it."""
        if self.residency.evict(group_id):
            log.info("group %s left the CPU cache (Serve's multiplexing evicted it)", group_id)

    # -- jobs -----------------------------------------------------------------------------------------------------
    async def run(
        self, kind: str, request: dict[str, Any], model_id: str, cache_scope: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """One job: `accepted` at once, then its messages as they come, then `end` (status, result, error; a
        completed analysis's `cache_plan`, its row keys scoped by `cache_scope`). When the consumer stops
        listening (the ingress cancelled the call), the job is cancelled here too."""
        stream: asyncio.Queue[dict[str, Any] | JobEnd] = asyncio.Queue()
        job = await self.scheduler.submit(
            kind, request, model_id=model_id, owner=cache_scope, subscriber=stream
        )
        try:
            yield {"type": "accepted", "job": job.id}
            while True:
                item = await stream.get()
                if isinstance(item, JobEnd):
                    end = item.message()
                    plan = self.plans.plans.pop(job.id, None)
                    if plan is not None:
                        end["cache_plan"] = plan
                    yield end
                    return
                yield item
        finally:
            self.plans.plans.pop(job.id, None)
            if not job.terminal:
                log.info("the ingress stopped listening to job %s: cancelling it", job.id)
                await self.scheduler.cancel(job.id, reason="cancelled by the ingress")

    def describe(self) -> dict[str, Any]:
        """The replica's own figures: groups held, its scheduler's counters, its jobs."""
        return {
            "groups": self.holds(),
            "stats": dict(self.scheduler.stats),
            "jobs": len(self.scheduler.jobs),
            "refusals": dict(self.counters.refusals),
        }
