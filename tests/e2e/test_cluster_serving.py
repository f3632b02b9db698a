"""BACKEND=ray on a real local Ray cluster: routing by group, switching, merging inside a replica, backpressure
and cancellation, through Serve's proxy with the REST API unchanged.

One cluster for the module (4 logical CPUs; CPU replicas of the tiny test models): pool `shared` multiplexes
groups `tiny-a` and `tiny-b` on two replicas, pool `narrow` serves `tiny-c` on one replica that holds one job and
lets one more wait (max_ongoing_requests 1, max_queued_requests 1), pool `switching` serves `tiny-d` and `tiny-e`
on one replica.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import FAST
from ray_cluster import RayCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps."


def _group(gid: str, model_dir: Path, **pool: Any) -> dict[str, Any]:
    return {
        "group_id": gid,
        "group_name": gid,
        "base_model_path": str(model_dir),
        "models": [
            {"id": f"{gid}-l1", "checkpoint": f"init:{model_dir}@1", "layer": 1, "auto_batch_size_max": 32}
        ],
        **pool,
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> Iterator[RayCluster]:
    from talkative.serve.settings import Settings

    a, b = tiny_dirs["a"], tiny_dirs["b"]
    shared = {"pool": "shared", "replicas": 2, "num_cpus": 0.5, "max_ongoing_requests": 4}
    narrow = {"pool": "narrow", "num_cpus": 0.5, "max_ongoing_requests": 1, "max_queued_requests": 1}
    switching = {"pool": "switching", "num_cpus": 0.5}
    groups = {
        "model_groups": [
            _group("tiny-a", a, **shared),
            _group("tiny-b", b, pool="shared"),
            _group("tiny-c", b, **narrow),
            _group("tiny-d", a, **switching),
            _group("tiny-e", b, pool="switching"),
        ],
        "settings": {"default_group": "tiny-a", "max_cpu_models": 1, "use_bf16": False},
    }
    root = tmp_path_factory.mktemp("cluster-serving")
    path = root / "model_groups.json"
    path.write_text(json.dumps(groups))
    settings = Settings(
        model_groups_file=path,
        data_dir=root / "data",
        result_cache=False,
        max_active_jobs=4,
        env_overrides={},
        _env_file=None,
    )
    ray_cluster = RayCluster(num_cpus=4).start()
    try:
        ray_cluster.deploy(settings)
        yield ray_cluster
    finally:
        ray_cluster.shutdown()


def _analyze(cluster: RayCluster, model_id: str, text: str = TEXT, **options: Any) -> str:
    r = httpx.post(
        cluster.url + "/analyze",
        json={"text": text, "model_id": model_id, "options": {**FAST, **options}},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def _wait(cluster: RayCluster, request_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        body: dict[str, Any] = httpx.get(cluster.url + f"/status/{request_id}", timeout=10).json()
        if body["status"] in {"completed", "failed", "cancelled"}:
            return body
        time.sleep(0.2)
    raise AssertionError(f"{request_id} did not end in {timeout}s")


def test_routing_by_model_across_two_groups_on_two_replicas(cluster: RayCluster) -> None:
    ids = [(_analyze(cluster, f"tiny-{g}-l1"), g) for g in "abab"]
    ran: dict[str, set[str]] = {"a": set(), "b": set()}
    for request_id, g in ids:
        body = _wait(cluster, request_id)
        assert body["status"] == "completed", body
        meta = body["result"]["metadata"]
        assert meta["group_id"] == f"tiny-{g}" and body["result"]["tokens"]
        ran[g].add(meta["replica"])
    assert len(ran["a"]) == 1 and len(ran["b"]) == 1, ran  # each group stays on the replica that holds it
    assert ran["a"] != ran["b"]  # and the two groups are on the two replicas
    live = {r.replica_id for r in cluster.replicas("worker-shared")}
    assert ran["a"] | ran["b"] == live
