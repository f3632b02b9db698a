"""The result cache over HTTP: an identical request is answered at once from the cache (a completed job marked
`cached`, rows equal bit for bit to a fresh computation), a text that extends an analysed one computes only its
new positions, the cache survives a restart, DELETE of a job removes its rows, RESULT_CACHE=false turns it off, a
request the cache answers whole costs no rate-limit budget, and the metrics count hits, misses and positions
saved."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from e2e_helpers import FAST, Server
from security_support import API_KEYS, auth, next_of, ws_connect

pytestmark = pytest.mark.e2e

TEXT = "The lighthouse keeper climbed the stairs at dusk and lit the great lamp for the ships"
MORE = TEXT + " sailing home through the fog"
OPTIONS = {**FAST, "batch_size": 4}


def analyzed(server: Server, text: str, **kw: Any) -> dict[str, Any]:
    r = server.post("/analyze", {"text": text, "options": OPTIONS}, **kw)
    assert r.status_code == 200, r.text
    return server.wait(r.json()["request_id"]) if not kw else dict(r.json())


def without_flags(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Position flags belong to the input a row is shown in (an outlier is judged against the whole input)."""
    return [{k: v for k, v in r.items() if k not in ("flags", "outlier")} for r in rows]


def counter(server: Server, name: str) -> float:
    text = server.get("/metrics").text
    found = re.search(rf"^{name}_total (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_identical_and_extended_requests_restart_and_delete(make_server: Callable[..., Server]) -> None:
    server = make_server()
    first = analyzed(server, TEXT)
    assert first["status"] == "completed"
    meta = first["result"]["metadata"]
    assert meta["cached"] is False and meta["positions_cached"] == 0
    rows = first["result"]["tokens"]

    # identical: completed when the POST answers, the rows exactly those computed
    r = server.post("/analyze", {"text": TEXT, "options": OPTIONS})
    again = server.status(r.json()["request_id"])
    assert again["status"] == "completed", again
    assert again["result"]["metadata"]["cached"] is True
    assert again["result"]["metadata"]["positions_cached"] == len(rows)
    assert again["result"]["metadata"]["engine_batches"] == []
    assert again["result"]["tokens"] == rows
    # options that only present (batch_size) are not in the key; one that changes rows (the seed) is
    r = server.post("/analyze", {"text": TEXT, "options": {**OPTIONS, "batch_size": 7}})
    assert server.status(r.json()["request_id"])["status"] == "completed"
    r = server.post("/analyze", {"text": TEXT, "options": {**OPTIONS, "seed": 7}})
    seeded = server.wait(r.json()["request_id"])
    assert seeded["result"]["metadata"]["positions_cached"] == 0

    # an extension: the common prefix comes from the cache, only the new positions are computed
    longer = analyzed(server, MORE)
    lmeta = longer["result"]["metadata"]
    shared = [
        a["position"]
        for a, b in zip(rows, longer["result"]["tokens"], strict=False)
        if a["token_id"] == b["token_id"]
    ]
    common = next((i for i, q in enumerate(shared) if q != i), len(shared))
    assert lmeta["cached"] is False and common - 1 <= lmeta["positions_cached"] <= common
    assert (
        lmeta["positions_cached"] >= len(rows) - 1
    )  # at most the last token of TEXT merges with what follows
    n_new = lmeta["n_positions"] - lmeta["positions_cached"]
    assert len(lmeta["engine_batches"]) == -(-n_new // OPTIONS["batch_size"])
    assert without_flags(longer["result"]["tokens"][: lmeta["positions_cached"]]) == without_flags(
        rows[: lmeta["positions_cached"]]
    )
    assert counter(server, "talkative_result_cache_hits") >= 2
    assert (
        counter(server, "talkative_result_cache_positions_saved") >= 2 * len(rows) + lmeta["positions_cached"]
    )
    assert counter(server, "talkative_result_cache_misses") >= 3

    # the cache lives in the store: hits across a restart
    server.stop()
    server.start()
    r = server.post("/analyze", {"text": TEXT, "options": OPTIONS})
    after = server.status(r.json()["request_id"])
    assert after["status"] == "completed" and after["result"]["metadata"]["cached"] is True
    assert after["result"]["tokens"] == rows

    # deleting the job that computed the rows removes them: the same request is computed again
    gone = httpx_delete(server, f"/api/v1/jobs/{first['request_id']}")
    assert gone.status_code == 200 and gone.json() == {"request_id": first["request_id"], "deleted": True}
    assert server.get(f"/status/{first['request_id']}").status_code == 404
    assert httpx_delete(server, f"/api/v1/jobs/{first['request_id']}").status_code == 404
    fresh = analyzed(server, TEXT)
    assert fresh["result"]["metadata"]["positions_cached"] == 0
    assert fresh["result"]["tokens"] == rows  # computed again alone, in the same batches: the same bits


def httpx_delete(server: Server, path: str, **kw: Any) -> Any:
    import httpx

    return httpx.delete(server.url + path, timeout=30, **kw)


def test_the_setting_off_computes_everything_and_a_fresh_row_equals_the_cached_one(
    make_server: Callable[..., Server],
) -> None:
    cached = make_server()
    rows = analyzed(cached, TEXT)["result"]["tokens"]
    r = cached.post("/analyze", {"text": TEXT, "options": OPTIONS})
    from_cache = cached.status(r.json()["request_id"])["result"]["tokens"]
    longer_cached = analyzed(cached, MORE)["result"]
    cached.stop()

    off = make_server(RESULT_CACHE="false")
    one, two = analyzed(off, TEXT), analyzed(off, TEXT)
    for job in (one, two):
        assert (
            job["result"]["metadata"]["cached"] is False
            and job["result"]["metadata"]["positions_cached"] == 0
        )
    assert (
        from_cache == one["result"]["tokens"] == rows
    )  # bit for bit: a cached row is the row a fresh run gives
    longer_fresh = analyzed(off, MORE)["result"]
    n = longer_cached["metadata"]["positions_cached"]
    for a, b in zip(longer_cached["tokens"][:n], longer_fresh["tokens"][:n], strict=True):
        # computed inside a shorter input: the same explanation, metrics within float rounding of the longer one
        assert a["explanation"] == b["explanation"] and a["token_id"] == b["token_id"]
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-4, abs=1e-7)
    assert "talkative_result_cache_hits_total 0.0" in off.get("/metrics").text


def test_a_cache_hit_costs_no_rate_limit_budget(make_server: Callable[..., Server]) -> None:
    limit = 5
    server = make_server(API_KEYS=API_KEYS, RATE_LIMIT_PER_MINUTE=str(limit), RESULT_CACHE_SHARED="true")
    with ws_connect(server, "alice") as ws:  # the handshake and the analysis cost; the identical one does not
        ws.send(json.dumps({"type": "analyze", "text": TEXT, "options": OPTIONS}))
        assert next_of(ws, {"result", "error"}, timeout=120)["type"] == "result"
        ws.send(
            json.dumps({"type": "analyze", "text": TEXT, "options": OPTIONS, "client_request_id": "again"})
        )
        again = next_of(ws, {"result", "error"}, timeout=30)
        assert again["type"] == "result" and again["client_request_id"] == "again", again
        assert again["metadata"]["cached"] is True and again["tokens"]
    # bob's identical requests are answered from the (shared) cache: each is refunded
    for _ in range(limit + 2):
        r = server.post("/analyze", {"text": TEXT, "options": OPTIONS}, headers=auth("bob"))
        assert r.status_code == 200, r.text
    assert [server.get("/api/v2/models", headers=auth("bob")).status_code for _ in range(limit)] == [
        200
    ] * limit
    assert server.get("/api/v2/models", headers=auth("bob")).status_code == 429
    # a request the cache does not answer whole is charged as usual
    r = server.post("/analyze", {"text": MORE, "options": OPTIONS}, headers=auth("alice"))
    assert r.status_code == 200
