"""Batches with BACKEND=ray and two ingress runners on one PostgreSQL store: a batch is fed by the replica that
accepted it, while another replica streams its results as they come (`?follow=true`) and cancels it; a batch whose
ingress replica is killed is adopted and finished with every item once.

One Ray cluster and one PostgreSQL database for the module: one ingress replica behind Serve's proxy, one worker
replica of a tiny model, and one more ingress in this process (`LocalIngress`), so that a test knows which replica
feeds a batch and which one it asks. Leases last 3 s, so a dead replica's batch is adopted within seconds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cluster_ingress_support import LocalIngress, cluster_settings, deployed, fresh_database, local_ingress
from e2e_helpers import FAST
from ray_cluster import RayCluster

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow, pytest.mark.e2e]

LEASE_SECONDS = 3.0
BATCHES = "/api/v1/batches"


@pytest.fixture(scope="module")
def database(pg_server: object) -> Iterator[str]:
    yield from fresh_database(pg_server)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path], database: str) -> object:
    return cluster_settings(
        tmp_path_factory.mktemp("cluster-batches"), tiny_dirs["a"], database, LEASE_SECONDS
    )


@pytest.fixture(scope="module")
def cluster(settings: object) -> Iterator[RayCluster]:
    with deployed(settings, ingress_replicas=1) as ray_cluster:
        yield ray_cluster


@pytest.fixture(scope="module")
def local(cluster: RayCluster, settings: object) -> Iterator[LocalIngress]:
    with local_ingress(settings) as ingress:
        yield ingress


def submit(base: str, n: int, words: int = 8) -> str:
    items = [{"id": f"item-{i}", "text": " ".join(f"w{i}x{j}" for j in range(words))} for i in range(n)]
    r = httpx.post(
        base + BATCHES, json={"items": items, "model_id": "tiny-a-l1", "options": FAST}, timeout=60
    )
    assert r.status_code == 202, r.text
    return str(r.json()["batch_id"])


def progress(base: str, batch_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}{BATCHES}/{batch_id}", timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def settled(base: str, batch_id: str, timeout: float = 240) -> dict[str, Any]:
    """The batch's progress once it has ended and no item runs any more."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with_retries = _answered(lambda: progress(base, batch_id))
        if with_retries["status"] in ("completed", "cancelled") and not with_retries["items"]["running"]:
            return with_retries
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} did not end: {progress(base, batch_id)}")


def _answered(call: Any, attempts: int = 30) -> Any:
    """A call through the proxy, again while Serve replaces a killed replica."""
    for _ in range(attempts - 1):
        try:
            return call()
        except (httpx.HTTPError, AssertionError):
            time.sleep(1)
    return call()


def results(base: str, batch_id: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{base}{BATCHES}/{batch_id}/results", timeout=60)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def feeder(database_url: str, batch_id: str) -> int:
    """The pid of the runner (`<node>:<pid>:<uuid>`) holding a batch's lease, read from the shared store."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT runner FROM batches WHERE id = %s", (batch_id,)).fetchone()
    assert row is not None and row[0] is not None
    return int(row[0].split(":")[1])


def test_a_batch_is_fed_by_one_replica_followed_and_cancelled_on_another(
    cluster: RayCluster, local: LocalIngress, database: str
) -> None:
    batch_id = submit(local.url, 6)
    assert feeder(database, batch_id) == os.getpid()  # the replica that accepted it feeds it
    lines: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{cluster.url}{BATCHES}/{batch_id}/results?follow=true", timeout=240) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                lines.append(json.loads(line))
    assert sorted(x["id"] for x in lines) == [f"item-{i}" for i in range(6)]  # every line, once
    assert all(x["status"] == "completed" and x["tokens"] for x in lines)
    assert progress(cluster.url, batch_id)["items"]["completed"] == 6
    assert feeder(database, batch_id) == os.getpid()  # nobody else fed any of it

    longer = submit(local.url, 30, words=60)
    r = httpx.post(f"{cluster.url}{BATCHES}/{longer}/cancel", timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    ended = settled(cluster.url, longer)
    assert ended["items"]["cancelled"] > 0 and ended["items"]["pending"] == 0
    ids = [x["id"] for x in results(local.url, longer)]
    assert len(ids) == len(set(ids)) == ended["items"]["completed"] + ended["items"]["failed"]


def test_a_killed_replicas_batch_is_adopted_and_finished_with_every_item_once(
    cluster: RayCluster, local: LocalIngress, database: str
) -> None:
    batch_id = submit(cluster.url, 12, words=30)
    pid = feeder(database, batch_id)
    assert pid in {r.pid for r in cluster.replicas("ingress")}
    assert progress(local.url, batch_id)["status"] != "completed"  # part-way when killed
    cluster.kill(pid)
    ended = settled(local.url, batch_id)
    assert ended["status"] == "completed" and ended["items"]["completed"] == 12, ended
    assert feeder(database, batch_id) != pid  # another runner adopted and finished it
    lines = results(local.url, batch_id)
    assert sorted(x["id"] for x in lines) == sorted(f"item-{i}" for i in range(12))  # every item once
    cluster.wait_replicas("ingress", 1)  # Serve replaced what was killed
