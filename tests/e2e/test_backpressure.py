"""Backpressure and limits over a real server process: a full queue, the per-client cap, text, option, body and
WebSocket message limits, REQUEST_TIMEOUT, and cancellation when a WebSocket closes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import FAST, Server
from security_support import API_KEYS, auth, base_env, next_of, recv_json, usable, wait_job, ws_connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.e2e

SLOW = {**FAST, "batch_size": 2}  # many small chunks: a job that keeps its worker busy for a while


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_groups: Path) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("backpressure")
    env = base_env(
        tiny_groups,
        workdir,
        API_KEYS=API_KEYS,
        RATE_LIMIT_PER_MINUTE="0",
        MAX_QUEUE_SIZE="4",
        MAX_JOBS_PER_CLIENT="3",
        MAX_ACTIVE_JOBS="1",
        MAX_TEXT_LENGTH="5000",
        MAX_REQUEST_BYTES="8192",
        MAX_WS_MESSAGE_BYTES="8192",
        REQUEST_TIMEOUT="4",
    )
    s = Server(workdir, env, name="backpressure").start()
    yield s
    s.stop()


def submit(server: Server, who: str, text: str, options: dict[str, Any] | None = None) -> httpx.Response:
    return server.post(
        "/analyze", {"text": text, "options": SLOW if options is None else options}, headers=auth(who)
    )


def cancel_all(server: Server, jobs: list[tuple[str, str]]) -> None:
    for who, rid in jobs:
        server.post(f"/cancel/{rid}", headers=auth(who))


def test_a_full_queue_and_a_busy_client_get_429_with_retry_after(server: Server) -> None:
    jobs: list[tuple[str, str]] = []
    try:
        for _ in range(3):
            r = submit(server, "alice", words(300))
            assert r.status_code == 200, r.text
            jobs.append(("alice", r.json()["request_id"]))
        busy = submit(server, "alice", "one more")
        assert busy.status_code == 429 and "MAX_JOBS_PER_CLIENT" in busy.json()["detail"]
        assert int(busy.headers["retry-after"]) >= 1
        r = submit(server, "bob", words(300))
        jobs.append(("bob", r.json()["request_id"]))
        full = submit(server, "bob", "no room")
        assert full.status_code == 429 and "MAX_QUEUE_SIZE" in full.json()["detail"]
        assert 1 <= int(full.headers["retry-after"]) <= 60
        with ws_connect(server, "admin") as ws:
            ws.send(json.dumps({"type": "analyze", "text": "no room here", "client_request_id": "full"}))
            err = next_of(ws, {"queued", "error"})
            assert err["type"] == "error" and err["code"] == 429 and err["kind"] == "queue_full", err
            assert err["retry_after"] >= 1 and err["client_request_id"] == "full"
            assert usable(ws)
    finally:
        cancel_all(server, jobs)
    assert submit(server, "bob", "room again", FAST).status_code == 200
    reasons = server.get("/metrics", params={"format": "json"}, headers=auth("admin")).json()[
        "rejected_requests"
    ]
    assert reasons["client_busy"] >= 1 and reasons["queue_full"] >= 2


BAD_ANALYSES: list[tuple[dict[str, Any], str]] = [
    ({"text": "x" * 5001}, "MAX_TEXT_LENGTH"),
    ({"text": "   "}, "empty"),
    ({"text": "x", "options": {"optimize_explanations_config": {"best_of_k": 0}}}, "best_of_k"),
    ({"text": "x", "options": {"optimize_explanations_config": {"best_of_k": 65}}}, "best_of_k"),
    ({"text": "x", "options": {"temperature": 2.5}}, "temperature"),
    ({"text": "x", "options": {"temperature": -1}}, "temperature"),
    ({"text": "x", "options": {"batch_size": 0}}, "batch_size"),
    ({"text": "x", "options": {"batch_size": 10**9}}, "batch_size"),
    ({"text": "x", "options": {"seed": -1}}, "seed"),
    ({"text": "x", "options": {"no_such_option": True}}, "no_such_option"),
    ({"text": "x", "model_id": "no-such-model"}, "no-such-model"),
]
BAD_GENERATIONS: list[tuple[dict[str, Any], str]] = [
    ({"text": "x", "options": {"max_new_tokens": 0}}, "max_new_tokens"),
    ({"text": "x", "options": {"max_new_tokens": 10**6}}, "max_new_tokens"),
    ({"text": "x", "options": {"temperature": 9}}, "temperature"),
]


def test_out_of_range_input_is_refused_on_both_transports(server: Server) -> None:
    cases = [("/analyze", "analyze", body, needle) for body, needle in BAD_ANALYSES]
    generate = server.post("/generate", {}, headers=auth("admin"))
    if generate.status_code != 404:  # generation is served: its limits too
        cases += [("/generate", "generate", body, needle) for body, needle in BAD_GENERATIONS]
    with ws_connect(server, "admin") as ws:
        for path, kind, body, needle in cases:
            r = server.post(path, body, headers=auth("admin"))
            assert r.status_code in (400, 404), (body, r.status_code, r.text)
            assert needle in r.text, (body, r.text)
            ws.send(json.dumps({"type": kind, **body, "client_request_id": needle}))
            err = next_of(ws, {"error", "queued"})
            assert err["type"] == "error" and err["code"] in (400, 404) and needle in err["error"], (
                body,
                err,
            )
        assert usable(ws)


def test_oversized_bodies_and_messages(server: Server) -> None:
    big = {"text": "x" * 9000}
    declared = server.post("/analyze", big, headers=auth("admin"))
    assert declared.status_code == 413 and "MAX_REQUEST_BYTES" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(20):
            yield b"y" * 1000
        yield b'"}'

    streamed = httpx.post(
        server.url + "/analyze",
        content=chunks(),
        headers={**auth("admin"), "content-type": "application/json"},
        timeout=30,
    )
    assert streamed.status_code == 413, streamed.text
    with ws_connect(server, "admin") as ws:
        recv_json(ws)
        ws.send(json.dumps({"type": "analyze", "text": "z" * 9000, "client_request_id": "big"}))
        err = next_of(ws, {"error", "queued"})
        assert err["code"] == 413 and "MAX_WS_MESSAGE_BYTES" in err["error"], err
        assert usable(ws)
    with ws_connect(server, "admin") as ws:  # far beyond the limit: the protocol layer closes (1009)
        ws.send("q" * 100_000)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert (
        server.post("/analyze", {"text": "still serving", "options": FAST}, headers=auth("admin")).status_code
        == 200
    )


def test_request_timeout_fails_a_job_that_runs_too_long(server: Server) -> None:
    t0 = time.time()
    rid = submit(server, "bob", words(600)).json()["request_id"]  # about 2,500 positions in chunks of 2
    done = wait_job(server, rid, auth("bob"), timeout=120)
    assert done["status"] == "failed", done
    assert "longer than REQUEST_TIMEOUT (4 s)" in done["error"], done
    assert time.time() - t0 < 60
    after = submit(server, "bob", "and the worker serves the next one", FAST).json()["request_id"]
    assert wait_job(server, after, auth("bob"))["status"] == "completed"


def test_closing_a_websocket_cancels_its_unfinished_jobs(server: Server) -> None:
    with ws_connect(server, "alice") as ws:
        ws.send(
            json.dumps({"type": "analyze", "text": "quick", "options": FAST, "client_request_id": "quick"})
        )
        quick = next_of(ws, {"result", "error"})
        assert quick["type"] == "result"
        ws.send(
            json.dumps({"type": "analyze", "text": words(300), "options": SLOW, "client_request_id": "long"})
        )
        long_id = next_of(ws, {"queued"})["request_id"]
        ws.send(
            json.dumps({"type": "analyze", "text": "waits", "options": FAST, "client_request_id": "waits"})
        )
        waiting_id = next_of(ws, {"queued"})["request_id"]
        while True:
            msg = next_of(ws, {"processing"})
            if msg["request_id"] == long_id and msg.get("done_positions"):
                break
    for rid in (long_id, waiting_id):
        done = wait_job(server, rid, auth("alice"), timeout=30)
        assert done["status"] == "cancelled" and "WebSocket" in done["error"], done
    kept = server.get(f"/status/{quick['request_id']}", headers=auth("alice")).json()
    assert kept["status"] == "completed" and kept["result"]["tokens"]


def test_a_job_followed_elsewhere_survives_one_connection_closing(server: Server) -> None:
    with ws_connect(server, "alice") as watcher:
        with ws_connect(server, "alice") as ws:
            ws.send(json.dumps({"type": "analyze", "text": words(200), "options": SLOW}))
            rid = next_of(ws, {"queued"})["request_id"]
            watcher.send(json.dumps({"type": "subscribe", "request_id": rid}))
            assert next_of(watcher, {"status"})["request_id"] == rid
        time.sleep(0.5)
        status = server.get(f"/status/{rid}", headers=auth("alice")).json()["status"]
        assert status in ("queued", "processing"), status
    done = wait_job(server, rid, auth("alice"), timeout=30)
    assert done["status"] == "cancelled"  # the last follower left
    rest = submit(server, "alice", "over REST", FAST).json()["request_id"]  # REST jobs have no connection
    assert wait_job(server, rest, auth("alice"))["status"] == "completed"
