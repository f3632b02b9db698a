"""Generation end to end on tiny models: WebSocket `generate` (queued, tokens, generation_complete), REST
`POST /generate` with Server-Sent Events (live, late and replayed), cancellation mid-stream, `generate_and_analyze`,
and the errors."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from e2e_helpers import FAST, Server, recv_until

pytestmark = pytest.mark.e2e

TERMINAL = ("generation_complete", "error", "request_cancelled")
LONG = {"max_new_tokens": 4096, "stop_at_end_of_turn": False, "temperature": 1.0}


def _send(ws: Any, **msg: Any) -> None:
    ws.send(json.dumps(msg))


def sse_events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of an event stream, parsed ([DONE] kept as the string)."""
    out: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def texts_of(tokens: list[dict[str, Any]], n: int) -> list[str]:
    return ["".join(t["token"] for t in tokens if t["completion"] == c) for c in range(n)]


def check_stream(tokens: list[dict[str, Any]], done: dict[str, Any], n: int) -> None:
    """Positions count the prompt; each completion's tokens spell its text; its last one says why it ended."""
    prompt_tokens = done["prompt_tokens"]
    for c in range(n):
        mine = [t for t in tokens if t["completion"] == c]
        assert [t["position"] for t in mine] == list(range(prompt_tokens, prompt_tokens + len(mine)))
        assert all(t["finish_reason"] is None for t in mine[:-1])
        assert mine[-1]["finish_reason"] == done["finish_reasons"][c] in ("stop", "length")
        assert len(mine) == done["completion_tokens"][c]
    for text, full in zip(texts_of(tokens, n), done["completions"], strict=True):
        assert full.startswith(text) and len(full.rstrip("\ufffd")) <= len(
            text
        )  # only an unfinished character


# -- WebSocket ------------------------------------------------------------------------------------------------------
def test_ws_generate_streams_tokens_then_the_full_texts(tiny_server: Server) -> None:
    with tiny_server.ws() as ws:
        _send(
            ws,
            type="generate",
            text="Once upon a time",
            options={"max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 3, "num_completions": 2},
            client_request_id="g1",
        )
        msgs = recv_until(ws, lambda m: m["type"] in TERMINAL and m.get("client_request_id") == "g1")
    mine = [m for m in msgs if m.get("client_request_id") == "g1"]
    types = [m["type"] for m in mine]
    assert types[0] == "queued" and types[-1] == "generation_complete", types
    assert mine[0]["context"] == "generate" and mine[0]["queue_position"] >= 1
    assert "processing" in types
    rid = mine[0]["request_id"]
    assert all(m["request_id"] == rid for m in mine)
    tokens = [m for m in mine if m["type"] == "token"]
    done = mine[-1]
    assert len(done["completions"]) == 2 and done["prompt"] == "Once upon a time"
    assert done["metadata"]["model_id"] == "tiny-a-l1" and done["metadata"]["seed"] == 3
    check_stream(tokens, done, 2)
    status = tiny_server.status(rid)
    assert status["status"] == "completed" and status["kind"] == "generate"
    assert status["result"]["completions"] == done["completions"]

    # the same seed gives the same completions
    with tiny_server.ws() as ws:
        _send(
            ws,
            type="generate",
            text="Once upon a time",
            options={"max_length": 12, "temperature": 0.8, "top_p": 0.9, "seed": 3, "num_completions": 2},
            client_request_id="g2",
        )
        again = recv_until(ws, lambda m: m["type"] in TERMINAL and m.get("client_request_id") == "g2")[-1]
    assert again["completions"] == done["completions"]


def test_ws_generate_chat_with_the_seeds_model_id_in_options(tiny_server: Server) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]
    with tiny_server.ws() as ws:
        _send(
            ws,
            type="generate",
            messages=messages,
            options={"max_new_tokens": 5, "model_id": "tiny-b-l1"},
            client_request_id="chat",
        )
        done = recv_until(ws, lambda m: m["type"] in TERMINAL and m.get("client_request_id") == "chat", 180)[
            -1
        ]
    assert done["type"] == "generation_complete", done
    assert done["metadata"]["model_id"] == "tiny-b-l1"
    assert done["prompt"].rstrip().endswith("Hello, I")  # a trailing assistant message is continued


@pytest.mark.parametrize(
    ("frame", "code", "fragment"),
    [
        ({"text": "hi", "model_id": "nope"}, 404, "unknown model_id"),
        ({"text": "hi", "options": {"temperature": 5}}, 400, "temperature"),
        ({"text": "hi", "options": {"max_length": 3, "max_new_tokens": 4}}, 400, "disagree"),
        ({"text": "hi", "model_id": "tiny-a-l1", "options": {"model_id": "tiny-a-l2"}}, 400, "disagree"),
        ({"text": "hi", "options": {"num_completions": 99}}, 400, "num_completions"),
        ({"text": "hi", "options": {"bogus": 1}}, 400, "bogus"),
        ({}, 400, "exactly one of text or messages"),
    ],
)
def test_ws_generate_errors(tiny_server: Server, frame: dict[str, Any], code: int, fragment: str) -> None:
    with tiny_server.ws() as ws:
        _send(ws, type="generate", client_request_id="bad", **frame)
        err = recv_until(ws, lambda m: m["type"] == "error" and m.get("client_request_id") == "bad")[-1]
    assert err["code"] == code and fragment in err["error"], err


def test_ws_cancel_mid_stream_stops_at_the_next_token(tiny_server: Server) -> None:
    with tiny_server.ws() as ws:
        _send(ws, type="generate", text="A long story:", options=LONG, client_request_id="long")
        first = recv_until(ws, lambda m: m["type"] == "token" and m.get("client_request_id") == "long")
        rid = first[-1]["request_id"]
        recv_until(ws, lambda m: m["type"] == "token" and m["position"] >= first[-1]["position"] + 5)
        _send(ws, type="cancel_request", request_id=rid)
        msgs = recv_until(ws, lambda m: m["type"] == "request_cancelled" and m["request_id"] == rid)
        ws.send(json.dumps({"type": "ping", "client_request_id": "after"}))
        tail = recv_until(ws, lambda m: m["type"] == "pong")
    assert not [m for m in tail if m.get("request_id") == rid], "tokens after request_cancelled"
    assert msgs[-1]["client_request_id"] == "long"
    body = tiny_server.status(rid)
    assert body["status"] == "cancelled" and body["result"] is None
    assert 5 <= body["progress"]["generated_tokens"] < 4096


# -- REST and Server-Sent Events ------------------------------------------------------------------------------------
def test_rest_generate_then_stream_replays_every_token(tiny_server: Server) -> None:
    r = tiny_server.post(
        "/generate", {"text": "The sea", "options": {"max_new_tokens": 8, "num_completions": 2}}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "queued" and body["queue_size"] >= 1
    rid = body["request_id"]
    done = tiny_server.wait(rid)
    assert done["status"] == "completed"
    with httpx.stream("GET", f"{tiny_server.url}/generate/{rid}/stream", timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]" and events[-2]["type"] == "generation_complete"
    tokens = [e for e in events[:-1] if e["type"] == "token"]
    assert all(e["request_id"] == rid for e in events[:-1])
    check_stream(tokens, events[-2], 2)
    assert texts_of(tokens, 2) == ["".join(t) for t in done["result"]["token_texts"]]
    assert [[t["token_id"] for t in tokens if t["completion"] == c] for c in range(2)] == done["result"][
        "token_ids"
    ]


def test_post_generate_stream_true_answers_with_the_live_stream(tiny_server: Server) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me"}], "options": {"max_new_tokens": 6}}
    with httpx.stream("POST", f"{tiny_server.url}/generate?stream=true", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    types = [e if isinstance(e, str) else e["type"] for e in events]
    assert types[0] == "queued" and "token" in types and types[-2:] == ["generation_complete", "[DONE]"]
    check_stream([e for e in events[:-1] if e["type"] == "token"], events[-2], 1)


def test_a_late_stream_gets_every_token_and_a_cancel_ends_it(tiny_server: Server) -> None:
    rid = tiny_server.post("/generate", {"text": "Late", "options": LONG}).json()["request_id"]
    tiny_server.wait(rid, until=lambda b: (b["progress"] or {}).get("generated_tokens", 0) >= 20)
    events: list[Any] = []

    def read() -> None:
        with httpx.stream("GET", f"{tiny_server.url}/generate/{rid}/stream", timeout=120) as resp:
            events.extend(sse_events(resp))

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(1.0)
    r = tiny_server.post(f"/cancel/{rid}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    reader.join(60)
    assert not reader.is_alive()
    tokens = [e for e in events if isinstance(e, dict) and e["type"] == "token"]
    assert events[-1] == "[DONE]" and events[-2]["type"] == "request_cancelled"
    start = tokens[0]["position"]
    assert [t["position"] for t in tokens] == list(range(start, start + len(tokens))) and len(tokens) >= 20
    assert tiny_server.status(rid)["progress"]["generated_tokens"] == len(tokens)
    assert tiny_server.post(f"/cancel/{rid}").status_code == 409


def test_rest_generate_errors(tiny_server: Server) -> None:
    assert tiny_server.post("/generate", {"text": "x", "model_id": "nope"}).status_code == 404
    r = tiny_server.post("/generate", {"text": "x", "options": {"top_p": 0}})
    assert r.status_code == 400 and "top_p" in r.json()["detail"]
    assert tiny_server.get("/generate/no-such-id/stream").status_code == 404
    analysis = tiny_server.analyze("not a generation")
    r = tiny_server.get(f"/generate/{analysis}/stream")
    assert r.status_code == 400 and "not a generation" in r.json()["detail"]
    r = tiny_server.post("/generate", {"text": "x" * 20001})
    assert r.status_code == 400 and "MAX_TEXT_LENGTH" in r.json()["detail"]


# -- generate_and_analyze -------------------------------------------------------------------------------------------
def test_generate_and_analyze_analyses_prompt_plus_completion(tiny_server: Server) -> None:
    with tiny_server.ws() as ws:
        _send(
            ws,
            type="generate_and_analyze",
            generation={
                "text": "The capital of France",
                "options": {"max_new_tokens": 6, "num_completions": 3},
            },
            analysis={"options": FAST, "use_generated_completion": True},
            client_request_id="chain",
        )
        msgs = recv_until(
            ws, lambda m: m["type"] in ("result", "error") and m.get("client_request_id") == "chain"
        )
    gen_done = next(m for m in msgs if m["type"] == "generation_complete")
    assert gen_done["client_request_id"] == "chain_gen" and len(gen_done["completions"]) == 1
    queued = [m for m in msgs if m["type"] == "queued"]
    assert [q["client_request_id"] for q in queued] == ["chain_gen", "chain"]
    assert [q["context"] for q in queued] == ["generate", "analysis"]
    result = msgs[-1]
    assert result["type"] == "result", result
    analysed = "".join(row["token"] for row in result["tokens"])
    assert analysed.endswith(gen_done["completions"][0].rstrip("\ufffd")[-5:])
    assert analysed.startswith("The capital of France")
    assert msgs.index(gen_done) < msgs.index(queued[1])  # the analysis waited for the generation


def test_generate_and_analyze_cancelled_before_its_analysis(tiny_server: Server) -> None:
    with tiny_server.ws() as ws:
        _send(
            ws,
            type="generate_and_analyze",
            generation={"text": "Slow", "options": LONG},
            analysis={"options": FAST},
            client_request_id="c2",
        )
        recv_until(ws, lambda m: m["type"] == "token" and m.get("client_request_id") == "c2_gen")
        _send(ws, type="cancel_request", client_request_id="c2")
        msgs = recv_until(
            ws, lambda m: m["type"] == "request_cancelled" and m.get("client_request_id") == "c2"
        )
        _send(ws, type="ping")
        tail = recv_until(ws, lambda m: m["type"] == "pong")
    gen_cancel = next(
        m for m in msgs if m["type"] == "request_cancelled" and m["client_request_id"] == "c2_gen"
    )
    assert tiny_server.status(gen_cancel["request_id"])["status"] == "cancelled"
    assert msgs[-1]["generation_request_id"] == gen_cancel["request_id"] and msgs[-1]["request_id"] is None
    assert not [m for m in tail if m.get("client_request_id") == "c2" and m["type"] == "queued"]


def test_generate_and_analyze_refuses_bad_analysis_options_before_generating(tiny_server: Server) -> None:
    with tiny_server.ws() as ws:
        _send(
            ws,
            type="generate_and_analyze",
            generation={"text": "x", "options": {"max_new_tokens": 2}},
            analysis={"options": {"optimize_explanations_config": {"best_of_k": 999}}},
            client_request_id="c3",
        )
        msgs = recv_until(
            ws, lambda m: m["type"] in ("error", "queued") and m.get("client_request_id") == "c3"
        )
    assert msgs[-1]["type"] == "error" and "best_of_k" in msgs[-1]["error"]
