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
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ..catalog import visibility
from ..catalog.registry import Registry
from ..observability.metrics import HIDDEN_LABEL, device_families, engine_families
from .runner import ReplicaRunner


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
        yield from engine_families(stats)
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
        yield from device_families(sched.devices, self._group)


def worker_registry(runner: ReplicaRunner, registry: Registry) -> CollectorRegistry:
    """A registry of the replica's own, holding its collector."""
    out = CollectorRegistry(auto_describe=False)
    out.register(WorkerCollector(runner, registry))
    return out
