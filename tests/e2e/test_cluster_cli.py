"""`talkative serve --backend ray` end to end with the bundled model: the CLI joins a running Ray cluster
(RAY_ADDRESS), deploys the repository's own model_groups.json, serves REST and the WebSocket protocol through
Serve's proxy on PORT, and on SIGTERM removes its application and exits 0.

The module starts the cluster (4 logical CPUs, no dashboard) and stops it; the CLI never starts one of its own here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_helpers import FAST, REPO, Server, recv_until
from ray_cluster import start_local_ray

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    import ray

    address = start_local_ray(4)  # a cluster of this module's own, whatever RAY_ADDRESS says
    try:
        yield address
    finally:
        ray.shutdown()


def test_serve_backend_ray_serves_the_bundled_model_and_stops_on_sigterm(
    ray_address: str, tmp_path: Path
) -> None:
    server = Server(
        tmp_path,
        {
            "BACKEND": "ray",
            "RAY_ADDRESS": ray_address,
            "MODEL_GROUPS_FILE": str(REPO / "model_groups.json"),
            "DATA_DIR": str(tmp_path / "data"),
            "HF_HUB_OFFLINE": "1",
        },
        name="cluster-cli",
    )
    try:
        server.start(timeout=300)
        models = server.get("/api/v2/models").json()
        model_id = models["current_model"]
        assert model_id and models["current_group"]

        body = server.wait(server.analyze("The cat sat on the mat.", FAST, model_id=model_id))
        assert body["status"] == "completed", body
        meta = body["result"]["metadata"]
        assert meta["model_id"] == model_id and meta["replica"]  # ran on a worker replica
        assert [r["position"] for r in body["result"]["tokens"]]

        with server.ws() as ws:  # the seed's WebSocket protocol through Serve's proxy
            assert json.loads(ws.recv(timeout=30))["type"] == "connection_established"
            ws.send(
                json.dumps(
                    {"type": "analyze", "text": "Hello there.", "options": FAST, "client_request_id": "c1"}
                )
            )
            got = recv_until(
                ws, lambda m: m.get("type") in {"result", "error"} and m.get("client_request_id") == "c1"
            )
            assert got[-1]["type"] == "result" and got[-1]["tokens"], got[-1]
            assert any(m["type"] == "queued" for m in got if m.get("client_request_id") == "c1")
    except Exception:
        print(server.log())
        raise
    assert server.proc is not None
    server.proc.terminate()  # SIGTERM: the application is removed, the process leaves the cluster and exits
    assert server.proc.wait(120) == 0, server.log()
    # the application is gone: Serve's proxy (the cluster's, which the CLI joined and leaves running) no longer
    # routes to it
    time.sleep(1)
    try:
        gone = httpx.get(server.url + "/health", timeout=5).status_code
    except httpx.HTTPError:
        gone = 0
    assert gone != 200
