"""The whole cluster restarted (every ingress and worker replica gone at once, the PostgreSQL store kept): the jobs
that were queued or running run again when the cluster is back, as they do after a restart of one process.

A module of its own: it stops its Ray cluster part-way and starts a new one on the same store.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cluster_ingress_support import analyze, cluster_settings, fresh_database, wait
from ray_cluster import RayCluster

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow, pytest.mark.e2e]

LONGER = {"no_kl": True, "calculate_token_salience": False, "optimize_explanations_config": {"best_of_k": 8}}
TEXT = " ".join(f"sentence {i} of a long text that keeps the replica busy" for i in range(60))


@pytest.fixture(scope="module")
def database(pg_server: object) -> Iterator[str]:
    yield from fresh_database(pg_server)


def _unfinished(database: str) -> dict[str, str]:
    with psycopg.connect(database) as conn:
        rows = conn.execute("SELECT id, status FROM jobs WHERE status IN ('queued', 'processing')").fetchall()
    return {row[0]: row[1] for row in rows}


def test_queued_and_running_jobs_run_again_after_the_whole_cluster_restarts(
    tmp_path: Path, tiny_dirs: dict[str, Path], database: str
) -> None:
    settings = cluster_settings(tmp_path, tiny_dirs["a"], database, lease_seconds=3.0)
    first = RayCluster(num_cpus=3).start()
    try:
        first.deploy(settings, ingress_replicas=1)
        ids = [analyze(first.url, TEXT, LONGER) for _ in range(4)]
    finally:
        first.shutdown()  # everything at once, part-way through
    left = _unfinished(database)
    assert set(ids) & set(left), "every job ended before the cluster stopped: nothing to run again"
    second = RayCluster(num_cpus=3).start()
    try:
        second.deploy(settings, ingress_replicas=1)
        for rid in ids:
            body = wait(second.url, rid, timeout=300)
            assert body["status"] == "completed" and body["result"]["tokens"], body
        assert _unfinished(database) == {}
    finally:
        second.shutdown()
