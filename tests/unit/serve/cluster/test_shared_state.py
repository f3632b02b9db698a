"""What the ingress replicas of a cluster share through named Ray actors: the rate limit's counts and the metrics
board. Each "replica" here is a Ray actor of its own (its own process), as Serve's replicas are."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families
from ray_cluster import start_local_ray

ray = pytest.importorskip("ray")

from talkative.serve.auth.ratelimit import RateLimiter  # noqa: E402
from talkative.serve.cluster.metrics_board import ClusterMetrics  # noqa: E402
from talkative.serve.cluster.shared_limits import SharedRateStorage  # noqa: E402

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local Ray cluster of this module's own (free ports: the control store picks one), shut down after."""
    start_local_ray(2)
    try:
        yield
    finally:
        ray.shutdown()


@ray.remote(num_cpus=0)
class Replica:
    """One ingress replica's share of the state: its own limiter and registry, the cluster's actors."""

    def __init__(self, name: str, limits_actor: str, board_actor: str, per_minute: int) -> None:
        self.limiter = RateLimiter(per_minute, SharedRateStorage(name=limits_actor))
        self.registry = CollectorRegistry()
        self.jobs = Counter("talkative_jobs_submitted", "Jobs accepted", registry=self.registry)
        self.board = ClusterMetrics(name, interval=0.5, name=board_actor)

    async def hit(self, bucket: str) -> int | None:
        return await self.limiter.hit(bucket)

    async def refund(self, bucket: str) -> None:
        await self.limiter.refund(bucket)

    async def submit(self, n: int) -> None:
        self.jobs.inc(n)
        await self.board.post(self.registry)


def _names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"limits-{tag}", f"board-{tag}"


def test_the_rate_limit_is_reached_by_the_sum_of_both_replicas(cluster: None) -> None:
    limits, board = _names()
    a, b = (Replica.remote(n, limits, board, 5) for n in ("a", "b"))
    assert ray.get([a.hit.remote("client") for _ in range(3)]) == [None] * 3
    assert ray.get([b.hit.remote("client") for _ in range(2)]) == [None] * 2
    refused_a, refused_b = ray.get([a.hit.remote("client"), b.hit.remote("client")])
    assert refused_a is not None and 1 <= refused_a <= 60
    assert refused_b is not None and 1 <= refused_b <= 60
    assert ray.get(b.hit.remote("another client")) is None  # buckets are separate
    ray.get(b.refund.remote("client"))  # given back on one replica, usable on the other
    assert ray.get(a.hit.remote("client")) is None
    assert ray.get(a.hit.remote("client")) is not None


def test_a_limiter_in_process_counts_alone() -> None:
    async def go() -> None:
        one, two = RateLimiter(2), RateLimiter(2)
        assert [await one.hit("c"), await one.hit("c")] == [None, None]
        assert await one.hit("c") is not None
        assert await two.hit("c") is None  # the local backend: each process its own window

    asyncio.run(go())


def _samples(text: bytes, name: str) -> dict[str, float]:
    return {
        s.labels["replica"]: s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if s.name == name
    }


def test_metrics_of_every_replica_are_rendered_labelled_by_replica(cluster: None) -> None:
    limits, board = _names()
    a, b = (Replica.remote(n, limits, board, 0) for n in ("ingress-a", "worker-b"))
    ray.get([a.submit.remote(3), b.submit.remote(4)])
    here = CollectorRegistry()
    Counter("talkative_jobs_submitted", "Jobs accepted", registry=here).inc(1)
    Gauge("talkative_ready", "1 once ready", registry=here).set(1)
    scraper = ClusterMetrics("ingress-c", interval=0.5, name=board)
    text = asyncio.run(scraper.exposition(here))
    assert _samples(text, "talkative_jobs_submitted_total") == {"ingress-a": 3, "worker-b": 4, "ingress-c": 1}
    assert _samples(text, "talkative_ready") == {"ingress-c": 1}
    everyone = asyncio.run(scraper.samples(here))  # what the JSON figures are summed from
    assert sorted(v for n, _, v in everyone if n == "talkative_jobs_submitted_total") == [1, 3, 4]
    # a replica that stops posting is left out after a few intervals; one that posts stays
    time.sleep(1.0)
    ray.get(b.submit.remote(1))
    time.sleep(0.7)
    text = asyncio.run(scraper.exposition(here))
    assert _samples(text, "talkative_jobs_submitted_total") == {"worker-b": 5, "ingress-c": 1}
