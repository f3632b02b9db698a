"""REST over real HTTP to a server process on tiny models: analyze, status, cancel, validation, model listing."""

from __future__ import annotations

import re
import time

import pytest
from e2e_helpers import FAST, Server

pytestmark = pytest.mark.e2e

LONG_TEXT = " ".join(f"word{i}" for i in range(150))


def test_root_health_ready_docs(tiny_server: Server) -> None:
    assert tiny_server.get("/").json() == {
        "name": "Consistency Lens API",
        "version": "1.0.0",
        "status": "running",
    }
    assert (
        tiny_server.get("/", headers={"Accept": "application/json"}).json()["name"] == "Consistency Lens API"
    )
    health = tiny_server.get("/health").json()
    assert health["status"] == "healthy" and health["model_loaded"] is True
    assert {"gpu_available", "gpu_name", "queue_size", "devices"} <= set(health)
    assert health["devices"][0]["group_id"] == "tiny-a"
    assert tiny_server.get("/ready").status_code == 200
    assert tiny_server.get("/docs").status_code == 200
    assert "/analyze" in tiny_server.get("/openapi.json").json()["paths"]


def test_analyze_then_status(tiny_server: Server) -> None:
    r = tiny_server.post("/analyze", {"text": "The capital of France is Paris.", "options": FAST})
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "queued" and isinstance(body["queue_position"], int) and body["queue_size"] >= 1
    done = tiny_server.wait(body["request_id"])
    assert done["status"] == "completed", done
    iso = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"
    for key in ("created_at", "started_at", "completed_at"):
        assert re.fullmatch(iso, done[key]), done[key]
    assert done["error"] is None and done["processing_time"] > 0
    rows, meta = done["result"]["tokens"], done["result"]["metadata"]
    assert [row["position"] for row in rows] == list(range(len(rows))) and len(rows) >= 7
    for row in rows:
        assert {"position", "token", "explanation", "mse", "kl_divergence", "layer"} <= set(row)
        assert isinstance(row["explanation"], str) and row["mse"] is not None and row["layer"] == 1
    assert meta["model_id"] == "tiny-a-l1" and meta["layer"] == 1
    assert {"processing_time", "batch_size", "engine_batches"} <= set(meta)


def test_chat_messages_and_model_choice(tiny_server: Server) -> None:
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    rid = tiny_server.post(
        "/analyze", {"messages": messages, "model_id": "tiny-a-l2", "options": {**FAST, "last_n_messages": 1}}
    ).json()["request_id"]
    done = tiny_server.wait(rid)
    assert done["status"] == "completed", done
    assert done["result"]["metadata"]["model_id"] == "tiny-a-l2"
    assert all(row["layer"] == 2 for row in done["result"]["tokens"])


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"text": "hi", "options": {"optimize_explanations_config": {"best_of_k": 999}}}, "best_of_k"),
        ({"text": "hi", "options": {"temperature": 5}}, "temperature"),
        ({"text": "hi", "options": {"no_such_option": True}}, "no_such_option"),
        ({"text": "   "}, "empty"),
        ({}, "exactly one of text or messages"),
        ({"text": "hi", "messages": [{"role": "user", "content": "x"}]}, "exactly one"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"text": "hi", "options": {"last_n_messages": 1}}, "chat messages"),
        ({"text": "hi", "options": {"replace_left": "x", "tuned_lens": True}}, "tuned lens"),
        ({"text": "x" * 20001}, "MAX_TEXT_LENGTH"),
    ],
)
def test_bad_input_is_400_with_detail(tiny_server: Server, body: dict, fragment: str) -> None:
    r = tiny_server.post("/analyze", body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["detail"]


def test_a_prompt_override_is_bounded_in_tokens_before_any_engine_work(tiny_server: Server) -> None:
    """2,000 characters of CJK Extension B are about 8,000 tokens, each prepended to every row of a batch: refused
    with a 400 naming the token bound, quickly (tokenized off the event loop, no engine work queued)."""
    huge = "".join(chr(0x20000 + i * 7) for i in range(2000))
    t0 = time.monotonic()
    r = tiny_server.post("/analyze", {"text": "hello world", "options": {**FAST, "replace_right": huge}})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "replace_right" in detail and "at most 256 tokens" in detail, detail
    assert time.monotonic() - t0 < 5
    r = tiny_server.post("/analyze", {"text": "hello world", "options": {**FAST, "replace_left": huge[:40]}})
    assert r.status_code == 200, r.text  # 40 such characters fit within the bound
    assert tiny_server.get("/health").json()["status"] == "healthy"


def test_bad_json_and_unknown_ids(tiny_server: Server) -> None:
    r = tiny_server.post("/analyze", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    assert tiny_server.post("/analyze", {"text": "hi", "model_id": "nope"}).status_code == 404
    assert tiny_server.get("/status/nope").status_code == 404
    assert tiny_server.post("/cancel/nope").status_code == 404
    assert tiny_server.post("/api/v2/models/switch", {"model_id": "nope"}).status_code == 404
    assert tiny_server.post("/api/v2/models/switch", {}).status_code == 400


def test_models_listing(tiny_server: Server) -> None:
    body = tiny_server.get("/api/v2/models").json()
    assert [g["group_id"] for g in body["groups"]] == ["tiny-a", "tiny-b"]
    a = body["groups"][0]
    assert a["is_loaded"] is True and [m["id"] for m in a["models"]] == ["tiny-a-l1", "tiny-a-l2"]
    assert a["models"][0] | {"layer": 1, "is_current": True} == a["models"][0]
    assert body["current_model"] == "tiny-a-l1" and body["current_group"] == "tiny-a"
    assert body["is_switching"] is False
    assert body["model_status"]["cache_info"]["groups_loaded"] == ["tiny-a"]


def test_cancel_queued_and_running(tiny_server: Server) -> None:
    # MAX_ACTIVE_JOBS=3: three long jobs run, the fourth waits in the queue
    slow = {**FAST, "batch_size": 2}
    running = [tiny_server.analyze(LONG_TEXT, slow) for _ in range(3)]
    queued = tiny_server.analyze(LONG_TEXT, slow)
    assert tiny_server.status(queued)["status"] == "queued"
    assert tiny_server.status(queued)["queue_position"] == 1

    r = tiny_server.post(f"/cancel/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    body = tiny_server.status(queued)
    assert body["status"] == "cancelled" and body["result"] is None and body["started_at"] is None

    victim = running[0]
    tiny_server.wait(victim, lambda b: (b.get("progress") or {}).get("done_positions", 0) > 0)
    assert tiny_server.post(f"/cancel/{victim}").status_code == 200
    time.sleep(1.0)  # its chunk in flight returns meanwhile; nothing of it may be kept
    body = tiny_server.status(victim)
    assert body["status"] == "cancelled" and body["result"] is None
    assert tiny_server.post(f"/cancel/{victim}").status_code == 409

    for rid in running[1:]:
        tiny_server.post(f"/cancel/{rid}")
    # the server is still healthy and serves new work
    assert tiny_server.wait(tiny_server.analyze("after the cancels"))["status"] == "completed"
