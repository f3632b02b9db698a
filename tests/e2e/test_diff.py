"""`POST /api/v1/diff` end to end on tiny models: the explanation of A − B and of each side, checked against
extract and describe, and every refusal (a zero difference, positions outside the input, sides on another layer
or group, bad bodies)."""

from __future__ import annotations

import pytest
from e2e_helpers import Server

pytestmark = pytest.mark.e2e

A_TEXT = "The capital of France is Paris."
B_TEXT = "The capital of Italy is Rome."
OPTS = {"calculate_token_salience": False, "optimize_explanations_config": {"best_of_k": 2}}


def test_diff_explains_the_difference_and_each_side(tiny_server: Server) -> None:
    r = tiny_server.post(
        "/api/v1/diff",
        {"a": {"text": A_TEXT, "position": -2}, "b": {"text": B_TEXT, "position": -2}, "options": OPTS},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == "tiny-a-l1" and body["request_id"]
    ea = tiny_server.post("/api/v1/extract", {"text": A_TEXT, "positions": [-2]}).json()
    eb = tiny_server.post("/api/v1/extract", {"text": B_TEXT, "positions": [-2]}).json()
    va, vb = ea["activations"][0], eb["activations"][0]
    d = [x - y for x, y in zip(va, vb, strict=True)]
    assert body["difference"]["norm"] == pytest.approx(sum(x * x for x in d) ** 0.5, rel=1e-4)
    described = tiny_server.post("/api/v1/describe", {"vectors": [d], "options": OPTS}).json()["results"][0]
    assert body["difference"]["explanation"] == described["explanation"]
    assert body["difference"]["mse"] == pytest.approx(described["mse"], rel=1e-3)
    for side, ext in (("a", ea), ("b", eb)):
        s = body[side]
        assert s["position"] == ext["tokens"][0]["position"] and s["token_id"] == ext["tokens"][0]["token_id"]
        assert s["norm"] == pytest.approx(ext["tokens"][0]["norm"], rel=1e-5) and s["model_id"] == "tiny-a-l1"
        assert isinstance(s["explanation"], str) and s["token_assumed"] is False and "mse" in s
    assert -1.0 <= body["cosine_a_b"] <= 1.0 and body["metadata"]["layer"] == 1


def test_diff_of_one_model_against_another_of_its_group_on_chat_input(tiny_server: Server) -> None:
    chat = [{"role": "user", "content": "Hello there"}]
    r = tiny_server.post(
        "/api/v1/diff",
        {"a": {"messages": chat}, "b": {"text": "Hello there", "position": 0}, "model_id": "tiny-b-l1"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["model_id"] == "tiny-b-l1" and r.json()["a"]["model_id"] == "tiny-b-l1"


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        ({"a": {"text": A_TEXT, "position": 3}, "b": {"text": A_TEXT, "position": 3}}, 400, "A − B is zero"),
        ({"a": {"text": A_TEXT, "position": 99}, "b": {"text": B_TEXT}}, 400, "position 99 is outside"),
        ({"a": {"text": A_TEXT}, "b": {"text": B_TEXT, "position": -99}}, 400, "position -99 is outside"),
        (
            {"a": {"text": A_TEXT, "model_id": "tiny-a-l1"}, "b": {"text": A_TEXT, "model_id": "tiny-a-l2"}},
            400,
            "different layers",
        ),
        (
            {"a": {"text": A_TEXT, "model_id": "tiny-a-l1"}, "b": {"text": A_TEXT, "model_id": "tiny-b-l1"}},
            400,
            "different groups",
        ),
        ({"a": {"text": A_TEXT, "model_id": "nope"}, "b": {"text": B_TEXT}}, 404, "unknown model_id"),
        (
            {"a": {"text": A_TEXT, "messages": [{"role": "user", "content": "x"}]}, "b": {"text": B_TEXT}},
            400,
            "exactly one",
        ),
        ({"a": {"text": A_TEXT}}, 400, "b"),
        (
            {
                "a": {"text": A_TEXT},
                "b": {"text": B_TEXT},
                "options": {"steer": {"direction": {"text": "x"}, "alpha": 1}},
            },
            400,
            "steer does not apply",
        ),
        ({"a": {"text": A_TEXT}, "b": {"text": B_TEXT}, "options": {"no_kl": False}}, 400, "no context"),
    ],
)
def test_diff_refusals(tiny_server: Server, body: dict, code: int, fragment: str) -> None:
    r = tiny_server.post("/api/v1/diff", body)
    assert r.status_code == code and fragment in r.text, r.text
