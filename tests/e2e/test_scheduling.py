"""Scheduling over a real server process: interleaving, merging, group switches with work in flight, restarts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from e2e_helpers import FAST, Server, recv_until

pytestmark = pytest.mark.e2e


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_short_request_is_not_stuck_behind_a_long_one(tiny_server: Server) -> None:
    long_id = tiny_server.analyze(words(400), {**FAST, "batch_size": 4})  # about 1,700 tokens
    tiny_server.wait(long_id, lambda b: (b.get("progress") or {}).get("done_positions", 0) > 0)
    t0 = time.time()
    short_id = tiny_server.analyze("a short one", {**FAST, "batch_size": 4})
    short = tiny_server.wait(short_id)
    latency = time.time() - t0
    long_now = tiny_server.status(long_id)
    assert short["status"] == "completed"
    assert long_now["status"] == "processing", "the short request waited for the long one to finish"
    progress = long_now["progress"]
    assert progress["done_positions"] < progress["total_positions"] / 2, progress
    assert tiny_server.post(f"/cancel/{long_id}").status_code == 200
    print(f"short request latency while a {progress['total_positions']}-position one runs: {latency:.2f}s")


def test_compatible_jobs_share_engine_batches(tiny_server: Server) -> None:
    opts = {**FAST, "batch_size": 8}
    a = tiny_server.analyze(words(15), {**opts, "seed": 1})
    b = tiny_server.analyze(words(15), {**opts, "seed": 2})
    other_k = tiny_server.analyze(words(15), {**opts, "optimize_explanations_config": {"best_of_k": 2}})
    ra, rb, rk = (tiny_server.wait(x) for x in (a, b, other_k))
    assert ra["status"] == rb["status"] == rk["status"] == "completed"
    ma, mb, mk = (r["result"]["metadata"] for r in (ra, rb, rk))
    shared = set(ma["engine_batches"]) & set(mb["engine_batches"])
    assert shared, (ma["engine_batches"], mb["engine_batches"])
    assert ma["merged_batches"] > 0 and mb["merged_batches"] > 0
    assert not set(mk["engine_batches"]) & (set(ma["engine_batches"]) | set(mb["engine_batches"]))
    # each job's rows are its own, whatever shared the batch: the same seed alone gives the same explanations
    again = tiny_server.wait(tiny_server.analyze(words(15), {**opts, "seed": 1}))
    assert [r["explanation"] for r in again["result"]["tokens"]] == [
        r["explanation"] for r in ra["result"]["tokens"]
    ]


def test_group_switch_waits_for_running_work(make_server: Callable[..., Server]) -> None:
    server = make_server()
    slow = {**FAST, "batch_size": 2}
    with server.ws() as ws:
        ws.send(
            json.dumps({"type": "analyze", "text": words(15), "options": slow, "client_request_id": "long"})
        )
        msgs = recv_until(
            ws,
            lambda m: (
                m["type"] == "processing" and m["client_request_id"] == "long" and m["done_positions"] > 0
            ),
        )
        long_id = next(m["request_id"] for m in msgs if m["type"] == "queued")

        ws.send(
            json.dumps({"type": "switch_model_grouped", "model_id": "tiny-b-l1", "client_request_id": "sw"})
        )
        queued = recv_until(ws, lambda m: m["type"] == "group_switch_queued")[-1]
        assert queued["client_request_id"] == "sw" and queued["target_group_id"] == "tiny-b"
        assert queued["active_requests"] >= 1 and queued["queue_position"] == 1

        b_job = server.analyze("for group b", FAST, model_id="tiny-b-l1")
        a_job = server.analyze("back to group a", FAST, model_id="tiny-a-l2")
        assert server.status(b_job)["status"] == "queued" and server.status(a_job)["status"] == "queued"

        got = recv_until(ws, lambda m: m["type"] == "model_switch_complete", timeout=180)
        types = [(m["type"], m.get("client_request_id")) for m in got]
        assert ("result", "long") in types, "the switch did not wait for the running analysis"
        assert types.index(("result", "long")) < types.index(("model_switch_complete", "sw"))
        result = next(m for m in got if m["type"] == "result")
        assert result["request_id"] == long_id
        assert (
            len(result["tokens"]) == result["metadata"]["n_positions"]
            and result["metadata"]["model_id"] == "tiny-a-l1"
        )
        done = got[-1]
        assert done["model_id"] == "tiny-b-l1" and done["group_switched"] is True
        assert done["model_info"]["layer"] == 1 and done["model_info"]["display_name"] == "Tiny B L1"
        statuses = [m for m in got if m["type"] == "group_switch_status"]
        assert [s["status"] for s in statuses if s["group_id"] == "tiny-b"][:2] == ["starting", "completed"]

    rb, ra = server.wait(b_job), server.wait(a_job)
    assert rb["status"] == ra["status"] == "completed"
    assert rb["result"]["metadata"]["model_id"] == "tiny-b-l1"
    assert ra["result"]["metadata"]["model_id"] == "tiny-a-l2" and ra["result"]["metadata"]["layer"] == 2
    assert rb["completed_at"] < ra["started_at"]
    models = server.get("/api/v2/models").json()
    assert models["current_model"] == "tiny-b-l1" and models["current_group"] == "tiny-b"
    cache = models["model_status"]["cache_info"]
    assert cache["groups_loaded"] == ["tiny-a"] and cache["models_cached"] == ["tiny-b-l1"]
    assert cache["base_locations"] == {"tiny-a": "cpu", "tiny-b": "cpu_cache"}
    # a request without model_id now runs on the current model, over REST too
    plain = server.wait(server.analyze("no model named", FAST))
    assert plain["result"]["metadata"]["model_id"] == "tiny-b-l1"
    r = server.post("/api/v2/models/switch", {"model_id": "tiny-a-l1"})
    assert r.status_code == 200
    assert r.json() | {"status": "success", "model_id": "tiny-a-l1", "group_id": "tiny-a"} == r.json()


def test_restart_runs_unfinished_jobs_again(make_server: Callable[..., Server]) -> None:
    server = make_server(MAX_ACTIVE_JOBS="1")
    finished = server.wait(server.analyze("finished before the crash"))
    assert finished["status"] == "completed"
    running = server.analyze(words(20), {**FAST, "batch_size": 2})
    waiting = server.analyze("queued at the crash")
    server.wait(running, lambda b: (b.get("progress") or {}).get("done_positions", 0) > 0)
    assert server.status(waiting)["status"] == "queued"

    server.kill()
    server.start()

    assert server.status(finished["request_id"])["result"] == finished["result"]
    for rid in (running, waiting):
        body = server.wait(rid)
        assert body["status"] == "completed", body
    assert (
        len(server.status(running)["result"]["tokens"])
        == server.status(running)["result"]["metadata"]["n_positions"]
    )
    assert "recovered 2 unfinished jobs" in server.log(tail=None)
