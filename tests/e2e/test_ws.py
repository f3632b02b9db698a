"""The WebSocket protocol over a real connection to a server process on tiny models."""

from __future__ import annotations

import json

import pytest
from e2e_helpers import FAST, Server, recv_until

pytestmark = pytest.mark.e2e

LONG_TEXT = " ".join(f"word{i}" for i in range(120))


def _send(ws, **msg) -> None:  # type: ignore[no-untyped-def]
    ws.send(json.dumps(msg))


def test_analyze_lifecycle_echoes_client_request_id(tiny_server: Server) -> None:
    with tiny_server.ws() as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "connection_established" and hello["current_model"] == "tiny-a-l1"
        _send(
            ws,
            type="analyze",
            text="one two three four five six",
            client_request_id="c1",
            options={**FAST, "batch_size": 2},
        )
        msgs = recv_until(ws, lambda m: m["type"] in ("result", "error"))
    job_msgs = [m for m in msgs if m["type"] != "queue_update"]
    types = [m["type"] for m in job_msgs if m["type"] != "connection_established"]
    assert types[0] == "queued" and types[-1] == "result", types
    queued = next(m for m in job_msgs if m["type"] == "queued")
    assert queued["context"] == "analysis" and queued["queue_position"] >= 1 and queued["queue_size"] >= 1
    rid = queued["request_id"]
    for m in job_msgs[1:]:
        assert m["request_id"] == rid and m["client_request_id"] == "c1", m
    chunks = [m for m in job_msgs if m["type"] == "processing" and m["stage"] == "explanation_generation"]
    n = chunks[0]["num_batches"]
    assert n >= 3 and [m["batch_idx"] for m in chunks] == list(range(n))
    result = job_msgs[-1]
    n_tokens = len(result["tokens"])
    assert n_tokens >= 6 and result["metadata"]["model_id"] == "tiny-a-l1"
    assert all(
        m["total_positions"] == n_tokens and m["message"].startswith("Processing batch") for m in chunks
    )
    assert [m["done_positions"] for m in chunks] == sorted(m["done_positions"] for m in chunks)
    assert {"token", "explanation", "position"} <= set(result["tokens"][0])
    assert tiny_server.status(rid)["status"] == "completed"


def test_malformed_messages_get_errors_and_the_connection_stays(tiny_server: Server) -> None:
    bad_frames = [
        "not json",
        json.dumps([1, 2]),
        json.dumps({"no": "type"}),
        json.dumps({"type": "nope", "client_request_id": "x1"}),
        json.dumps({"type": "analyze", "client_request_id": "x2"}),
        json.dumps(
            {
                "type": "analyze",
                "text": "hi",
                "options": {"optimize_explanations_config": {"best_of_k": 0}},
                "client_request_id": "x3",
            }
        ),
        json.dumps({"type": "analyze", "text": "hi", "model_id": "nope", "client_request_id": "x4"}),
        json.dumps({"type": "cancel_request", "request_id": "nope", "client_request_id": "x5"}),
        json.dumps({"type": "switch_model_grouped", "client_request_id": "x6"}),
    ]
    with tiny_server.ws() as ws:
        for frame in bad_frames:
            ws.send(frame)
            err = recv_until(ws, lambda m: m["type"] == "error", timeout=10)[-1]
            assert err["error"], frame
        errs_crid = []
        for i in range(4, 10):
            _send(ws, type="ping", client_request_id=f"p{i}")
            pong = recv_until(ws, lambda m: m["type"] == "pong", timeout=10)[-1]
            errs_crid.append(pong["client_request_id"])
        assert errs_crid == [f"p{i}" for i in range(4, 10)]
        _send(ws, type="analyze", text="x", model_id="nope", client_request_id="x7")
        err = recv_until(ws, lambda m: m["type"] == "error", timeout=10)[-1]
        assert err["client_request_id"] == "x7" and err["code"] == 404 and "nope" in err["error"]


def test_list_groups_and_queue_updates(tiny_server: Server) -> None:
    with tiny_server.ws() as ws:
        _send(ws, type="list_model_groups", refresh=False, client_request_id="g")
        listing = recv_until(ws, lambda m: m["type"] == "model_groups_list")[-1]
        assert listing["client_request_id"] == "g"
        assert [g["group_id"] for g in listing["groups"]] == ["tiny-a", "tiny-b"]
        assert listing == listing | {
            "current_model": "tiny-a-l1",
            "current_group": "tiny-a",
            "is_switching": False,
        }
        updates = recv_until(ws, lambda m: m["type"] == "queue_update", timeout=5)
        update = updates[-1]
        assert {"queue_size", "queued_requests", "processing_requests", "total_active", "queued_ids"} <= set(
            update
        )
        assert update["total_active"] == update["queued_requests"] + update["processing_requests"]


def test_cancel_over_websocket_and_own_queue_positions(tiny_server: Server) -> None:
    slow = {**FAST, "batch_size": 2}
    with tiny_server.ws() as ws:
        for i in range(4):  # MAX_ACTIVE_JOBS=3: the fourth waits
            _send(ws, type="analyze", text=LONG_TEXT, options=slow, client_request_id=f"j{i}")
        queued = {}
        while len(queued) < 4:
            m = recv_until(ws, lambda m: m["type"] == "queued")[-1]
            queued[m["client_request_id"]] = m["request_id"]
        waiting = queued["j3"]
        update = recv_until(
            ws, lambda m: m["type"] == "queue_update" and waiting in m["queued_ids"], timeout=10
        )[-1]
        assert update["queue_positions"][waiting] >= 1
        assert set(update["queued_ids"]) <= set(queued.values())  # only this connection's ids

        _send(ws, type="cancel_request", request_id=waiting)
        m = recv_until(ws, lambda m: m["type"] == "request_cancelled" and m["request_id"] == waiting)[-1]
        assert m["client_request_id"] == "j3"
        # a running one, by interrupt (an alias) and by client_request_id
        recv_until(
            ws,
            lambda m: (
                m["type"] == "processing" and m["request_id"] == queued["j0"] and m["done_positions"] > 0
            ),
        )
        _send(ws, type="interrupt", request_id=queued["j0"])
        _send(ws, type="cancel_request", client_request_id="j1")
        _send(ws, type="cancel_request", client_request_id="j2")
        got = recv_until(ws, lambda m: m["type"] == "request_cancelled" and m["client_request_id"] == "j2")
        cancelled = {m["client_request_id"] for m in got if m["type"] == "request_cancelled"}
        assert cancelled == {"j0", "j1", "j2"}
        assert not [m for m in got if m["type"] == "result"]
    for rid in queued.values():
        body = tiny_server.status(rid)
        assert body["status"] == "cancelled" and body["result"] is None


def test_finished_jobs_outlive_the_connection_and_subscribe_picks_them_up(tiny_server: Server) -> None:
    with tiny_server.ws() as ws:
        _send(ws, type="analyze", text="picked up later", options=FAST, client_request_id="later")
        rid = recv_until(ws, lambda m: m["type"] == "queued")[-1]["request_id"]
        recv_until(
            ws, lambda m: m["type"] == "result"
        )  # a closed connection's unfinished jobs are cancelled: nobody is left to read them
    done = tiny_server.wait(rid)
    assert done["status"] == "completed"
    with tiny_server.ws() as ws:
        _send(ws, type="subscribe", request_id=rid)
        got = recv_until(ws, lambda m: m["type"] == "result")
        assert got[-1]["request_id"] == rid and got[-1]["client_request_id"] == "later"
        assert got[-1]["tokens"] == done["result"]["tokens"]


def test_a_burst_of_frames_from_a_prompt_reader_is_answered_in_full(tiny_server: Server) -> None:
    """3,000 frames sent at once (more than a connection's outbox holds) all get their answers: the server stops
    reading while the outbox is full instead of dropping a client that reads as fast as it can."""
    import threading

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    n = 3000
    pongs: list[str] = []
    closed: list[object] = []
    with connect(tiny_server.ws_url, open_timeout=30, max_size=None, max_queue=None) as ws:

        def read() -> None:
            try:
                while len(pongs) < n:
                    msg = json.loads(ws.recv(timeout=60))
                    if msg["type"] == "pong":
                        pongs.append(msg["client_request_id"])
            except (ConnectionClosed, TimeoutError) as exc:
                closed.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for i in range(n):
            ws.send(json.dumps({"type": "ping", "client_request_id": f"b{i}"}))
        reader.join(120)
    assert not closed, closed
    assert pongs == [f"b{i}" for i in range(n)]


def test_invalid_utf8_frames_get_an_error_without_a_traceback(tiny_server: Server) -> None:
    """A text frame that is not UTF-8 is a malformed frame like any other: an `error`, the connection stays, and
    the log gets no traceback (uvicorn alone logs one per frame)."""
    before = tiny_server.log_path.read_text(errors="replace").count("Traceback")
    with tiny_server.ws() as ws:
        for i in range(3):
            ws.send(b'{"type": "ping", "client_request_id": "\xff\xfe"}', text=True)
            err = recv_until(ws, lambda m: m["type"] == "error", timeout=10)[-1]
            assert "not valid UTF-8" in err["error"] and err["code"] == 400
            tag = f"after{i}"
            _send(ws, type="ping", client_request_id=tag)
            recv_until(ws, lambda m, tag=tag: m.get("client_request_id") == tag, timeout=10)
    after = tiny_server.log_path.read_text(errors="replace").count("Traceback")
    assert after == before, tiny_server.log()[-3000:]
