"""What the server tells its operators in numbers: Prometheus metrics and the seed's JSON figures.

* **Metrics** live in a registry of their own per app (never prometheus_client's global default one, so two apps
  in one process, as in tests, never share or clash). Event metrics (HTTP requests, per-stage engine seconds, job
  durations, group switches, rejected requests by reason) are observed as they happen; state (queue depth per
  group, jobs by status, busy workers per device, positions analysed, tokens generated, model loads, WebSocket
  connections) is read from the scheduler when scraped, so it can never drift from the truth.

* **A cluster** (`--backend ray`): each replica keeps its own registry and posts it to a shared board
  (`SharedMetrics`, `cluster/metrics_board.py`); `/metrics` on any ingress replica renders every replica's series,
  labelled `replica`.

Logs are `logs.py`'s; the middleware that times requests and gives them ids is `request_context.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..catalog import visibility
from ..jobs.record import PROCESSING, Job

if TYPE_CHECKING:
    from ..scheduling.scheduler import Scheduler
    from ..scheduling.types import EventSink
    from ..service import Service

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: the label value of every model and group that listings do not show (visible: false, backend_only)
HIDDEN_LABEL = "hidden"


class SharedMetrics(Protocol):
    """Where the replicas of a cluster post their registries, and read everyone's."""

    def start(self, registry: CollectorRegistry) -> None:
        """Post `registry` every few seconds until stopped (call on the event loop)."""

    async def stop(self) -> None: ...

    async def exposition(self, registry: CollectorRegistry) -> bytes:
        """Prometheus text of `registry` now and of every other live replica's latest post."""
        ...

    async def samples(self, registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
        """Every sample (name, labels, value) of `registry` now and of every other live replica's latest post."""
        ...


class Metrics:
    """The per-app registry and the event metrics; `bind(service)` adds the state read at scrape time. `shared`
    (a cluster's board) makes `exposition` the whole cluster's."""

    def __init__(self, shared: SharedMetrics | None = None) -> None:
        self.shared = shared
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "talkative_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.http_seconds = Histogram(
            "talkative_http_request_duration_seconds",
            "Time to answer an HTTP request (route template)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "talkative_rejected_requests",
            "Requests and WebSocket messages refused, by reason",
            ["reason"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "talkative_stage_duration_seconds",
            "Engine seconds per stage: extract (per input), verbalize, reconstruct, salience, kl, lens (per batch)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.job_seconds = Histogram(
            "talkative_job_duration_seconds",
            "Processing time of finished jobs (admission to end)",
            ["kind", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "talkative_job_queue_seconds",
            "Time finished jobs waited in the queue before a device took them",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.switch_seconds = Histogram(
            "talkative_group_switch_duration_seconds",
            "Time to bring a model group onto a device (load, or move from the CPU cache)",
            ["group"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.switches = Counter(
            "talkative_group_switches", "Group switches by outcome", ["group", "outcome"], registry=r
        )
        self.tokens_generated = Counter(
            "talkative_tokens_generated",
            "Tokens of the completions that generation jobs delivered",
            ["model"],
            registry=r,
        )
        self.cache_hits = Counter(
            "talkative_result_cache_hits",
            "Analyses whose every position the result cache answered",
            registry=r,
        )
        self.cache_misses = Counter(
            "talkative_result_cache_misses",
            "Analyses looked up in the result cache with positions left to compute",
            registry=r,
        )
        self.cache_positions_saved = Counter(
            "talkative_result_cache_positions_saved",
            "Positions answered from the result cache instead of being computed",
            registry=r,
        )
        self.completed_count = 0
        self.completed_seconds = 0.0
        self.service: Service | None = None
        r.register(_StateCollector(self))

    def start(self) -> None:
        if self.shared is not None:
            self.shared.start(self.registry)

    async def stop(self) -> None:
        if self.shared is not None:
            await self.shared.stop()

    async def exposition(self) -> bytes:
        """`GET /metrics` as Prometheus text: this server's, or every replica's of its cluster."""
        if self.shared is None:
            return generate_latest(self.registry)
        return await self.shared.exposition(self.registry)

    async def figures(self) -> dict[str, Any]:
        """`GET /metrics` as JSON: this server's `summary`, or its cluster's, summed over every replica."""
        if self.shared is None:
            return self.summary()
        return cluster_summary(await self.shared.samples(self.registry))

    def bind(self, service: Service) -> None:
        self.service = service
        for model_id in service.registry.models:  # every series exists from the first scrape, at 0
            self.tokens_generated.labels(self.model_label(model_id))

    # -- labels: every key may scrape /metrics, so hidden and backend_only ids are one "hidden" series ----------
    def group_label(self, group_id: str | None) -> str:
        svc = self.service
        if svc is None or group_id is None:
            return str(group_id)
        return group_id if visibility.sees_group(svc.registry, group_id, visibility.ANYONE) else HIDDEN_LABEL

    def model_label(self, model_id: str | None) -> str:
        svc = self.service
        if svc is None or model_id is None:
            return str(model_id)
        return model_id if visibility.sees_model(svc.registry, model_id, visibility.ANYONE) else HIDDEN_LABEL

    # -- the scheduler's monitor ----------------------------------------------------------------------------------
    def stage(self, name: str, seconds: float) -> None:
        self.stage_seconds.labels(name).observe(seconds)

    def cache_lookup(self, cached: int, total: int) -> None:
        """An analysis looked up in the result cache: `cached` of its `total` positions were there."""
        (self.cache_hits if cached == total else self.cache_misses).inc()
        self.cache_positions_saved.inc(cached)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    # -- job and switch events (through TelemetrySink) ------------------------------------------------------------
    def job_finished(self, job: Job) -> None:
        counts = (job.result or {}).get("completion_tokens") if job.status == "completed" else None
        if isinstance(counts, list) and all(isinstance(n, int) for n in counts):
            self.tokens_generated.labels(self.model_label(job.model_id)).inc(sum(counts))
        if job.started_at is not None:
            self.queue_seconds.labels(job.kind).observe(max(0.0, job.started_at - job.created_at))
            if job.completed_at is not None:
                seconds = max(0.0, job.completed_at - job.started_at)
                self.job_seconds.labels(job.kind, job.status).observe(seconds)
                if job.status == "completed" and job.kind != "switch":
                    self.completed_count += 1
                    self.completed_seconds += seconds

    def switch_event(self, message: dict[str, Any]) -> None:
        status, group = message.get("status"), self.group_label(message.get("group_id"))
        if status == "completed":
            self.switches.labels(group, "completed").inc()
            if isinstance(message.get("seconds"), int | float):
                self.switch_seconds.labels(group).observe(float(message["seconds"]))
        elif status == "failed":
            self.switches.labels(group, "failed").inc()

    # -- the seed's JSON figures ----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """`GET /metrics` as JSON: the seed's six figures, then rejections by reason."""
        svc = self.service
        stats = svc.scheduler.stats if svc is not None else {}
        rejected = {
            s.labels["reason"]: int(s.value)
            for m in self.rejected.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
        return {
            "total_requests": int(stats.get("submitted", 0)),
            "completed_requests": int(stats.get("completed", 0)),
            "failed_requests": int(stats.get("failed", 0)),
            "queue_size": svc.scheduler.queue_summary()["queue_size"] if svc is not None else 0,
            "average_processing_time": round(self.completed_seconds / self.completed_count, 3)
            if self.completed_count
            else 0.0,
            "active_websocket_connections": len(svc.hub.connections) if svc is not None else 0,
            "cancelled_requests": int(stats.get("cancelled", 0)),
            "rejected_requests": rejected,
        }


def cluster_summary(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, Any]:
    """The seed's JSON figures of a cluster, from every replica's samples: the same figures as `summary` gives for
    one server, each summed over the replicas (the average over every replica's completed jobs)."""

    def total(name: str, **match: str) -> float:
        return sum(
            v for n, labels, v in samples if n == name and all(labels.get(k) == x for k, x in match.items())
        )

    def completed_jobs(suffix: str) -> float:  # the histogram of completed jobs' durations, switches apart
        return sum(
            v
            for n, labels, v in samples
            if n == f"talkative_job_duration_seconds_{suffix}"
            and labels.get("status") == "completed"
            and labels.get("kind") != "switch"
        )

    rejected: dict[str, int] = {}
    for name, labels, value in samples:
        if name == "talkative_rejected_requests_total":
            rejected[labels["reason"]] = rejected.get(labels["reason"], 0) + int(value)
    done = completed_jobs("count")
    return {
        "total_requests": int(total("talkative_jobs_submitted_total")),
        "completed_requests": int(total("talkative_jobs_finished_total", status="completed")),
        "failed_requests": int(total("talkative_jobs_finished_total", status="failed")),
        "queue_size": int(
            total("talkative_jobs", status="queued") + total("talkative_jobs", status="processing")
        ),
        "average_processing_time": round(completed_jobs("sum") / done, 3) if done else 0.0,
        "active_websocket_connections": int(total("talkative_websocket_connections")),
        "cancelled_requests": int(total("talkative_jobs_finished_total", status="cancelled")),
        "rejected_requests": rejected,
    }


#: the engine counters of a scheduler's stats: metric name, stats key, help. A worker replica reports them under
#: the same names as one server, so a sum over the `replica` label is the cluster's figure.
ENGINE_COUNTERS = (
    ("talkative_positions_analysed", "positions", "Token positions explained"),
    ("talkative_model_loads", "group_loads", "Model groups brought onto a device"),
    ("talkative_engine_batches", "engine_batches", "Engine batches run"),
    ("talkative_engine_merged_batches", "merged_batches", "Engine batches shared by several jobs"),
    ("talkative_engine_rows", "engine_rows", "Rows (positions x best_of_k) explained"),
    ("talkative_engine_seconds", "engine_seconds", "Seconds spent in engine batches"),
)


def engine_families(stats: dict[str, Any]) -> Iterator[Metric]:
    """The engine's counters from a scheduler's stats."""
    for name, key, doc in ENGINE_COUNTERS:
        yield CounterMetricFamily(name, doc, value=stats.get(key, 0))


def device_families(devices: Iterable[Any], label: Callable[[str], str]) -> Iterator[Metric]:
    """Each device's state: engine batches running and allowed at once, jobs admitted, the group it holds
    (`label` maps a group id to the series a scraper may see)."""
    busy = GaugeMetricFamily(
        "talkative_workers_busy", "Engine batches running, per device", labels=["device"]
    )
    slots = GaugeMetricFamily("talkative_workers", "Engine batches a device runs at once", labels=["device"])
    jobs = GaugeMetricFamily("talkative_device_jobs", "Jobs admitted to a device", labels=["device"])
    loaded = GaugeMetricFamily(
        "talkative_device_group", "1 for the model group a device holds", labels=["device", "group"]
    )
    for dev in devices:
        busy.add_metric([dev.name], dev.inflight)
        slots.add_metric([dev.name], dev.slots)
        jobs.add_metric([dev.name], len(dev.works) + len(dev.whole))
        if dev.group_id is not None:
            loaded.add_metric([dev.name, label(dev.group_id)], 1)
    yield from (busy, slots, jobs, loaded)


class _StateCollector(Collector):
    """Scheduler state as metrics, read at scrape time on the event loop (the scheduler's only thread)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        svc = self.metrics.service
        if svc is None:
            return
        sched: Scheduler = svc.scheduler
        depth = GaugeMetricFamily(
            "talkative_queue_depth", "Jobs waiting in the queue, by model group", labels=["group"]
        )
        label = self.metrics.group_label
        waiting: dict[str, int] = dict.fromkeys((label(g) for g in svc.registry.groups), 0)
        for job in sched.queue:
            waiting[label(job.group_id)] = waiting.get(label(job.group_id), 0) + 1
        for gid, n in waiting.items():
            depth.add_metric([gid], n)
        yield depth
        active = GaugeMetricFamily("talkative_jobs", "Jobs not yet finished, by status", labels=["status"])
        active.add_metric(["queued"], len(sched.queue))
        active.add_metric(["processing"], sum(1 for j in sched.jobs.values() if j.status == PROCESSING))
        yield active
        stats = sched.stats
        finished = CounterMetricFamily(
            "talkative_jobs_finished", "Jobs finished, by status", labels=["status"]
        )
        for status in ("completed", "failed", "cancelled"):
            finished.add_metric([status], stats.get(status, 0))
        yield finished
        yield CounterMetricFamily(
            "talkative_jobs_submitted", "Jobs accepted", value=stats.get("submitted", 0)
        )
        yield from engine_families(stats)
        yield from device_families(sched.devices, label)
        yield GaugeMetricFamily(
            "talkative_websocket_connections", "Open WebSocket connections", value=len(svc.hub.connections)
        )
        yield GaugeMetricFamily(
            "talkative_ready", "1 once the startup model group is loaded", value=sched.ready
        )
        yield GaugeMetricFamily(
            "talkative_draining",
            "1 while shutting down (no new work)",
            value=sched.draining,
        )


class TelemetrySink:
    """Wraps the scheduler's event sink (the token logs and the WebSocket hub) to observe job endings and group
    switches. `final_message` is the job kinds' (`jobs.kinds.final_message`): a job's end is the one message
    of its terminal type, observed once."""

    def __init__(
        self, inner: EventSink, metrics: Metrics, final_message: Callable[[Job], dict[str, Any]]
    ) -> None:
        self.inner = inner
        self.metrics = metrics
        self.final_message = final_message

    def subscribe(self, job: Job, subscriber: Any) -> None:
        self.inner.subscribe(job, subscriber)

    def job_event(self, job: Job, message: dict[str, Any]) -> None:
        self.inner.job_event(job, message)
        if job.terminal and message.get("type") == self.final_message(job).get("type"):
            self.metrics.job_finished(job)

    def relay(self, job: Job, message: dict[str, Any]) -> None:
        self.inner.relay(job, message)  # another replica's job: its runner observed it

    def queue_changed(self) -> None:
        self.inner.queue_changed()

    def broadcast(self, message: dict[str, Any]) -> None:
        self.inner.broadcast(message)
        if message.get("type") == "group_switch_status":
            self.metrics.switch_event(message)
