"""BACKEND=ray with several ingress replicas on one PostgreSQL store: a job is read, followed over the WebSocket
and cancelled from any replica; a killed ingress replica's jobs complete and a reconnecting client picks them up;
`/metrics` on any replica covers them all; the seed's documented WebSocket client works through Serve's proxy.

One Ray cluster and one PostgreSQL database for the module: two ingress replicas behind Serve's proxy, one worker
replica of a tiny model, and one more ingress in this process (`LocalIngress`) so that a test knows it asks another
replica than the one running its job. Leases last 3 s, so a dead replica's jobs are adopted within seconds.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from cluster_ingress_support import (
    TERMINAL,
    LocalIngress,
    analyze,
    cluster_settings,
    deployed,
    finals,
    follow,
    fresh_database,
    local_ingress,
    runner_of,
    status,
    wait,
)
from prometheus_client.parser import text_string_to_metric_families
from ray_cluster import RayCluster
from test_bundled import seed_client

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow, pytest.mark.e2e]

LEASE_SECONDS = 3.0
#: a job that runs long enough to be cancelled or killed part-way (best_of_k 8 over a long text)
LONGER = {"no_kl": True, "calculate_token_salience": False, "optimize_explanations_config": {"best_of_k": 8}}
LONGER_TEXT = " ".join(f"sentence {i} of a long text that keeps the replica busy" for i in range(120))


@pytest.fixture(scope="module")
def database(pg_server: object) -> Iterator[str]:
    yield from fresh_database(pg_server)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path], database: str) -> object:
    return cluster_settings(
        tmp_path_factory.mktemp("cluster-ingress"), tiny_dirs["a"], database, LEASE_SECONDS
    )


@pytest.fixture(scope="module")
def cluster(settings: object) -> Iterator[RayCluster]:
    with deployed(settings, ingress_replicas=2) as ray_cluster:
        yield ray_cluster


@pytest.fixture(scope="module")
def local(cluster: RayCluster, settings: object) -> Iterator[LocalIngress]:
    with local_ingress(settings) as ingress:
        yield ingress


def _pid(runner: str | None) -> int:
    assert runner is not None
    return int(runner.split(":")[1])


def test_a_job_run_by_one_replica_is_read_followed_and_cancelled_on_another(
    cluster: RayCluster, local: LocalIngress, database: str
) -> None:
    rid = analyze(local.url)
    assert _pid(runner_of(database, rid)) == os.getpid()  # this process's ingress runs it
    body = status(cluster.url, rid)  # a replica behind the proxy reads it from the store
    assert body["request_id"] == rid and body["status"] in {"queued", "processing", "completed"}
    seen = asyncio.run(follow(cluster.ws_url, [rid]))[rid]
    assert seen[0]["type"] == "status"
    ends = finals(seen)
    assert [m["type"] for m in ends] == ["result"] and ends[0]["tokens"], seen  # its end, once
    assert wait(cluster.url, rid)["result"] == wait(local.url, rid)["result"]

    # history and ownership are the store's: the same list on every replica
    mine = httpx.get(local.url + "/api/history", timeout=30).json()
    theirs = httpx.get(cluster.url + "/api/history", timeout=30).json()
    assert [i["request_id"] for i in mine["items"]] == [i["request_id"] for i in theirs["items"]]
    assert rid in [i["request_id"] for i in theirs["items"]]

    # cancelled through the proxy while this process's ingress runs it
    long_id = analyze(local.url, LONGER_TEXT, LONGER)
    r = httpx.post(cluster.url + f"/cancel/{long_id}", timeout=60)
    assert r.status_code == 200, r.text
    ended = wait(local.url, long_id)
    assert ended["status"] == "cancelled" and ended.get("result") is None, ended

    # the other way round: run behind the proxy, followed from this process's ingress
    other = analyze(cluster.url)
    assert _pid(runner_of(database, other)) != os.getpid()
    seen = asyncio.run(follow(local.ws_url, [other]))[other]
    assert [m["type"] for m in finals(seen)] == ["result"], seen


def test_a_killed_ingress_replicas_jobs_complete_and_a_reconnecting_client_picks_them_up(
    cluster: RayCluster, local: LocalIngress, database: str
) -> None:
    ids = [analyze(cluster.url, LONGER_TEXT, LONGER) for _ in range(2)]
    pids = {_pid(runner_of(database, rid)) for rid in ids}
    assert pids <= {r.pid for r in cluster.replicas("ingress")}
    assert all(status(local.url, rid)["status"] not in TERMINAL for rid in ids)  # part-way when killed
    for pid in pids:
        cluster.kill(pid)
    seen: dict[str, list[dict[str, object]]] = {}
    for _attempt in range(20):  # a client reconnects until a replica answers (the proxy may pick a dead one)
        try:
            seen = asyncio.run(follow(cluster.ws_url, ids, timeout=240))
            break
        except (OSError, websockets.exceptions.WebSocketException):
            asyncio.run(asyncio.sleep(1))
    assert seen, "no replica answered the reconnecting client"
    for rid in ids:
        assert [m["type"] for m in finals(seen[rid])] == ["result"], seen[rid]
        body = wait(local.url, rid)
        assert body["status"] == "completed" and body["result"]["tokens"]
        assert _pid(runner_of(database, rid)) not in pids  # another runner adopted and finished it
    cluster.wait_replicas("ingress", 2)  # Serve replaced what was killed


def test_metrics_on_any_replica_cover_every_replica_and_name_no_hidden_group(
    cluster: RayCluster, local: LocalIngress
) -> None:
    hidden = analyze(local.url, "A job on the group no listing shows.", model_id="tiny-hidden-l1")
    assert wait(local.url, hidden)["status"] == "completed"
    time.sleep(6)  # more than one posting interval of every replica
    text = httpx.get(cluster.url + "/metrics", timeout=30).text
    families = list(text_string_to_metric_families(text))
    submitted = {
        s.labels["replica"] for f in families for s in f.samples if s.name == "talkative_jobs_submitted_total"
    }
    ingress = {r for r in submitted if r.startswith("ingress:")}
    assert f"ingress:{os.uname().nodename}:{os.getpid()}" in ingress  # this process's, seen from the proxy
    assert len(ingress) >= 3, submitted  # and both replicas behind the proxy
    batches = {
        s.labels["replica"]: s.value
        for f in families
        for s in f.samples
        if s.name == "talkative_engine_batches_total" and s.labels["replica"].startswith("worker:")
    }
    assert batches and sum(batches.values()) > 0, batches  # the engine work, counted where it ran
    held = {
        s.labels["group"]
        for f in families
        for s in f.samples
        if s.name == "talkative_device_group" and s.labels["replica"].startswith("worker:")
    }
    assert held == {"hidden"}, held  # the worker holds the hidden group now, under the hidden label
    assert "tiny-hidden" not in text  # its id appears on no replica's series
    # the seed's JSON figures, summed over the same replicas (scraped again until no replica came or went between)
    for _ in range(5):
        figures = httpx.get(cluster.url + "/metrics?format=json", timeout=30).json()
        samples = [
            s
            for f in text_string_to_metric_families(httpx.get(cluster.url + "/metrics", timeout=30).text)
            for s in f.samples
        ]
        submitted = sum(s.value for s in samples if s.name == "talkative_jobs_submitted_total")
        completed = [
            s.value
            for s in samples
            if s.name == "talkative_jobs_finished_total" and s.labels["status"] == "completed"
        ]
        if figures["total_requests"] == submitted and figures["completed_requests"] == sum(completed):
            break
        time.sleep(2)
    assert figures["total_requests"] == submitted, (figures, submitted)
    assert figures["completed_requests"] == sum(completed) and len(completed) >= 3  # every ingress replica's


def test_the_seed_documentation_client_through_serves_proxy(cluster: RayCluster) -> None:
    printed = asyncio.run(asyncio.wait_for(seed_client(cluster.ws_url), 600))
    assert printed and not printed[0].startswith("Error"), printed
    assert all(": " in line for line in printed)
