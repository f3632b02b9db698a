"""BACKEND=ray faults on a real local Ray cluster: a worker replica killed mid-job (its process, SIGKILL). The
ingress sees the call fail, sends the job again (Serve routes it to the live replica), and the job completes
once: one result, whole, each position once, progress never going backwards, nothing heard twice.

One cluster for the module: pool `workers` serves the tiny group `tiny-a` on two CPU replicas.
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
from websockets.sync.client import connect

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

POOL = "workers"


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> Iterator[RayCluster]:
    from talkative.serve.settings import Settings

    a = tiny_dirs["a"]
    groups = {
        "model_groups": [
            {
                "group_id": "tiny-a",
                "base_model_path": str(a),
                "models": [
                    {"id": "tiny-a-l1", "checkpoint": f"init:{a}@1", "layer": 1, "auto_batch_size_max": 32}
                ],
                "pool": POOL,
                "replicas": 2,
                "num_cpus": 0.5,
            }
        ],
        "settings": {"default_group": "tiny-a", "max_cpu_models": 1, "use_bf16": False},
    }
    root = tmp_path_factory.mktemp("cluster-faults")
    path = root / "model_groups.json"
    path.write_text(json.dumps(groups))
    settings = Settings(
        model_groups_file=path, data_dir=root / "data", result_cache=False, env_overrides={}, _env_file=None
    )
    ray_cluster = RayCluster(num_cpus=4).start()
    try:
        ray_cluster.deploy(settings)
        ray_cluster.wait_replicas(f"worker-{POOL}", 2)
        yield ray_cluster
    finally:
        ray_cluster.shutdown()


def test_a_worker_replica_killed_mid_job_and_the_job_completes_once(cluster: RayCluster) -> None:
    text = words(150)
    with connect(cluster.ws_url, open_timeout=30, max_size=None) as ws:
        ws.send(
            json.dumps(
                {
                    "type": "analyze",
                    "text": text,
                    "model_id": "tiny-a-l1",
                    "options": {**FAST, "batch_size": 1},
                    "client_request_id": "kill-me",
                }
            )
        )
        mine: list[dict[str, Any]] = []
        request_id = None
        deadline = time.time() + 120
        while time.time() < deadline:  # until the replica is explaining positions of the job
            msg = json.loads(ws.recv(timeout=60))
            if msg.get("client_request_id") != "kill-me":
                continue
            mine.append(msg)
            request_id = msg["request_id"]
            if msg["type"] == "processing" and (msg.get("done_positions") or 0) >= 3:
                break
        assert request_id is not None and mine[-1]["type"] == "processing", mine
        running_on = mine[-1]["replica"]  # the replica explaining the job now
        (victim,) = [r for r in cluster.replicas(f"worker-{POOL}") if r.replica_id == running_on]
        cluster.kill(victim.pid)
        killed_at = time.time()

        ends = []
        deadline = time.time() + 180
        while time.time() < deadline:
            msg = json.loads(ws.recv(timeout=120))
            if msg.get("request_id") != request_id:
                continue
            mine.append(msg)
            if msg["type"] in {"result", "error", "request_cancelled"}:
                ends.append(msg)
                break
        # nothing more about the job after its end: no second result, no late error
        quiet_until = time.time() + 3
        while time.time() < quiet_until:
            try:
                msg = json.loads(ws.recv(timeout=max(0.1, quiet_until - time.time())))
            except TimeoutError:
                break
            if msg.get("request_id") == request_id:
                ends.append(msg)

    assert [m["type"] for m in ends] == ["result"], ends
    result = ends[0]
    meta = result["metadata"]
    assert meta["replica"] != victim.replica_id  # sent again, and run by the replica still alive
    positions = [row["position"] for row in result["tokens"]]
    assert positions == sorted(set(positions))  # each position once, in order: a whole result, no half one
    total = max((m.get("total_positions") or 0) for m in mine if m["type"] == "processing")
    assert len(positions) == total == meta["n_positions"]
    done = [m["done_positions"] for m in mine if m["type"] == "processing"]
    assert done == sorted(done)  # progress heard by the client never went backwards across the resend
    print(f"completed {time.time() - killed_at:.1f}s after its replica was killed")

    status = httpx.get(cluster.url + f"/status/{request_id}", timeout=10).json()
    assert status["status"] == "completed" and status["result"]["tokens"] == result["tokens"]
    cluster.wait_replicas(f"worker-{POOL}", 2)  # Serve replaced the dead replica
