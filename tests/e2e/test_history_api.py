"""`GET /api/history` (the web UI's history list): the caller's jobs, newest first, paged, without results."""

from __future__ import annotations

from typing import Any

import pytest
from e2e_helpers import FAST, Server

pytestmark = pytest.mark.e2e


def test_history_lists_own_jobs_newest_first_in_pages(make_server: Any) -> None:
    srv: Server = make_server()
    assert srv.get("/api/history").json() == {"items": [], "total": 0, "limit": 20, "offset": 0}
    first = srv.analyze("First text.")
    long_text = "word " * 100
    second = srv.analyze(long_text)
    r = srv.post(
        "/analyze",
        {
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello  there"}],
            "options": FAST,
        },
    )
    third = r.json()["request_id"]
    for rid in (first, second, third):
        assert srv.wait(rid)["status"] == "completed"

    page = srv.get("/api/history", params={"limit": 2}).json()
    assert page["total"] == 3 and page["limit"] == 2 and page["offset"] == 0
    assert [i["request_id"] for i in page["items"]] == [third, second]
    chat, long = page["items"]
    assert chat["input"] == "messages" and chat["n_messages"] == 2 and chat["preview"] == "Hello there"
    assert long["input"] == "text" and long["n_messages"] is None
    assert len(long["preview"]) == 160 and long["preview"].endswith("…")
    assert long["options"] == FAST and long["status"] == "completed" and long["model_id"] == "tiny-a-l1"
    assert long["n_tokens"] == srv.status(second)["result"]["metadata"]["n_positions"]
    assert long["summary"]["mean_relative_rmse"] is not None and "result" not in long and "tokens" not in long
    assert long["created_at"].endswith("Z") and long["processing_time"] > 0

    rest = srv.get("/api/history", params={"limit": 2, "offset": 2}).json()
    assert [i["request_id"] for i in rest["items"]] == [first] and rest["total"] == 3
    assert srv.get("/api/history", params={"kind": "generate"}).json()["total"] == 0
    assert srv.get("/api/history", params={"kind": "all"}).json()["total"] == 3

    for bad in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"kind": "switch"}):
        r = srv.get("/api/history", params=bad)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["detail"]


def test_history_needs_the_key_and_lists_cancelled_jobs(make_server: Any) -> None:
    srv: Server = make_server(API_KEY="k3y")
    auth = {"Authorization": "Bearer k3y"}
    assert srv.get("/api/history").status_code == 401
    long_text = "word " * 400
    r = srv.post(
        "/analyze",
        {"text": long_text, "options": {"optimize_explanations_config": {"best_of_k": 4}}},
        headers=auth,
    )
    rid = r.json()["request_id"]
    assert srv.post(f"/cancel/{rid}", headers=auth).status_code == 200
    items = srv.get("/api/history", headers=auth).json()["items"]
    cancelled = next(i for i in items if i["request_id"] == rid)
    assert (
        cancelled["status"] == "cancelled" and cancelled["n_tokens"] is None and cancelled["summary"] is None
    )


def test_an_offset_beyond_the_stores_integers_is_a_400(tiny_server: Server) -> None:
    for offset in ("9223372036854775808", "99999999999999999999999"):
        r = tiny_server.get("/api/history", params={"offset": offset})
        assert r.status_code == 400, r.text
        assert r.json()["detail"]
    r = tiny_server.get("/api/history", params={"offset": str(2**63 - 1)})
    assert r.status_code == 200 and r.json()["items"] == []
