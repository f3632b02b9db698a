"""Batch jobs over HTTP against real server processes (tiny models): submission as JSON and as JSONL (body and
multipart), progress, results as JSONL (now and followed) and Parquet, a malformed JSONL line, bad input, a
cancelled batch, the per-key limits, ownership, a restart in the middle of a batch, the Python client and
`talkative analyze --input`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import FAST, Server
from security_support import API_KEYS, auth

from talkative.client import AsyncClient, BatchItemResult, Client

pytestmark = pytest.mark.e2e

BATCHES = "/api/v1/batches"


def items(n: int, words: int = 6, prefix: str = "item") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i}", "text": " ".join(f"w{i}x{j}" for j in range(words))} for i in range(n)]


def submit(server: Server, body: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = httpx.post(server.url + BATCHES, json=body, headers=headers, timeout=60)
    assert r.status_code == 202, r.text
    return dict(r.json())


def progress(server: Server, batch_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = server.get(f"{BATCHES}/{batch_id}", headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_batch(
    server: Server,
    batch_id: str,
    until: Callable[[dict[str, Any]], bool] | None = None,
    timeout: float = 180,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    until = until or (lambda b: b["status"] in ("completed", "cancelled"))
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = progress(server, batch_id, headers)
        if until(body):
            return body
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not get there: {progress(server, batch_id, headers)}")


def results(
    server: Server, batch_id: str, query: str = "", headers: dict[str, str] | None = None
) -> list[dict]:
    r = server.get(f"{BATCHES}/{batch_id}/results{query}", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


def test_submit_progress_and_results_as_jsonl_and_parquet(tiny_server: Server) -> None:
    body = {
        "items": [
            {"id": "a", "text": "The capital of France is Paris."},
            {"id": 2, "messages": [{"role": "user", "content": "Hello there"}]},
            {"id": "seeded", "text": "One two three four.", "options": {"seed": 7}},
        ],
        "options": FAST,
    }
    accepted = submit(tiny_server, body)
    assert accepted["items"]["total"] == 3 and accepted["status"] in ("queued", "running")
    assert accepted["model_id"] == "tiny-a-l1" and accepted["options"] == FAST
    done = wait_batch(tiny_server, accepted["batch_id"])
    assert done["status"] == "completed" and done["completed_at"] is not None
    assert done["items"] | {} == {
        "total": 3,
        "done": 3,
        "completed": 3,
        "failed": 0,
        "cancelled": 0,
        "running": 0,
        "pending": 0,
    }
    lines = results(tiny_server, accepted["batch_id"])
    assert sorted(json.dumps(r["id"]) for r in lines) == sorted(['"a"', "2", '"seeded"'])
    by_id = {r["id"]: r for r in lines}
    assert all(r["status"] == "completed" and r["tokens"] and "line" not in r for r in lines)
    assert done["positions_done"] == sum(len(r["tokens"]) for r in lines)
    assert by_id["seeded"]["metadata"]["seed"] == 7 and by_id["a"]["metadata"]["seed"] == 42
    assert by_id["a"]["metadata"]["best_of_k"] == 1 and by_id["a"]["metadata"]["model_id"] == "tiny-a-l1"
    # the same rows as the same analysis submitted alone (a batch item is an ordinary analysis)
    alone = tiny_server.wait(tiny_server.analyze("The capital of France is Paris.", FAST))["result"]["tokens"]
    assert [r["explanation"] for r in alone] == [r["explanation"] for r in by_id["a"]["tokens"]]
    # resuming a download, following a finished batch, and Parquet
    assert results(tiny_server, accepted["batch_id"], "?after=2") == lines[2:]
    over = tiny_server.get(f"{BATCHES}/{accepted['batch_id']}/results?after=3")
    assert (
        over.text == ""
        and over.headers["x-batch-over"] == "true"
        and over.headers["x-batch-status"] == "completed"
    )
    assert results(tiny_server, accepted["batch_id"], "?follow=true") == lines
    r = tiny_server.get(f"{BATCHES}/{accepted['batch_id']}/results?format=parquet")
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.apache.parquet"
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(r.content)).to_pylist()
    assert [row["id"] for row in table] == [str(line["id"]) for line in lines]
    assert [json.loads(row["tokens"]) for row in table] == [line["tokens"] for line in lines]
    assert (
        tiny_server.get(f"{BATCHES}/{accepted['batch_id']}/results?format=parquet&follow=true").status_code
        == 400
    )
    listed = tiny_server.get(BATCHES).json()
    assert accepted["batch_id"] in [b["batch_id"] for b in listed["batches"]] and listed["total"] >= 1


def test_results_stream_as_items_finish(tiny_server: Server) -> None:
    accepted = submit(tiny_server, {"items": items(6), "options": FAST})
    seen: list[tuple[float, dict[str, Any]]] = []
    url = f"{tiny_server.url}{BATCHES}/{accepted['batch_id']}/results?follow=true"
    with httpx.stream("GET", url, timeout=120) as r:
        assert r.status_code == 200 and r.headers["x-batch-over"] == "false"  # more lines to come
        for line in r.iter_lines():
            if line:
                seen.append((time.time(), json.loads(line)))
    ended = time.time()
    assert sorted(s[1]["id"] for s in seen) == sorted(i["id"] for i in items(6))
    assert (
        seen[0][0] < ended - 0.05
    )  # the first line came before the stream ended, not all at once at the end
    assert progress(tiny_server, accepted["batch_id"])["status"] == "completed"


def test_a_jsonl_upload_with_a_malformed_line_fails_that_item_only(tiny_server: Server) -> None:
    lines = [
        json.dumps({"id": "ok-1", "text": "A first good line."}),
        '{"id": "broken", "text": ',  # not JSON
        "",  # blank lines are skipped, not items
        json.dumps({"id": "no-text"}),
        json.dumps({"id": "bad-option", "text": "x y z", "options": {"temperature": 9}}),
        json.dumps({"id": "ok-2", "messages": [{"role": "user", "content": "A good chat"}]}),
    ]
    r = httpx.post(
        f"{tiny_server.url}{BATCHES}?options={json.dumps(FAST)}",
        content="\n".join(lines).encode(),
        headers={"Content-Type": "application/x-ndjson"},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["items"]["total"] == 5 and accepted["items"]["failed"] == 3
    wait_batch(tiny_server, accepted["batch_id"])
    got = {line["id"]: line for line in results(tiny_server, accepted["batch_id"])}
    assert got["ok-1"]["status"] == got["ok-2"]["status"] == "completed"
    assert got["ok-1"]["line"] == 1 and got["ok-2"]["line"] == 6
    failed = [line for line in got.values() if line["status"] == "failed"]
    assert {f["line"] for f in failed} == {2, 4, 5}
    assert got[None]["error"].startswith("line 2: not JSON") and got[None]["line"] == 2
    assert got["no-text"]["error"].startswith("line 4:") and "text or messages" in got["no-text"]["error"]
    assert "temperature" in got["bad-option"]["error"]

    # the same upload as a multipart form, its defaults as form fields
    form = {"options": json.dumps(FAST)}
    files = {"file": ("items.jsonl", "\n".join(lines[:1] + lines[-1:]).encode(), "application/x-ndjson")}
    r = httpx.post(tiny_server.url + BATCHES, data=form, files=files, timeout=60)
    assert r.status_code == 202, r.text
    assert wait_batch(tiny_server, r.json()["batch_id"])["items"]["completed"] == 2


def test_bad_submissions_are_refused_with_reasons(tiny_server: Server) -> None:
    def post(body: Any, **kw: Any) -> httpx.Response:
        return httpx.post(tiny_server.url + BATCHES, json=body, timeout=30, **kw)

    dup = post({"items": [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]})
    assert dup.status_code == 400 and "unique" in dup.json()["detail"]
    assert post({"items": []}).status_code == 400
    unknown = post({"items": [{"id": "x", "text": "a", "options": {"nope": 1}}]})
    assert unknown.status_code == 400 and unknown.json()["detail"].startswith("items.0.nope")
    both = post({"items": [{"id": "x", "text": "a", "messages": [{"role": "user", "content": "b"}]}]})
    assert both.status_code == 400 and "exactly one" in both.json()["detail"]
    assert post({"items": [{"id": "x", "text": "a", "model_id": "tiny-b-l1"}]}).status_code == 400
    assert post({"items": [{"id": "x", "text": "a"}], "model_id": "no-such-model"}).status_code == 404
    assert post({"items": [{"id": True, "text": "a"}]}).status_code == 400
    jsonl_dup = httpx.post(
        tiny_server.url + BATCHES,
        content=b'{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n',
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert jsonl_dup.status_code == 400 and "line 2" in jsonl_dup.json()["detail"]
    other = httpx.post(tiny_server.url + BATCHES, content=b"id,text", headers={"Content-Type": "text/csv"})
    assert other.status_code == 415
    assert tiny_server.get(f"{BATCHES}/no-such-batch").status_code == 404
    assert tiny_server.post(f"{BATCHES}/no-such-batch/cancel").status_code == 404


def test_a_cancelled_batch_stops_and_keeps_what_finished(tiny_server: Server) -> None:
    accepted = submit(tiny_server, {"items": items(30, words=40), "options": FAST})
    batch_id = accepted["batch_id"]
    wait_batch(tiny_server, batch_id, lambda b: b["items"]["done"] >= 1)
    r = tiny_server.post(f"{BATCHES}/{batch_id}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    assert tiny_server.post(f"{BATCHES}/{batch_id}/cancel").status_code == 409
    time.sleep(1.0)  # items running at the cancel record their ends
    final = progress(tiny_server, batch_id)
    counts = final["items"]
    assert counts["cancelled"] >= 1 and counts["pending"] == 0 and counts["running"] == 0
    assert counts["completed"] + counts["failed"] + counts["cancelled"] == 30
    lines = results(tiny_server, batch_id)
    assert len(lines) == counts["completed"] + counts["failed"] and all(
        line["status"] == "completed" for line in lines
    )
    time.sleep(0.5)
    assert progress(tiny_server, batch_id)["items"] == counts  # nothing runs after the cancel
    deleted = httpx.delete(f"{tiny_server.url}{BATCHES}/{batch_id}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert tiny_server.get(f"{BATCHES}/{batch_id}").status_code == 404
    assert tiny_server.get(f"{BATCHES}/{batch_id}/results").status_code == 404


def test_limits_on_items_and_batches_in_flight(make_server: Callable[..., Server]) -> None:
    server = make_server(
        MAX_BATCH_ITEMS="5", MAX_BATCHES_IN_FLIGHT="1", MAX_REQUEST_BYTES="2048", MAX_BATCH_BYTES="32768"
    )
    big = httpx.post(server.url + BATCHES, json={"items": items(6)}, timeout=30)
    assert big.status_code == 413 and "MAX_BATCH_ITEMS (5)" in big.json()["detail"]
    # an upload may be larger than other bodies (MAX_BATCH_BYTES), within its own limit
    long_text = "word " * 1000
    assert len(json.dumps({"text": long_text})) > 2048
    too_long = server.post("/analyze", {"text": long_text})
    assert too_long.status_code == 413 and "MAX_REQUEST_BYTES" in too_long.json()["detail"]
    huge = httpx.post(server.url + BATCHES, json={"items": [{"id": 1, "text": long_text * 7}]}, timeout=30)
    assert huge.status_code == 413 and "MAX_BATCH_BYTES (32768 bytes)" in huge.json()["detail"]
    upload = httpx.post(server.url + BATCHES, json={"items": [{"id": 1, "text": long_text}]}, timeout=30)
    assert upload.status_code == 202, upload.text
    server.post(f"{BATCHES}/{upload.json()['batch_id']}/cancel")
    first = submit(server, {"items": items(5, words=40), "options": FAST})
    second = httpx.post(server.url + BATCHES, json={"items": items(1), "options": FAST}, timeout=30)
    assert second.status_code == 429 and "MAX_BATCHES_IN_FLIGHT" in second.json()["detail"]
    assert "retry-after" in second.headers
    server.post(f"{BATCHES}/{first['batch_id']}/cancel")
    submit(server, {"items": items(1), "options": FAST})  # room again once the first batch is over


def test_batches_belong_to_their_key_and_the_admin_sees_all(make_server: Callable[..., Server]) -> None:
    server = make_server(API_KEYS=API_KEYS)
    mine = submit(server, {"items": items(2), "options": FAST}, auth("alice"))
    batch_id = mine["batch_id"]
    assert server.get(f"{BATCHES}/{batch_id}", headers=auth("bob")).status_code == 404
    assert server.get(f"{BATCHES}/{batch_id}/results", headers=auth("bob")).status_code == 404
    assert httpx.delete(f"{server.url}{BATCHES}/{batch_id}", headers=auth("bob")).status_code == 404
    assert server.get(BATCHES, headers=auth("bob")).json()["total"] == 0
    assert server.get(f"{BATCHES}?all=true", headers=auth("bob")).status_code == 403
    assert server.get(f"{BATCHES}/{batch_id}", headers=auth("admin")).status_code == 200
    listed = server.get(f"{BATCHES}?all=true", headers=auth("admin")).json()
    assert [b["batch_id"] for b in listed["batches"]] == [batch_id]
    wait_batch(server, batch_id, headers=auth("alice"))
    lines = results(server, batch_id, headers=auth("alice"))
    assert len(lines) == 2
    # an item's job is its batch owner's, like her other jobs
    assert (
        server.get(f"/status/{lines[0]['request_id']}", headers=auth("alice")).json()["status"] == "completed"
    )
    assert server.get(f"/status/{lines[0]['request_id']}", headers=auth("bob")).status_code == 404
    # the items' own jobs are the batch's, not in the owner's history of interactive requests
    assert server.get("/api/history", headers=auth("alice")).json()["total"] == 0
    assert httpx.delete(f"{server.url}{BATCHES}/{batch_id}", headers=auth("alice")).status_code == 200
    for _ in range(50):  # the items' jobs go right after their batch
        if server.get(f"/status/{lines[0]['request_id']}", headers=auth("alice")).status_code == 404:
            break
        time.sleep(0.1)
    assert server.get(f"/status/{lines[0]['request_id']}", headers=auth("alice")).status_code == 404


@pytest.mark.slow
def test_a_restart_resumes_a_batch_without_computing_finished_items_again(
    make_server: Callable[..., Server],
) -> None:
    server = make_server()
    total = 24
    accepted = submit(server, {"items": items(total, words=30), "options": FAST})
    batch_id = accepted["batch_id"]
    wait_batch(server, batch_id, lambda b: b["items"]["done"] >= 3)
    server.kill()  # a hard stop, mid-batch
    server.start()
    before = results(server, batch_id)  # what was stored before the kill, read from the restarted server
    assert 3 <= len(before) < total
    final = wait_batch(server, batch_id)
    assert final["status"] == "completed" and final["items"]["completed"] == total
    after = results(server, batch_id)
    assert sorted(line["id"] for line in after) == sorted(i["id"] for i in items(total))  # each item once
    assert after[: len(before)] == before  # finished items kept, same jobs, same rows
    # the restarted process ran only what had not finished (items in flight at the kill are recovered jobs)
    ran = server.get("/metrics?format=json").json()["total_requests"]
    assert ran <= total - len(before)


def test_the_client_submits_and_iterates_results(tiny_server: Server) -> None:
    batch_items = items(4)
    with Client(tiny_server.url) as client:
        run = client.batch(batch_items, options=FAST)
        assert run.batch_id and run.total == 4
        got = list(run)
        assert sorted(r.id for r in got) == sorted(i["id"] for i in batch_items)
        assert all(isinstance(r, BatchItemResult) and r.ok and r.tokens for r in got)
        again = list(client.batch_results(run.batch_id, after=2))
        assert [r.id for r in again] == [r.id for r in got[2:]]
        assert client.batch_status(run.batch_id)["status"] == "completed"

    async def main() -> list[BatchItemResult]:
        async with AsyncClient(tiny_server.url) as aclient:
            arun = await aclient.batch([{"id": 1, "text": "Hello world"}], options=FAST)
            return [r async for r in arun]

    import asyncio

    (only,) = asyncio.run(main())
    assert only.id == 1 and only.status == "completed" and only.metadata["best_of_k"] == 1


def test_the_cli_writes_rows_and_resumes(tiny_server: Server, tmp_path: Path) -> None:
    source = tmp_path / "items.jsonl"
    source.write_text("\n".join(json.dumps(i) for i in items(3)) + "\n")
    out = tmp_path / "rows.jsonl"

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "talkative.cli", "analyze", "--input", str(source), "--output", str(out)]
        cmd += ["--server", tiny_server.url, "-k", "1", "--no-kl", "--no-salience", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    done = run()
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["item-0", "item-1", "item-2"]
    assert all(r["status"] == "completed" and r["tokens"] for r in rows)
    # more items in the input: a second run submits only those, keeping the rows already written
    source.write_text("\n".join(json.dumps(i) for i in items(5)) + "\n")
    again = run()
    assert again.returncode == 0, again.stderr
    rows2 = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows2[:3] == rows and sorted(r["id"] for r in rows2) == [f"item-{i}" for i in range(5)]
    assert "3 items already in" in again.stderr and "2 to go" in again.stderr
    nowhere = subprocess.run(
        [
            sys.executable,
            "-m",
            "talkative.cli",
            "analyze",
            "--input",
            str(source),
            "--output",
            str(tmp_path / "x"),
            "--server",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert nowhere.returncode != 0 and "no Talkative server" in nowhere.stderr


def test_the_cli_resumes_the_batch_its_sidecar_names(tiny_server: Server, tmp_path: Path) -> None:
    """An interrupted run left a sidecar naming its batch and one row written: the next run follows that batch for
    the other rows instead of submitting anew."""
    source = tmp_path / "items.jsonl"
    batch_items = items(3, prefix="side")
    source.write_text("\n".join(json.dumps(i) for i in batch_items) + "\n")
    accepted = httpx.post(
        f"{tiny_server.url}{BATCHES}?options={json.dumps(FAST)}",
        content=source.read_bytes(),
        headers={"Content-Type": "application/x-ndjson"},
        timeout=60,
    ).json()
    wait_batch(tiny_server, accepted["batch_id"])
    first = next(r for r in results(tiny_server, accepted["batch_id"]) if r["id"] == "side-0")
    out = tmp_path / "rows.jsonl"
    out.write_text(json.dumps(first) + "\n" + '{"id": "side-1", "sta')  # and a line torn by the interruption
    sidecar = tmp_path / "rows.jsonl.batch"
    sidecar.write_text(
        json.dumps({"batch_id": accepted["batch_id"], "server": tiny_server.url, "lines": [1, 2, 3]})
    )
    before = tiny_server.get(BATCHES).json()["total"]
    cmd = [sys.executable, "-m", "talkative.cli", "analyze", "--input", str(source), "--output", str(out)]
    done = subprocess.run([*cmd, "--server", tiny_server.url], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming batch {accepted['batch_id']}" in done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == first and sorted(r["id"] for r in rows) == ["side-0", "side-1", "side-2"]
    assert all(r["line"] == int(r["id"][-1]) + 1 for r in rows)  # the input's line numbers
    assert tiny_server.get(BATCHES).json()["total"] == before  # no new batch
    assert not sidecar.exists()  # done: nothing left to resume
