"""A server on the PostgreSQL store (DATABASE_URL): jobs, the result cache, shares, history and batches live in
PostgreSQL, not under DATA_DIR; killed with work queued, another process (another DATA_DIR) on the same database
carries everything on."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from e2e_helpers import FAST, Server

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.slow]


def test_a_server_on_postgresql_keeps_everything_there(
    make_server: Callable[..., Server], pg_url: str
) -> None:
    first = make_server(DATABASE_URL=pg_url, MAX_ACTIVE_JOBS="1")
    done = first.wait(first.analyze("The capital of France is Paris."))
    assert done["status"] == "completed" and done["result"]["tokens"], done
    again = first.wait(first.analyze("The capital of France is Paris."))
    assert again["result"]["metadata"]["cached"] is True  # answered from the cache's rows in PostgreSQL
    share = first.post("/api/v1/shares", {"request_id": done["request_id"], "anchor": {"position": 1}})
    assert share.status_code == 201, share.text
    batch = first.post("/api/v1/batches", {"items": [{"id": "x", "text": "a batch item"}], "options": FAST})
    assert batch.status_code == 202, batch.text
    queued = [first.analyze(f"left queued when the server dies, number {i}") for i in range(3)]
    first.kill()

    second = make_server(DATABASE_URL=pg_url)  # a fresh DATA_DIR: whatever it finds came from PostgreSQL
    assert not (first.workdir / "data" / "jobs.sqlite3").exists()
    assert second.status(done["request_id"])["result"] == done["result"]
    for rid in queued:
        assert second.wait(rid)["status"] == "completed"
    got = second.get(f"/api/v1/shares/{share.json()['share_id']}")
    assert got.status_code == 200 and got.json()["request_id"] == done["request_id"]
    batch_id = batch.json()["batch_id"]
    deadline = time.time() + 120
    while second.get(f"/api/v1/batches/{batch_id}").json()["status"] != "completed":
        assert time.time() < deadline, second.get(f"/api/v1/batches/{batch_id}").json()
        time.sleep(0.2)
    history = second.get("/api/history?limit=50").json()
    assert {done["request_id"], *queued} <= {item["request_id"] for item in history["items"]}
