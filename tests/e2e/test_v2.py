"""The v2 model API and the admin reset on tiny models: listing and switching (checked against the contract),
preload, memory, model info, GPU statistics, `POST /reset` keeping queued jobs, and `visible: false` /
`backend_only` enforced on every route and the WebSocket for a key that is not the admin's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import FAST, Server, recv_until
from security_support import wait_job
from websockets.sync.client import connect

pytestmark = pytest.mark.e2e

ADMIN, ALICE = "admin-key-0123456789", "alice-key-0123456789"
CHAT = [{"role": "user", "content": "Hello"}]


def test_models_listing_and_switch_follow_the_contract(make_server: Any) -> None:
    server = make_server()
    listing = server.get("/api/v2/models").json()
    assert set(listing) >= {"groups", "current_model", "current_group", "is_switching", "model_status"}
    group = listing["groups"][0]
    assert set(group) >= {
        "group_id",
        "group_name",
        "description",
        "base_model",
        "is_loaded",
        "estimated_memory",
    }
    assert set(group["models"][0]) >= {"id", "name", "layer", "description", "batch_size"}
    assert set(listing["model_status"]["cache_info"]) == {"groups_loaded", "models_cached", "base_locations"}
    assert listing["current_model"] == "tiny-a-l1" and listing["current_group"] == "tiny-a"

    same = server.post("/api/v2/models/switch", {"model_id": "tiny-a-l2"}).json()
    assert same["status"] == "success" and same["group_switched"] is False and same["group_id"] == "tiny-a"
    assert same["model_info"] == {"model_id": "tiny-a-l2", "group_id": "tiny-a", "is_loaded": True}
    other = server.post("/api/v2/models/switch", {"model_id": "tiny-b-l1"}).json()
    assert other["group_switched"] is True and other["model_info"]["is_loaded"] is True
    assert server.post("/api/v2/models/switch", {"model_id": "nope"}).status_code == 404
    assert server.post("/api/v2/models/switch", {}).status_code == 400


def test_preload_memory_info_and_gpu_stats(make_server: Any) -> None:
    server = make_server()
    r = server.post("/api/v2/groups/tiny-b/preload")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "success",
        "message": "group tiny-b is loaded into the CPU cache",
        "group_id": "tiny-b",
        "location": "cpu_cache",
    }
    assert "already in the CPU cache" in server.post("/api/v2/groups/tiny-b/preload").json()["message"]
    assert server.post("/api/v2/groups/tiny-a/preload").json()["location"] == "cpu"
    assert server.post("/api/v2/groups/nope/preload").status_code == 404

    memory = server.get("/api/v2/models/memory").json()
    assert set(memory["memory"]) == {"allocated_gb", "reserved_gb", "free_gb", "total_gb"}
    assert 0 < memory["memory"]["allocated_gb"] < memory["memory"]["total_gb"]
    assert memory["devices"]["cpu"] == memory["memory"]
    assert memory["cache_info"]["base_model_cache"] == {"tiny-b": "cpu_cache", "tiny-a": "cpu"}
    assert memory["cache_info"]["models_cached"] == ["tiny-b-l1"]
    assert memory["current_model"] == "tiny-a-l1" and memory["current_group"] == "tiny-a"
    # a switch to the preloaded group is a move from the cache
    assert server.post("/api/v2/models/switch", {"model_id": "tiny-b-l1"}).json()["group_switched"] is True
    assert "moved group tiny-b from the CPU cache" in server.log(tail=None)

    info = server.get("/api/v2/models/tiny-a-l2/info").json()
    assert {k: info[k] for k in ("model_id", "group_id", "layer", "is_current", "base_model")} == {
        "model_id": "tiny-a-l2",
        "group_id": "tiny-a",
        "layer": 2,
        "is_current": False,
        "base_model": info["base_model"],
    }
    assert set(info) >= {"group_name", "model_name", "description", "batch_size", "is_loaded"}
    assert info["location"] == "cpu_cache" and info["nla"] is None  # parked, not on a device
    loaded = server.get("/api/v2/models/tiny-b-l1/info").json()
    assert loaded["is_loaded"] and loaded["nla"]["d_model"] == 64 and loaded["nla"]["reads_current_token"]
    assert loaded["nla"]["explanation_grammar"] is None  # a free-text checkpoint
    assert server.get("/api/v2/models/nope/info").status_code == 404

    stats = server.get("/api/gpu_stats").json()
    assert stats["available"] is False and stats["devices"] == {}
    cpu = stats["cpu"]
    assert cpu["cpu_count"] >= 1 and 0 < cpu["memory_used"] < cpu["memory_total"]
    assert cpu["process_memory"] > 0 and 0 < cpu["memory_percent"] <= 100


def test_reset_unloads_and_reloads_without_dropping_queued_jobs(make_server: Any) -> None:
    server = make_server(MAX_ACTIVE_JOBS="1")
    server.post("/api/v2/models/switch", {"model_id": "tiny-b-l1"})  # tiny-a goes to the CPU cache
    server.post("/api/v2/models/switch", {"model_id": "tiny-a-l2"})
    long = {"max_new_tokens": 4096, "stop_at_end_of_turn": False}
    running = server.post("/generate", {"text": "Go", "options": long}).json()["request_id"]
    server.wait(running, until=lambda b: b["status"] == "processing")
    queued = server.analyze("Still queued after the reset", model_id="tiny-b-l1")
    assert server.status(queued)["status"] == "queued"
    r = server.post("/reset?drain_seconds=0.5")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "reset" and "tiny-a was loaded again" in body["message"]
    assert body["cancelled_requests"] == [running] and body["loaded_group"] == "tiny-a"
    assert set(body["unloaded_groups"]) == {"tiny-a", "tiny-b"} and body["current_model"] == "tiny-a-l1"
    assert server.status(running)["status"] == "cancelled"
    assert server.wait(queued)["status"] == "completed"  # kept, and run after the reset
    memory = server.get("/api/v2/models/memory").json()
    # the queued job ran: its group tiny-b is on the device, the reloaded default group in the cache
    assert memory["cache_info"]["base_model_cache"] == {"tiny-a": "cpu_cache", "tiny-b": "cpu"}


# -- visible: false and backend_only --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def access_server(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    a, b = tiny_dirs["a"], tiny_dirs["b"]

    def model(mid: str, src: Path, layer: int, **extra: Any) -> dict[str, Any]:
        return {"id": mid, "name": mid, "checkpoint": f"init:{src}@{layer}", "layer": layer, **extra}

    groups = {
        "model_groups": [
            {
                "group_id": "open",
                "group_name": "Open",
                "base_model_path": str(a),
                "models": [
                    model("open-l1", a, 1),
                    model("open-hidden", a, 2, visible=False),
                    model("open-admin", a, 3, backend_only=True),
                ],
            },
            {
                "group_id": "secret",
                "group_name": "Secret",
                "base_model_path": str(b),
                "backend_only": True,
                "models": [model("secret-l1", b, 1)],
            },
            {
                "group_id": "unlisted",
                "group_name": "Unlisted",
                "base_model_path": str(b),
                "visible": False,
                "models": [model("unlisted-l2", b, 2)],
            },
        ],
        "settings": {"default_group": "open", "max_cpu_models": 2},
    }
    root = tmp_path_factory.mktemp("access")
    path = root / "model_groups.json"
    path.write_text(json.dumps(groups))
    server = Server(
        root,
        {
            "MODEL_GROUPS_FILE": str(path),
            "DATA_DIR": str(root / "data"),
            "API_KEYS": f"admin:{ADMIN},alice:{ALICE}",
            "RATE_LIMIT_PER_MINUTE": "0",
            "HF_HUB_OFFLINE": "1",
        },
        name="access-server",
    )
    server.start()
    yield server
    server.stop()


def _as(key: str) -> dict[str, dict[str, str]]:
    return {"headers": {"Authorization": f"Bearer {key}"}}


def test_listings_hide_invisible_and_backend_only(access_server: Server) -> None:
    alice = access_server.get("/api/v2/models", **_as(ALICE)).json()
    assert [(g["group_id"], [m["id"] for m in g["models"]]) for g in alice["groups"]] == [
        ("open", ["open-l1"])
    ]
    admin = access_server.get("/api/v2/models", **_as(ADMIN)).json()
    seen = {g["group_id"]: [(m["id"], m["backend_only"]) for m in g["models"]] for g in admin["groups"]}
    assert seen == {"open": [("open-l1", False), ("open-admin", True)], "secret": [("secret-l1", True)]}
    slim = access_server.get("/api/slim/models", **_as(ALICE)).json()
    assert [g["id"] for g in slim["model_groups"]] == ["open"]
    layers = access_server.get("/api/slim/models/open/layers", **_as(ALICE)).json()
    assert [x["id"] for x in layers["layers"]] == ["open-l1"]
    with connect(f"{access_server.ws_url}?api_key={ALICE}", open_timeout=30) as ws:
        ws.send(json.dumps({"type": "list_model_groups"}))
        groups = recv_until(ws, lambda m: m["type"] == "model_groups_list")[-1]["groups"]
    assert [g["group_id"] for g in groups] == ["open"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/analyze", {"text": "hi", "model_id": "open-admin", "options": FAST}),
        ("post", "/generate", {"text": "hi", "model_id": "secret-l1"}),
        ("post", "/api/v2/models/switch", {"model_id": "open-admin"}),
        ("post", "/api/slim/generate", {"messages": CHAT, "model_group": "secret"}),
        ("post", "/api/slim/analyze", {"messages": CHAT, "model_group": "open", "model_id": "open-admin"}),
        ("post", "/api/v1/describe", {"vectors": [[0.0] * 64], "model_id": "open-admin"}),
        ("post", "/api/v1/tokenize", {"text": "hi", "model_id": "secret-l1"}),
        ("post", "/api/v2/groups/secret/preload", None),
        ("post", "/reset", None),
    ],
)
def test_backend_only_and_reset_are_for_the_admin(
    access_server: Server, method: str, path: str, body: Any
) -> None:
    r = (
        access_server.get(path, **_as(ALICE))
        if method == "get"
        else access_server.post(path, body, **_as(ALICE))
    )
    assert r.status_code == 403, r.text
    assert "administrator" in r.json()["detail"]


def test_the_admin_uses_backend_only_models_and_hidden_ones_run_when_named(access_server: Server) -> None:
    r = access_server.post(
        "/analyze", {"text": "hi there", "model_id": "open-admin", "options": FAST}, **_as(ADMIN)
    )
    assert r.status_code == 200, r.text
    hidden = access_server.post("/api/v1/tokenize", {"text": "hi", "model_id": "open-hidden"}, **_as(ALICE))
    assert hidden.status_code == 200 and hidden.json()["model_id"] == "open-hidden"
    unlisted = access_server.post(
        "/api/slim/send_message", {"messages": CHAT, "model_group": "unlisted", "max_tokens": 2}, **_as(ALICE)
    )
    assert unlisted.status_code == 200 and unlisted.json()["model_id"] == "unlisted-l2"


def test_websocket_refuses_backend_only_models_to_other_keys(access_server: Server) -> None:
    with connect(f"{access_server.ws_url}?api_key={ALICE}", open_timeout=30) as ws:
        for frame in (
            {"type": "analyze", "text": "hi", "model_id": "open-admin", "client_request_id": "a"},
            {
                "type": "generate",
                "text": "hi",
                "options": {"model_id": "secret-l1"},
                "client_request_id": "g",
            },
            {"type": "switch_model_grouped", "model_id": "secret-l1", "client_request_id": "s"},
        ):
            ws.send(json.dumps(frame))
            err = recv_until(ws, lambda m, c=frame["client_request_id"]: m.get("client_request_id") == c)[-1]
            assert err["type"] == "error" and err["code"] == 403, err


def test_hidden_ids_answer_like_unknown_ones_and_never_leak(access_server: Server) -> None:
    """Hidden (visible: false) and backend_only ids appear nowhere a non-admin key or an anonymous probe looks:
    not-found answers, /health, /metrics labels, broadcasts and the current model of a new connection."""
    hidden = ("secret", "unlisted", "open-hidden", "open-admin")
    unknown = access_server.get("/api/slim/models/nope/layers", **_as(ALICE))
    assert unknown.status_code == 404
    for name in hidden:
        for path in (f"/api/slim/models/{name}/layers", f"/api/v2/models/{name}/info"):
            r = access_server.get(path, **_as(ALICE))
            if path.endswith("/info") and name == "open-hidden":
                continue  # a hidden model runs (and is described) when named; only listings leave it out
            assert r.status_code == 404, (path, r.status_code, r.text)
            assert r.json()["detail"].startswith("unknown") and "administrator" not in r.text
    assert access_server.get("/api/slim/models/secret/layers", **_as(ADMIN)).status_code == 200
    with (
        connect(f"{access_server.ws_url}?api_key={ALICE}", open_timeout=30) as alice,
        connect(f"{access_server.ws_url}?api_key={ADMIN}", open_timeout=30) as admin,
    ):
        r = access_server.post(
            "/analyze", {"text": "hi there", "model_id": "secret-l1", "options": FAST}, **_as(ADMIN)
        )
        assert r.status_code == 200, r.text
        rid = r.json()["request_id"]
        seen = recv_until(
            admin, lambda m: m["type"] == "group_switch_status" and m["status"] == "completed", timeout=120
        )
        assert any(m.get("group_id") == "secret" for m in seen)
        assert wait_job(access_server, rid, _as(ADMIN)["headers"])["status"] == "completed"
        alice.send(json.dumps({"type": "ping", "client_request_id": "end"}))
        heard = recv_until(alice, lambda m: m.get("client_request_id") == "end")
        assert not [m for m in heard if m["type"] == "group_switch_status"], heard
        health = access_server.get("/health").text
        metrics = access_server.get("/metrics", **_as(ALICE)).text
        listing = access_server.get("/api/v2/models", **_as(ALICE)).text
        for name in hidden:
            assert name not in health and f'"{name}"' not in metrics and name not in listing, name
    switched = access_server.post("/api/v2/models/switch", {"model_id": "unlisted-l2"}, **_as(ADMIN))
    assert switched.status_code == 200, switched.text
    try:
        with connect(f"{access_server.ws_url}?api_key={ALICE}", open_timeout=30) as alice:
            hello = json.loads(alice.recv(timeout=30))
        assert hello["type"] == "connection_established" and "unlisted" not in json.dumps(hello)
        assert "unlisted" not in access_server.get("/health").text
    finally:
        back = access_server.post("/api/v2/models/switch", {"model_id": "open-l1"}, **_as(ADMIN))
        assert back.status_code == 200, back.text
