"""`/metrics` for the whole cluster: every replica posts its samples to one named Ray actor, and any ingress
replica renders them all, each series labelled with the `replica` it came from.

A replica (ingress or worker) runs `ClusterMetrics.publish_every` with its own registry: every few seconds its
metric families, as plain data, replace the ones it posted before. Scraping any ingress replica answers its own
families as they are now and every other replica's latest post. A replica that stopped posting (it died, or it
was scaled down) is left out after `STALE_AFTER` posting intervals, so its gauges do not linger; its counters
restart from zero if it comes back, which Prometheus reads as a counter reset.

Labels are made where the samples are: hidden and backend-only model and group ids are already the `hidden`
series there (`observability.metrics`), so the board never sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from ray.exceptions import RayError

from .shared_actor import NAMESPACE, shared_actor

log = logging.getLogger("talkative.serve.cluster.metrics_board")

ACTOR_NAME = "metrics-board"
PUBLISH_SECONDS = 5.0
STALE_AFTER = 3  # posting intervals
REPLICA_LABEL = "replica"

#: one sample: its name, labels and value
Sample = tuple[str, dict[str, str], float]
#: one metric family as plain data: name, type, documentation, samples
Family = tuple[str, str, str, list[Sample]]


def replica_label(role: str) -> str:
    """`<role>:<node>:<pid>`: which process a series came from, readable by an operator (an ingress replica and
    a worker replica on one node differ by role and pid)."""
    return f"{role}:{socket.gethostname()}:{os.getpid()}"


def snapshot(registry: CollectorRegistry) -> list[Family]:
    """The registry's families now, as plain data that crosses processes."""
    return [
        (m.name, m.type, m.documentation, [(s.name, dict(s.labels), float(s.value)) for s in m.samples])
        for m in registry.collect()
    ]


class _Merged(Collector):
    """Every replica's families, one family per name, each sample labelled with its replica."""

    def __init__(self, by_replica: Mapping[str, list[Family]]) -> None:
        self.by_replica = by_replica

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for replica in sorted(self.by_replica):
            for name, typ, doc, samples in self.by_replica[replica]:
                family = merged.get(name)
                if family is None:
                    family = merged[name] = Metric(name, doc, typ)
                for sample_name, labels, value in samples:
                    family.add_sample(sample_name, {**labels, REPLICA_LABEL: replica}, value)
        yield from merged.values()


def render(by_replica: Mapping[str, list[Family]]) -> bytes:
    """Prometheus text of every replica's families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(by_replica))
    return generate_latest(registry)


class MetricsBoard:
    """The actor: each replica's latest families and when they came."""

    def __init__(self) -> None:
        self.posts: dict[str, tuple[float, list[Family]]] = {}

    def post(self, replica: str, families: list[Family]) -> None:
        self.posts[replica] = (time.time(), families)

    def read(self, max_age: float) -> dict[str, list[Family]]:
        cutoff = time.time() - max_age
        for replica in [r for r, (at, _) in self.posts.items() if at < cutoff]:
            del self.posts[replica]
        return {replica: families for replica, (_, families) in self.posts.items()}


class ClusterMetrics:
    """One replica's side of the board: posting its registry, and rendering everyone's for `/metrics`."""

    def __init__(
        self,
        replica: str,
        *,
        interval: float = PUBLISH_SECONDS,
        name: str = ACTOR_NAME,
        namespace: str = NAMESPACE,
    ) -> None:
        self.replica = replica
        self.interval = interval
        self.name = name
        self.namespace = namespace
        self._board: Any = None
        self._task: asyncio.Task[None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # built with the app, possibly on the driver: each replica finds the board and starts posting itself
        return {**self.__dict__, "_board": None, "_task": None}

    def _resolve(self) -> Any:
        return shared_actor(MetricsBoard, self.name, self.namespace)

    async def board(self) -> Any:
        if self._board is None:
            self._board = await asyncio.to_thread(self._resolve)  # a blocking lookup: off the event loop
        return self._board

    async def post(self, registry: CollectorRegistry) -> None:
        board = await self.board()
        await board.post.remote(self.replica, snapshot(registry))

    async def exposition(self, registry: CollectorRegistry) -> bytes:
        """This replica's families now and every other live replica's latest post. When the board cannot be
        reached, this replica's own (a scrape still answers what it can)."""
        return render(await self._everyone(registry))

    async def _everyone(self, registry: CollectorRegistry) -> dict[str, list[Family]]:
        others: dict[str, list[Family]] = {}
        try:
            board = await self.board()
            others = await board.read.remote(self.interval * STALE_AFTER)
        except RayError as exc:
            self._board = None
            log.warning("the metrics board is unreachable (%s); answering this replica's metrics only", exc)
        return {**others, self.replica: snapshot(registry)}

    async def samples(self, registry: CollectorRegistry) -> list[Sample]:
        """Every sample of this replica now and of every other live replica's latest post (for the JSON figures);
        this replica's only when the board cannot be reached."""
        return [
            sample
            for families in (await self._everyone(registry)).values()
            for *_, samples in families
            for sample in samples
        ]

    # -- posting in the background --------------------------------------------------------------------------------
    def start(self, registry: CollectorRegistry) -> None:
        self._task = asyncio.get_running_loop().create_task(self._publish(registry))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _publish(self, registry: CollectorRegistry) -> None:
        while True:
            try:
                await self.post(registry)
            except RayError as exc:
                self._board = None
                log.warning("posting metrics to the board failed (%s); retrying", exc)
            await asyncio.sleep(self.interval)
