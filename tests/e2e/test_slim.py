"""The slim API (`/api/slim`) over HTTP on tiny models: generate, analyze, send_message (with prefill), status
shapes, the model catalogue, and its 404/400 errors (never a 500)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from e2e_helpers import Server

pytestmark = pytest.mark.e2e

CHAT = [{"role": "user", "content": "The capital of France is"}]


def slim_wait(server: Server, rid: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = server.get(f"/api/slim/status/{rid}").json()
        if body["status"] in ("completed", "failed", "cancelled"):
            return dict(body)
        time.sleep(0.05)
    raise AssertionError(f"{rid} did not finish")


def test_slim_generate(tiny_server: Server) -> None:
    r = tiny_server.post(
        "/api/slim/generate",
        {"messages": CHAT, "model_group": "tiny-a", "n_continuations": 2, "n_tokens": 5, "temperature": 0.7},
    )
    assert r.status_code == 200, r.text
    ack = r.json()
    assert ack["status"] == "queued" and ack["model_id"] == "tiny-a-l1" and ack["model_group"] == "tiny-a"
    done = slim_wait(tiny_server, ack["request_id"])
    assert done["status"] == "completed" and done["processing_time"] > 0 and done["error"] is None
    result = done["result"]
    assert len(result["continuations"]) == 2 and all(isinstance(c, str) for c in result["continuations"])
    assert all(n <= 5 for n in result["completion_tokens"]) and result["model_id"] == "tiny-a-l1"
    assert set(result["finish_reasons"]) <= {"stop", "length"}
    main = tiny_server.status(ack["request_id"])  # the same job through the main API
    assert (
        main["result"]["completions"] == result["continuations"] and main["result"]["metadata"]["seed"] == 42
    )


def test_slim_send_message_continues_a_prefill(tiny_server: Server) -> None:
    plain = tiny_server.post(
        "/api/slim/send_message", {"messages": CHAT, "model_group": "tiny-a", "max_tokens": 6}
    ).json()
    prefilled = tiny_server.post(
        "/api/slim/send_message",
        {
            "messages": [*CHAT, {"role": "assistant", "content": "Paris, of"}],
            "model_group": "tiny-a",
            "model_id": "tiny-a-l2",
            "max_tokens": 6,
        },
    ).json()
    a, b = slim_wait(tiny_server, plain["request_id"]), slim_wait(tiny_server, prefilled["request_id"])
    assert a["result"]["prefill"] == "" and a["result"]["response"] == a["result"]["continuation"]
    assert b["result"]["prefill"] == "Paris, of" and b["result"]["model_id"] == "tiny-a-l2"
    assert b["result"]["response"] == "Paris, of" + b["result"]["continuation"]
    assert b["result"]["finish_reason"] in ("stop", "length")
    prompt = tiny_server.status(prefilled["request_id"])["result"]["prompt"]
    assert prompt.endswith("Paris, of")  # continued, not replaced by a new assistant turn


def test_slim_analyze_runs_every_metric(tiny_server: Server) -> None:
    chat = [*CHAT, {"role": "assistant", "content": "Paris."}]
    ack = tiny_server.post(
        "/api/slim/analyze",
        {
            "messages": chat,
            "model_group": "tiny-a",
            "best_of_k": 1,
            "last_n_messages": 1,
            "calculate_token_salience": False,
        },
    ).json()
    done = slim_wait(tiny_server, ack["request_id"])
    assert done["status"] == "completed", done
    rows, meta = done["result"]["tokens"], done["result"]["metadata"]
    assert rows and all(r["kl_divergence"] is not None and r["mse"] is not None for r in rows)
    assert meta["seed"] == 42 and meta["best_of_k"] == 1
    assert all(r["explanation_structured"] is not None for r in rows)


def test_slim_catalogue(tiny_server: Server) -> None:
    models = tiny_server.get("/api/slim/models").json()
    assert [g["id"] for g in models["model_groups"]] == ["tiny-a", "tiny-b"]
    assert models["model_groups"][0]["default_layer"] == "tiny-a-l1" and models["current_model_id"]
    assert {"name", "description", "is_loaded"} <= set(models["model_groups"][0])
    layers = tiny_server.get("/api/slim/models/tiny-a/layers").json()
    assert layers["group_id"] == "tiny-a" and layers["default_layer"] == "tiny-a-l1"
    assert [(x["id"], x["layer"]) for x in layers["layers"]] == [("tiny-a-l1", 1), ("tiny-a-l2", 2)]
    assert {"name", "description", "is_current"} <= set(layers["layers"][0])
    by_model = tiny_server.get("/api/slim/models/tiny-b-l1/layers").json()  # a model id names its group
    assert by_model["group_id"] == "tiny-b"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "fragment"),
    [
        ("get", "/api/slim/models/nope/layers", None, 404, "nope"),
        ("get", "/api/slim/status/nope", None, 404, "unknown request_id"),
        ("post", "/api/slim/generate", {"messages": CHAT, "model_group": "nope"}, 404, "unknown group_id"),
        (
            "post",
            "/api/slim/analyze",
            {"messages": CHAT, "model_group": "tiny-a", "model_id": "nope"},
            404,
            "unknown model_id",
        ),
        (
            "post",
            "/api/slim/send_message",
            {"messages": CHAT, "model_group": "tiny-a", "model_id": "tiny-b-l1"},
            400,
            "not in group tiny-a",
        ),
        (
            "post",
            "/api/slim/generate",
            {"messages": CHAT, "model_group": "tiny-a", "n_tokens": 513},
            400,
            "n_tokens",
        ),
        (
            "post",
            "/api/slim/analyze",
            {"messages": CHAT, "model_group": "tiny-a", "best_of_k": 33},
            400,
            "best_of_k",
        ),
        ("post", "/api/slim/send_message", {"messages": [], "model_group": "tiny-a"}, 400, "messages"),
        (
            "post",
            "/api/slim/generate",
            {"messages": CHAT, "model_group": "tiny-a", "temperature": 0.05},
            400,
            "temperature",
        ),
    ],
)
def test_slim_errors(
    tiny_server: Server, method: str, path: str, body: dict | None, status: int, fragment: str
) -> None:
    r = tiny_server.get(path) if method == "get" else tiny_server.post(path, body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]
