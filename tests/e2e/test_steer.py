"""Steering end to end on tiny models: `options.steer` on analyses (REST and WebSocket) and on describe, `steer` on
generations (WebSocket, REST with its event stream, slim), alpha 0 as exactly the unsteered result, and every
refusal (zero direction, alpha out of range, a direction of the wrong size, a position outside its input)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from e2e_helpers import Server, recv_until

pytestmark = pytest.mark.e2e

TEXT = "The capital of France is Paris."
D = 64  # the tiny models' width
OPTS = {"no_kl": True, "calculate_token_salience": False, "optimize_explanations_config": {"best_of_k": 2}}
OCEAN = {"direction": {"text": "the ocean"}, "alpha": 4.0}
TERMINAL = ("generation_complete", "error", "request_cancelled")


def _analysis(server: Server, options: dict[str, Any]) -> dict[str, Any]:
    done = server.wait(server.analyze(TEXT, options))
    assert done["status"] == "completed", done
    return dict(done["result"])


def test_alpha_zero_is_the_unsteered_analysis_and_a_steer_moves_every_activation(tiny_server: Server) -> None:
    opts = {**OPTS, "return_vectors": True}
    plain = _analysis(tiny_server, opts)
    zero = _analysis(tiny_server, {**opts, "steer": {**OCEAN, "alpha": 0}})
    assert zero["tokens"] == plain["tokens"]
    assert zero["metadata"]["steer"] == {"source": "text", "alpha": 0.0, "text": "the ocean"}
    steered = _analysis(tiny_server, {**opts, "steer": OCEAN})
    for p, s in zip(plain["tokens"], steered["tokens"], strict=True):
        a = p["activation"]
        norm_a = sum(x * x for x in a) ** 0.5
        delta = [y - x for x, y in zip(a, s["activation"], strict=True)]
        # the push is 4 × the activation's own norm, along one direction for every position
        assert sum(x * x for x in delta) ** 0.5 == pytest.approx(4.0 * norm_a, rel=1e-3)
        assert s["norm"] == pytest.approx(sum(x * x for x in s["activation"]) ** 0.5, rel=1e-4)
    first = [x / (4.0 * plain["tokens"][0]["norm"]) for x in _delta(plain, steered, 0)]
    last = [x / (4.0 * plain["tokens"][-1]["norm"]) for x in _delta(plain, steered, -1)]
    assert first == pytest.approx(last, abs=1e-3)
    assert [r["explanation"] for r in steered["tokens"]] != [r["explanation"] for r in plain["tokens"]]


def _delta(plain: dict[str, Any], steered: dict[str, Any], i: int) -> list[float]:
    return [
        y - x
        for x, y in zip(plain["tokens"][i]["activation"], steered["tokens"][i]["activation"], strict=True)
    ]


def test_ws_analyze_steers_with_another_inputs_activation(tiny_server: Server) -> None:
    steer = {"direction": {"from": {"text": "Waves crash on the beach", "position": -1}}, "alpha": 2.0}
    with tiny_server.ws() as ws:
        ws.send(
            json.dumps(
                {
                    "type": "analyze",
                    "text": TEXT,
                    "options": {**OPTS, "steer": steer},
                    "client_request_id": "s",
                }
            )
        )
        msgs = recv_until(
            ws, lambda m: m["type"] in ("result", "error") and m.get("client_request_id") == "s"
        )
    done = msgs[-1]
    assert done["type"] == "result", done
    assert done["metadata"]["steer"]["source"] == "from" and done["metadata"]["steer"]["alpha"] == 2.0
    plain = _analysis(tiny_server, OPTS)
    assert all(s["norm"] != p["norm"] for s, p in zip(done["tokens"], plain["tokens"], strict=True))


def test_describe_with_steer(tiny_server: Server) -> None:
    v = [[(i % 5) / 5.0 - 0.4 for i in range(D)]]
    plain = tiny_server.post("/api/v1/describe", {"vectors": v, "options": OPTS}).json()
    zero = tiny_server.post(
        "/api/v1/describe", {"vectors": v, "options": {**OPTS, "steer": {**OCEAN, "alpha": 0}}}
    )
    assert zero.status_code == 200, zero.text
    assert zero.json()["results"] == plain["results"]
    direction = [1.0 if i == 3 else 0.0 for i in range(D)]
    steer = {"direction": {"vector": direction}, "alpha": -1.5}
    steered = tiny_server.post("/api/v1/describe", {"vectors": v, "options": {**OPTS, "steer": steer}}).json()
    norm = sum(x * x for x in v[0]) ** 0.5
    moved = list(v[0])
    moved[3] -= 1.5 * norm
    assert steered["results"][0]["norm"] == pytest.approx(sum(x * x for x in moved) ** 0.5, rel=1e-5)
    direct = tiny_server.post("/api/v1/describe", {"vectors": [moved], "options": OPTS}).json()
    assert steered["results"][0]["explanation"] == direct["results"][0]["explanation"]
    assert steered["metadata"]["steer"] == {"source": "vector", "alpha": -1.5}


@pytest.mark.parametrize(
    ("steer", "fragment"),
    [
        ({"direction": {"vector": [0.0] * D}, "alpha": 1}, "direction is zero"),
        ({"direction": {"text": "ocean"}, "alpha": 10.5}, "less than or equal to 10"),
        ({"direction": {"text": "ocean"}, "alpha": -11}, "greater than or equal to -10"),
        ({"direction": {"text": "a", "vector": [1.0]}, "alpha": 1}, "exactly one key"),
        ({"direction": {"colour": "blue"}, "alpha": 1}, "exactly one key"),
        ({"direction": {"text": "ocean"}}, "alpha"),
        (
            {"direction": {"vector": [1.0, 2.0, 3.0]}, "alpha": 1},
            "have 3 values but this model's activations have 64",
        ),
        ({"direction": {"from": {"text": "Hi", "position": 50}}, "alpha": 1}, "outside the"),
        ({"direction": {"text": "   "}, "alpha": 1}, "non-empty"),
    ],
)
def test_bad_steers_are_refused_with_400_on_every_route(
    tiny_server: Server, steer: dict, fragment: str
) -> None:
    r = tiny_server.post("/analyze", {"text": TEXT, "options": {**OPTS, "steer": steer}})
    assert r.status_code == 400 and fragment in r.text, r.text
    with tiny_server.ws() as ws:
        ws.send(
            json.dumps(
                {
                    "type": "analyze",
                    "text": TEXT,
                    "options": {**OPTS, "steer": steer},
                    "client_request_id": "x",
                }
            )
        )
        err = recv_until(
            ws, lambda m: m["type"] in ("error", "result") and m.get("client_request_id") == "x"
        )[-1]
    assert err["type"] == "error" and fragment in err["error"], err
    d = tiny_server.post("/api/v1/describe", {"vectors": [[0.1] * D], "options": {**OPTS, "steer": steer}})
    assert d.status_code == 400 and fragment in d.text, d.text


# -- generation -------------------------------------------------------------------------------------------------------
def _generate(server: Server, options: dict[str, Any]) -> dict[str, Any]:
    with server.ws() as ws:
        ws.send(
            json.dumps(
                {"type": "generate", "text": "Once upon a time", "options": options, "client_request_id": "g"}
            )
        )
        msgs = recv_until(ws, lambda m: m["type"] in TERMINAL and m.get("client_request_id") == "g")
    assert msgs[-1]["type"] == "generation_complete", msgs[-1]
    return msgs[-1]


def test_a_strong_steer_changes_generations_the_same_way_every_time(tiny_server: Server) -> None:
    base = {"max_new_tokens": 8, "temperature": 0.0, "stop_at_end_of_turn": False}
    steer = {"direction": {"from": {"text": "Waves crash on the beach", "position": -1}}, "alpha": 8.0}
    plain = _generate(tiny_server, base)
    zero = _generate(tiny_server, {**base, "steer": {**steer, "alpha": 0}})
    assert zero["completions"] == plain["completions"]
    one = _generate(tiny_server, {**base, "steer": steer})
    two = _generate(tiny_server, {**base, "steer": steer})
    assert one["completions"] == two["completions"] != plain["completions"]
    assert one["metadata"]["steer"] == {
        "source": "from",
        "alpha": 8.0,
        "from": {"text": "Waves crash on the beach", "position": -1},
    }
    # "new" leaves the first token to the unsteered prompt
    new = _generate(tiny_server, {**base, "steer": {**steer, "positions": "new"}})
    status = [tiny_server.status(x["request_id"])["result"]["token_ids"][0] for x in (plain, new)]
    assert status[0][0] == status[1][0]


def test_rest_generate_streams_a_steered_generation(tiny_server: Server) -> None:
    body = {
        "text": "Once upon a time",
        "options": {
            "max_new_tokens": 6,
            "temperature": 0.8,
            "seed": 5,
            "steer": {"direction": {"text": "the ocean"}, "alpha": 6.0},
        },
    }
    with httpx.stream("POST", tiny_server.url + "/generate?stream=true", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    done = events[-1]
    assert done["type"] == "generation_complete" and done["metadata"]["steer"]["source"] == "text"
    tokens = "".join(e["token"] for e in events if e["type"] == "token")
    assert done["completions"][0].startswith(tokens.rstrip("\ufffd")[:1])
    again = tiny_server.post("/generate", body).json()
    assert tiny_server.wait(again["request_id"])["result"]["completions"] == done["completions"]


def test_slim_generate_takes_a_steer(tiny_server: Server) -> None:
    chat = [{"role": "user", "content": "Tell me a story"}]
    body = {"messages": chat, "model_group": "tiny-a", "n_tokens": 5, "temperature": 0.0}
    steer = {"direction": {"text": "the ocean"}, "alpha": 8.0}
    plain = tiny_server.post("/api/slim/generate", body).json()
    steered = tiny_server.post("/api/slim/generate", {**body, "steer": steer}).json()
    a = tiny_server.wait(plain["request_id"])["result"]
    b = tiny_server.wait(steered["request_id"])["result"]
    assert b["metadata"]["steer"]["alpha"] == 8.0 and "steer" not in a["metadata"]
    assert b["completions"] != a["completions"]


@pytest.mark.parametrize(
    ("steer", "fragment"),
    [
        ({"direction": {"vector": [0.0] * D}, "alpha": 1}, "direction is zero"),
        ({"direction": {"text": "ocean"}, "alpha": 12}, "less than or equal to 10"),
        ({"direction": {"text": "ocean"}, "alpha": 1, "positions": "old"}, "positions"),
        ({"direction": {"vector": [float("nan")] * D}, "alpha": 1}, "NaN or infinite"),
    ],
)
def test_bad_generation_steers_are_refused(tiny_server: Server, steer: dict, fragment: str) -> None:
    body = json.dumps({"text": "Hi", "options": {"steer": steer}})  # NaN written as JSON parsers accept it
    r = httpx.post(
        tiny_server.url + "/generate", content=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert r.status_code == 400 and fragment in r.text, r.text


def test_a_generation_steer_that_fails_on_the_model_ends_the_job_with_the_reason(tiny_server: Server) -> None:
    steer = {"direction": {"vector": [1.0, 2.0]}, "alpha": 1}
    with tiny_server.ws() as ws:
        ws.send(
            json.dumps(
                {"type": "generate", "text": "Hi", "options": {"steer": steer}, "client_request_id": "bad"}
            )
        )
        err = recv_until(ws, lambda m: m["type"] in TERMINAL and m.get("client_request_id") == "bad")[-1]
    assert err["type"] == "error" and "have 2 values" in err["error"], err
