"""Observability over a real server process: /metrics in Prometheus text and as the seed's JSON, /ready, and
structured JSON logs whose lines carry the request id the client sees (and never a key)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import Server
from prometheus_client.parser import text_string_to_metric_families
from security_support import API_KEYS, KEYS, auth, base_env, next_of, wait_job, ws_connect

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_groups: Path) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("observed")
    env = base_env(tiny_groups, workdir, API_KEYS=API_KEYS, RATE_LIMIT_PER_MINUTE="0", LOG_FORMAT="json")
    s = Server(workdir, env, name="observed").start()
    yield s
    s.stop()


def families(server: Server) -> dict[str, Any]:
    r = server.get("/metrics", headers=auth("admin"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def samples(family: Any, **labels: str) -> list[float]:
    return [s.value for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())]


def test_metrics_cover_queue_jobs_workers_stages_switches_and_rejections(server: Server) -> None:
    before = families(server)
    assert samples(before["talkative_queue_depth"], group="tiny-a") == [0]
    assert samples(before["talkative_workers"], device="cpu") == [1]
    assert samples(before["talkative_ready"]) == [1]
    rid = server.post(
        "/analyze", {"text": "metrics need a little work", "options": {"calculate_token_salience": False,
                     "optimize_explanations_config": {"best_of_k": 2}}}, headers=auth("alice"),
    ).json()["request_id"]  # fmt: skip
    done = wait_job(server, rid, auth("alice"))
    assert done["status"] == "completed"
    switched = server.post("/api/v2/models/switch", {"model_id": "tiny-b-l1"}, headers=auth("admin"))
    assert switched.status_code == 200, switched.text
    server.post("/api/v2/models/switch", {"model_id": "tiny-a-l1"}, headers=auth("admin"))
    assert server.get("/status/x").status_code == 401
    generation = server.post(
        "/generate", {"text": "Once upon", "options": {"max_new_tokens": 3}}, headers=auth("bob")
    )
    if generation.status_code == 200:  # wait for it, so the gauges below describe an idle server
        assert wait_job(server, generation.json()["request_id"], auth("bob"))["status"] == "completed"

    after = families(server)
    stages = {
        s.labels["stage"]
        for s in after["talkative_stage_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert {"extract", "verbalize", "reconstruct", "kl"} <= stages, stages
    n_positions = done["result"]["metadata"]["n_positions"]
    assert samples(after["talkative_positions_analysed"])[0] >= n_positions
    assert samples(after["talkative_jobs_finished"], status="completed")[0] >= 1
    assert samples(after["talkative_jobs"], status="queued") == [0]
    assert samples(after["talkative_workers_busy"], device="cpu") == [0]
    assert samples(after["talkative_model_loads"])[0] >= 3  # startup, tiny-b, back to tiny-a
    switch_counts = [
        s.value
        for s in after["talkative_group_switch_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels["group"] == "tiny-b"
    ]
    assert switch_counts == [1]
    assert samples(after["talkative_group_switches"], group="tiny-b", outcome="completed") == [1]
    assert samples(after["talkative_rejected_requests"], reason="unauthorized")[0] >= 1
    job_seconds = after["talkative_job_duration_seconds"]
    assert samples(job_seconds, kind="analyze", status="completed")
    http = after["talkative_http_requests"]
    assert samples(http, method="POST", route="/analyze", status="200") == [1]
    assert samples(after["talkative_websocket_connections"]) == [0]
    if generation.status_code == 200:  # generation is served: its tokens are counted
        assert sum(samples(after["talkative_tokens_generated"])) >= 1
    else:
        assert "talkative_tokens_generated" in after


def test_the_seed_json_figures(server: Server) -> None:
    with ws_connect(server, "alice") as ws:
        next_of(ws, {"connection_established"})
        for how in ({"params": {"format": "json"}}, {"headers": {"Accept": "application/json"}}):
            kw: dict[str, Any] = {**how}
            kw["headers"] = {**kw.get("headers", {}), **auth("admin")}
            body = server.get("/metrics", **kw).json()
            for key, kind in (
                ("total_requests", int),
                ("completed_requests", int),
                ("failed_requests", int),
                ("queue_size", int),
                ("average_processing_time", float),
                ("active_websocket_connections", int),
            ):
                assert isinstance(body[key], kind), (key, body)
            assert body["active_websocket_connections"] == 1 and body["total_requests"] >= 1
            assert body["average_processing_time"] > 0


def test_json_logs_carry_request_ids_and_no_keys(server: Server) -> None:
    r = server.get("/api/v2/models", headers={**auth("alice"), "X-Request-ID": "trace-me-42"})
    assert r.headers["x-request-id"] == "trace-me-42"
    own = server.get("/api/v2/models", headers=auth("alice")).headers["x-request-id"]
    with ws_connect(server, "bob") as ws:
        next_of(ws, {"connection_established"})
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    assert len(lines) > 10
    for line in lines:
        assert {"time", "level", "logger", "message", "request_id"} <= set(line), line
    access = [line for line in lines if line["logger"] == "talkative.access"]
    mine = [line for line in access if line["request_id"] == "trace-me-42"]
    assert mine and mine[0]["path"] == "/api/v2/models" and mine[0]["status"] == 200
    assert any(line["request_id"] == own for line in access)
    assert any(line["message"].startswith("access: API keys required") for line in lines)
    text = server.log_path.read_text()
    for key in KEYS.values():
        assert key not in text
