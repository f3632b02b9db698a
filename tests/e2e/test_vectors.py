"""The vector endpoints (`/api/v1/describe`, `score`, `extract`, `tokenize`) over HTTP on tiny models: round trips
between them, both vector encodings, limits and the errors (bad vectors, dimension mismatch, unknown model)."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest
from e2e_helpers import Server

pytestmark = pytest.mark.e2e

TEXT = "The capital of France is Paris."
D = 64  # the tiny models' width
OPTS = {"optimize_explanations_config": {"best_of_k": 2}, "calculate_token_salience": False}


def b64(rows: list[list[float]]) -> dict:
    flat = [x for r in rows for x in r]
    return {"data": base64.b64encode(struct.pack(f"<{len(flat)}f", *flat)).decode(), "shape": [len(rows), D]}


def test_tokenize_then_extract_then_describe_matches_the_analysis(tiny_server: Server) -> None:
    tok = tiny_server.post("/api/v1/tokenize", {"text": TEXT})
    assert tok.status_code == 200, tok.text
    tokens = tok.json()["tokens"]
    assert tok.json()["n_tokens"] == len(tokens) >= 7 and tok.json()["model_id"] == "tiny-a-l1"

    ext = tiny_server.post("/api/v1/extract", {"text": TEXT, "positions": [-2, 1, -2]}).json()
    assert [t["position"] for t in ext["tokens"]] == [1, len(tokens) - 2]
    assert [t["token_id"] for t in ext["tokens"]] == [tokens[1]["token_id"], tokens[-2]["token_id"]]
    assert ext["layer"] == 1 and ext["d_model"] == D and len(ext["activations"][0]) == D
    b = tiny_server.post("/api/v1/extract", {"text": TEXT, "positions": [1, -2], "encoding": "base64"}).json()
    assert b["activations"]["shape"] == [2, D]
    raw = base64.b64decode(b["activations"]["data"])
    assert list(struct.unpack(f"<{2 * D}f", raw)) == pytest.approx([x for r in ext["activations"] for x in r])

    # describe the extracted vectors with their tokens: the explanations of an analysis of the same positions
    described = tiny_server.post(
        "/api/v1/describe",
        {
            "vectors": b["activations"],
            "tokens": [t["token_id"] for t in ext["tokens"]],
            "options": {**OPTS, "return_vectors": True},
            "encoding": "base64",
        },
    )
    assert described.status_code == 200, described.text
    d = described.json()
    assert [r["index"] for r in d["results"]] == [0, 1] and d["reconstructions"]["shape"] == [2, D]
    for r in d["results"]:
        assert r["token_assumed"] is False and isinstance(r["explanation"], str) and r["mse"] > 0
        assert {"relative_rmse", "cosine", "nmse", "fve", "norm"} <= set(r) and "kl_divergence" not in r
    assert d["metadata"]["reads_current_token"] is True and d["metadata"]["n_vectors"] == 2

    # score the first explanation against its vector: the same mse as describe measured
    first = d["results"][0]
    s = tiny_server.post(
        "/api/v1/score",
        {"explanation": first["explanation"], "vector": ext["activations"][0], "token": first["token_id"]},
    ).json()
    assert s["results"][0]["mse"] == pytest.approx(first["mse"], rel=0.05)
    assert s["token_id"] == first["token_id"] and s["token_assumed"] is False


def test_describe_without_tokens_and_score_several_explanations(tiny_server: Server) -> None:
    v = [[(i % 7) / 7.0 - 0.5 for i in range(D)]]
    d = tiny_server.post("/api/v1/describe", {"vectors": v, "options": OPTS}).json()
    assert d["results"][0]["token_assumed"] is True
    s = tiny_server.post(
        "/api/v1/score",
        {"explanations": ["a city", "a number"], "vector": v[0], "calculate_token_salience": True},
    ).json()
    assert [r["explanation"] for r in s["results"]] == ["a city", "a number"] and s["token_assumed"] is True
    assert all(len(r["token_salience"]) == len(r["explanation_structured"]) > 0 for r in s["results"])
    assert s["request_id"] and tiny_server.status(s["request_id"])["kind"] == "score"


def test_chat_input_and_model_choice(tiny_server: Server) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    tok = tiny_server.post("/api/v1/tokenize", {"messages": messages, "model_id": "tiny-b-l1"}).json()
    assert tok["model_id"] == "tiny-b-l1" and "Hi" in tok["prompt"]
    ext = tiny_server.post(
        "/api/v1/extract", {"messages": messages, "positions": [-1], "model_id": "tiny-a-l2"}
    )
    assert ext.status_code == 200 and ext.json()["layer"] == 2


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        (
            "/api/v1/describe",
            {"vectors": [[0.0] * 10]},
            400,
            "have 10 values but model tiny-a-l1's activations have 64",
        ),
        ("/api/v1/describe", {"vectors": {"data": "AAAA", "shape": [2, 64]}}, 400, "holds 3 bytes"),
        ("/api/v1/describe", {"vectors": [[0.0] * 64, [0.0] * 63]}, 400, "different lengths"),
        ("/api/v1/describe", {"vectors": "0,1"}, 400, "must be a list of numbers"),
        ("/api/v1/describe", {"vectors": [[0.0] * 64] * 257}, 400, "more than the limit of 256"),
        ("/api/v1/describe", {"vectors": [[0.0] * 64], "tokens": [1, 2]}, 400, "one per vector"),
        ("/api/v1/describe", {"vectors": [[0.0] * 64], "tokens": ["two words"]}, 400, "exactly one token"),
        ("/api/v1/describe", {"vectors": [[0.0] * 64], "options": {"no_kl": False}}, 400, "KL"),
        ("/api/v1/describe", {"vectors": [[0.0] * 64], "model_id": "nope"}, 404, "unknown model_id"),
        ("/api/v1/score", {"vector": [0.0] * 64}, 400, "exactly one of explanation or explanations"),
        ("/api/v1/score", {"explanation": "x", "vector": [[0.0] * 64] * 2}, 400, "score takes one"),
        ("/api/v1/score", {"explanation": "x", "vector": [0.0] * 65}, 400, "have 65 values"),
        ("/api/v1/score", {"explanation": "  ", "vector": [0.0] * 64}, 400, "empty"),
        ("/api/v1/extract", {"text": TEXT, "positions": [99]}, 400, "outside"),
        ("/api/v1/extract", {"text": TEXT, "positions": list(range(513))}, 400, "positions"),
        ("/api/v1/extract", {"text": TEXT, "encoding": "hex"}, 400, "encoding"),
        ("/api/v1/tokenize", {}, 400, "exactly one of text or messages"),
    ],
)
def test_bad_requests(tiny_server: Server, path: str, body: dict, status: int, fragment: str) -> None:
    r = tiny_server.post(path, body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"], r.json()


def test_a_dimension_mismatch_for_a_model_not_loaded_fails_its_job_with_400(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(LAZY_LOAD_MODEL="true")
    r = server.post("/api/v1/score", {"explanation": "x", "vector": [0.0] * 12, "model_id": "tiny-b-l1"})
    assert r.status_code == 400, r.text
    assert "have 12 values but this model's activations have 64" in r.json()["detail"]
    bad = server.post("/api/v1/describe", {"vectors": [[float(i) for i in range(63)] + [1e39]]})
    assert bad.status_code == 400


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/api/v1/describe", '{"vectors": [%s]}'),
        ("/api/v1/describe", '{"vectors": [[%s], [%s]]}'),
        ("/api/v1/score", '{"explanation": "x", "vector": [%s]}'),
    ],
)
def test_non_finite_json_numbers_are_refused_with_400(
    tiny_server: Server, path: str, template: str, bad: str
) -> None:
    """Python's JSON parser reads NaN and Infinity (and 1e999 as infinity); a list vector holding one is a 400
    naming the problem, as the base64 form is, never a 500."""
    row = ", ".join(["0.5"] * (D - 1) + [bad])
    body = template % ((row,) * template.count("%s"))
    r = httpx.post(
        tiny_server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert r.status_code == 400, r.text
    assert "NaN or infinite" in r.json()["detail"]
    assert tiny_server.get("/health").status_code == 200
