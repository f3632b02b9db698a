"""A worker replica's metrics, for the cluster's `/metrics`: what its engine did, read from its scheduler.

With BACKEND=ray the engine work happens in the worker replicas, so the engine's counters (batches, merged
batches, rows, engine seconds, positions, group loads) and the device state live there, not at the ingress. Each
worker replica keeps a registry with this collector and posts it to the metrics board (`metrics_board.py`); the
ingress renders it with the others, labelled `replica="worker:<node>:<pid>"`, under the same metric names as one
server's, so a sum over `replica` is the cluster's figure. Group ids every client may not see are the `hidden`
series, as at the ingress.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..catalog import visibility
from ..catalog.registry import Registry
from ..observability.metrics import HIDDEN_LABEL
from .runner import ReplicaRunner

#: the engine counters of a scheduler's stats: metric name, stats key, help
ENGINE_COUNTERS = (
    ("talkative_positions_analysed", "positions", "Token positions explained"),
    ("talkative_model_loads", "group_loads", "Model groups brought onto a device"),
    ("talkative_engine_batches", "engine_batches", "Engine batches run"),
    ("talkative_engine_merged_batches", "merged_batches", "Engine batches shared by several jobs"),
    ("talkative_engine_rows", "engine_rows", "Rows (positions x best_of_k) explained"),
    ("talkative_engine_seconds", "engine_seconds", "Seconds spent in engine batches"),
)


class WorkerCollector(Collector):
    """The replica's scheduler state at scrape (posting) time, read on its event loop."""

    def __init__(self, runner: ReplicaRunner, registry: Registry) -> None:
        self.runner = runner
        self.registry = registry

    def _group(self, group_id: str) -> str:
        return group_id if visibility.sees_group(self.registry, group_id, visibility.ANYONE) else HIDDEN_LABEL

    def collect(self) -> Iterator[Metric]:
        sched = self.runner.scheduler
        stats = sched.stats
        for name, key, doc in ENGINE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))
        finished = CounterMetricFamily(
            "talkative_worker_jobs_finished",
            "Jobs a worker replica ran to their end, by status",
            labels=["status"],
        )
        for status in ("completed", "failed", "cancelled"):
            finished.add_metric([status], stats.get(status, 0))
        yield finished
        stages = CounterMetricFamily(
            "talkative_worker_stage_seconds", "Engine seconds per stage in a worker replica", labels=["stage"]
        )
        for stage, seconds in sorted(self.runner.counters.stages.items()):
            stages.add_metric([stage], seconds)
        yield stages
        busy = GaugeMetricFamily(
            "talkative_workers_busy", "Engine batches running, per device", labels=["device"]
        )
        jobs = GaugeMetricFamily("talkative_device_jobs", "Jobs admitted to a device", labels=["device"])
        loaded = GaugeMetricFamily(
            "talkative_device_group", "1 for the model group a device holds", labels=["device", "group"]
        )
        for dev in sched.devices:
            busy.add_metric([dev.name], dev.inflight)
            jobs.add_metric([dev.name], len(dev.works) + len(dev.whole))
            if dev.group_id is not None:
                loaded.add_metric([dev.name, self._group(dev.group_id)], 1)
        yield from (busy, jobs, loaded)


def worker_registry(runner: ReplicaRunner, registry: Registry) -> CollectorRegistry:
    """A registry of the replica's own, holding its collector."""
    out = CollectorRegistry(auto_describe=False)
    out.register(WorkerCollector(runner, registry))
    return out
