"""RATE_LIMIT_PER_MINUTE over real server processes: per key on REST and WebSocket messages alike (one budget),
per client address without keys, ping free, wrong keys throttled, and the answers say when to retry."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from e2e_helpers import Server
from security_support import API_KEYS, auth, next_of, recv_json, refusal_of, usable, ws_connect

pytestmark = pytest.mark.e2e

LIMIT = 5


def test_each_key_has_its_own_budget_across_rest_and_websocket(make_server: Callable[..., Server]) -> None:
    server = make_server(API_KEYS=API_KEYS, RATE_LIMIT_PER_MINUTE=str(LIMIT))
    codes = [server.get("/api/v2/models", headers=auth("alice")).status_code for _ in range(LIMIT)]
    assert codes == [200] * LIMIT
    limited = server.get("/api/v2/models", headers=auth("alice"))
    assert limited.status_code == 429, limited.text
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    body = limited.json()
    assert body["kind"] == "rate_limited" and f"{LIMIT} requests per minute" in body["detail"]
    assert body["retry_after"] == int(limited.headers["retry-after"])
    assert server.get("/health").status_code == 200  # public routes cost nothing
    # alice's budget is spent for her WebSocket too: the handshake is refused with "try again later"
    with ws_connect(server, "alice") as ws:
        frame, code = refusal_of(ws)
    assert (
        code == 1013 and frame is not None and frame["kind"] == "rate_limited" and frame["retry_after"] >= 1
    )

    with ws_connect(server, "bob") as ws:  # the handshake is bob's first hit
        assert recv_json(ws)["type"] == "connection_established"
        for i in range(LIMIT - 1):
            ws.send(json.dumps({"type": "list_model_groups", "client_request_id": f"l{i}"}))
            assert next_of(ws, {"model_groups_list", "error"})["type"] == "model_groups_list"
        ws.send(json.dumps({"type": "list_model_groups", "client_request_id": "over"}))
        err = next_of(ws, {"model_groups_list", "error"})
        assert err["type"] == "error" and err["code"] == 429 and err["kind"] == "rate_limited", err
        assert err["client_request_id"] == "over" and 1 <= err["retry_after"] <= 60
        assert usable(ws)  # ping is free, and the connection stays open
        ws.send(json.dumps({"type": "analyze", "text": "over the limit"}))
        assert next_of(ws, {"queued", "error"})["kind"] == "rate_limited"
    assert server.get("/api/v2/models", headers=auth("bob")).status_code == 429
    assert server.get("/api/v2/models", headers=auth("admin")).status_code == 200  # admin has its own budget
    metrics = server.get("/metrics", headers=auth("admin"), params={"format": "json"}).json()
    assert metrics["rejected_requests"]["rate_limited"] >= 4


def test_without_keys_each_address_has_a_budget_and_wrong_keys_are_throttled(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(ALLOW_UNAUTHENTICATED="true", RATE_LIMIT_PER_MINUTE="3")
    one, two = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "198.51.100.9"}
    assert [server.get("/api/v2/models", headers=one).status_code for _ in range(4)] == [200, 200, 200, 429]
    assert server.get("/api/v2/models", headers=two).status_code == 200
    assert all(
        server.get("/api/v2/models").status_code == 200 for _ in range(10)
    )  # the local user is not metered

    keyed = make_server(API_KEYS=API_KEYS, RATE_LIMIT_PER_MINUTE="3")
    wrong = {"Authorization": "Bearer guess"}
    codes = [keyed.get("/api/v2/models", headers=wrong).status_code for _ in range(5)]
    assert codes == [401, 401, 401, 429, 429], codes
    assert keyed.get("/api/v2/models", headers=auth("alice")).status_code == 200  # the right key still works
