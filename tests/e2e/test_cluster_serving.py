"""BACKEND=ray on a real local Ray cluster: routing by group, switching, merging inside a replica, backpressure
and cancellation, through Serve's proxy with the REST API unchanged.

One cluster for the module (4 logical CPUs; CPU replicas of the tiny test models): pool `shared` multiplexes
groups `tiny-a` and `tiny-b` on two replicas, pool `narrow` serves `tiny-c` on one replica that holds one job and
lets one more wait (max_ongoing_requests 1, max_queued_requests 1), pool `switching` serves `tiny-d` and `tiny-e`
on one replica. The result cache is on (kept at the ingress): tests that must run a request again vary its seed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import FAST
from ray_cluster import RayCluster, tiny_group

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps."


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> Iterator[RayCluster]:
    from talkative.serve.settings import Settings

    a, b = tiny_dirs["a"], tiny_dirs["b"]
    shared = {"pool": "shared", "replicas": 2, "num_cpus": 0.5, "max_ongoing_requests": 4}
    narrow = {"pool": "narrow", "num_cpus": 0.5, "max_ongoing_requests": 1, "max_queued_requests": 1}
    switching = {"pool": "switching", "num_cpus": 0.5}
    groups = {
        "model_groups": [
            tiny_group("tiny-a", a, **shared),
            tiny_group("tiny-b", b, pool="shared"),
            tiny_group("tiny-c", b, **narrow),
            tiny_group("tiny-d", a, **switching),
            tiny_group("tiny-e", b, pool="switching"),
        ],
        "settings": {"default_group": "tiny-a", "max_cpu_models": 1, "use_bf16": False},
    }
    root = tmp_path_factory.mktemp("cluster-serving")
    path = root / "model_groups.json"
    path.write_text(json.dumps(groups))
    settings = Settings(
        model_groups_file=path,
        data_dir=root / "data",
        result_cache=True,
        max_active_jobs=4,
        env_overrides={},
        _env_file=None,
    )
    ray_cluster = RayCluster(num_cpus=4).start()
    try:
        ray_cluster.deploy(settings)
        yield ray_cluster
    finally:
        ray_cluster.shutdown()


def _analyze(cluster: RayCluster, model_id: str, text: str = TEXT, **options: Any) -> str:
    r = httpx.post(
        cluster.url + "/analyze",
        json={"text": text, "model_id": model_id, "options": {**FAST, **options}},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def _wait(cluster: RayCluster, request_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        body: dict[str, Any] = httpx.get(cluster.url + f"/status/{request_id}", timeout=10).json()
        if body["status"] in {"completed", "failed", "cancelled"}:
            return body
        time.sleep(0.2)
    raise AssertionError(f"{request_id} did not end in {timeout}s")


def test_routing_by_model_across_two_groups_on_two_replicas(cluster: RayCluster) -> None:
    ids = [(_analyze(cluster, f"tiny-{g}-l1"), g) for g in "abab"]
    ran: dict[str, set[str]] = {"a": set(), "b": set()}
    for request_id, g in ids:
        body = _wait(cluster, request_id)
        assert body["status"] == "completed", body
        meta = body["result"]["metadata"]
        assert meta["group_id"] == f"tiny-{g}" and body["result"]["tokens"]
        ran[g].add(meta["replica"])
    assert len(ran["a"]) == 1 and len(ran["b"]) == 1, ran  # each group stays on the replica that holds it
    assert ran["a"] != ran["b"]  # and the two groups are on the two replicas
    live = {r.replica_id for r in cluster.replicas("worker-shared")}
    assert ran["a"] | ran["b"] == live
    # the default group's NLA facts, as the replica that loaded it reported them
    info = httpx.get(cluster.url + "/api/v2/models/tiny-a-l1/info", timeout=10).json()
    assert info["is_loaded"] and info["nla"]["d_model"] == 64


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def _replica_figures(pool: str, group: str) -> dict[str, Any]:
    """The figures of the replica of `pool` that holds `group` (Serve routes the call there)."""
    from ray import serve

    from talkative.serve.cluster.names import APP_NAME

    handle = serve.get_deployment_handle(f"worker-{pool}", app_name=APP_NAME)
    figures: dict[str, Any] = (
        handle.options(multiplexed_model_id=group).describe.remote().result(timeout_s=60)
    )
    return figures


def test_two_concurrent_requests_share_engine_batches_inside_a_replica(cluster: RayCluster) -> None:
    before = _replica_figures("shared", "tiny-a")["stats"]["merged_batches"]
    opts = {"batch_size": 4}
    a = _analyze(cluster, "tiny-a-l1", words(40), seed=1, **opts)
    b = _analyze(cluster, "tiny-a-l1", words(40), seed=2, **opts)
    ra, rb = _wait(cluster, a), _wait(cluster, b)
    assert ra["status"] == rb["status"] == "completed", (ra, rb)
    ma, mb = ra["result"]["metadata"], rb["result"]["metadata"]
    assert ma["replica"] == mb["replica"]
    assert set(ma["engine_batches"]) & set(mb["engine_batches"]), (ma["engine_batches"], mb["engine_batches"])
    assert ma["merged_batches"] > 0 and mb["merged_batches"] > 0
    figures = _replica_figures("shared", "tiny-a")
    assert figures["replica"] == ma["replica"]
    assert figures["stats"]["merged_batches"] > before  # the replica's own counter saw the shared batches
    assert [r["position"] for r in ra["result"]["tokens"]] == sorted(
        {r["position"] for r in ra["result"]["tokens"]}
    )


def test_a_replica_switches_between_the_groups_of_its_pool(cluster: RayCluster) -> None:
    ran = []
    for seed, model in enumerate(("tiny-d-l1", "tiny-e-l1", "tiny-d-l1")):
        body = _wait(cluster, _analyze(cluster, model, seed=seed))  # d runs again, not from the cache
        assert body["status"] == "completed", body
        ran.append((body["result"]["metadata"]["group_id"], body["result"]["metadata"]["replica"]))
    assert [g for g, _r in ran] == ["tiny-d", "tiny-e", "tiny-d"]
    assert len({r for _g, r in ran}) == 1  # one replica served both groups
    figures = _replica_figures("switching", "tiny-d")
    assert figures["stats"]["group_loads"] >= 3  # d, then e, then d again (back from its CPU cache)
    assert set(figures["groups"]) == {"tiny-d", "tiny-e"}  # one on its device, the other parked


def test_a_full_pool_answers_429_with_retry_after_and_cancelling_reaches_the_replica(
    cluster: RayCluster,
) -> None:
    long = {"batch_size": 1}
    running = _analyze(cluster, "tiny-c-l1", words(400), **long)  # the replica's one place
    deadline = time.time() + 60
    while not (httpx.get(cluster.url + f"/status/{running}", timeout=10).json()["progress"] or {}).get(
        "done_positions"
    ):  # the replica's progress, relayed, is the job's /status progress
        assert time.time() < deadline
        time.sleep(0.1)
    waiting = _analyze(cluster, "tiny-c-l1", words(400), **long)  # Serve's queue of one
    # a text no model computed before: tiny-c-l1 has tiny-b-l1's weights, so the cache would answer TEXT
    r = httpx.post(
        cluster.url + "/analyze",
        json={"text": "A request that finds the pool full.", "model_id": "tiny-c-l1", "options": FAST},
        timeout=30,
    )
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1
    assert "busy" in r.json()["detail"]
    before = _replica_figures_after_cancel(cluster, [running, waiting])
    assert before["stats"]["cancelled"] >= 1  # the running job was cancelled on the replica, not only here
    assert before["jobs"] == 0
    # room again: the pool takes new work
    again = _wait(cluster, _analyze(cluster, "tiny-c-l1"))
    assert again["status"] == "completed"


def _replica_figures_after_cancel(cluster: RayCluster, request_ids: list[str]) -> dict[str, Any]:
    for request_id in request_ids:
        r = httpx.post(cluster.url + f"/cancel/{request_id}", timeout=10)
        assert r.status_code == 200, r.text
    for request_id in request_ids:
        assert _wait(cluster, request_id)["status"] == "cancelled"
    deadline = time.time() + 30
    while True:
        figures = _replica_figures("narrow", "tiny-c")
        if figures["jobs"] == 0 or time.time() > deadline:
            return figures
        time.sleep(0.2)


def test_a_generation_streams_its_tokens_through_the_cluster(cluster: RayCluster) -> None:
    from websockets.sync.client import connect

    with connect(cluster.ws_url, open_timeout=30, max_size=None) as ws:
        ws.send(
            json.dumps(
                {
                    "type": "generate",
                    "text": "Once upon a time",
                    "model_id": "tiny-b-l1",
                    "options": {"max_new_tokens": 8, "seed": 3, "num_completions": 2},
                    "client_request_id": "g1",
                }
            )
        )
        mine: list[dict[str, Any]] = []
        deadline = time.time() + 120
        while not mine or mine[-1]["type"] not in {"generation_complete", "error"}:
            assert time.time() < deadline, [m["type"] for m in mine]
            msg = json.loads(ws.recv(timeout=60))
            if msg.get("client_request_id") == "g1":
                mine.append(msg)
    types = [m["type"] for m in mine]
    assert types[0] == "queued" and types[-1] == "generation_complete", types
    done = mine[-1]
    for c in range(2):
        tokens = [m for m in mine if m["type"] == "token" and m["completion"] == c]
        assert [t["position"] for t in tokens] == list(
            range(done["prompt_tokens"], done["prompt_tokens"] + done["completion_tokens"][c])
        )


def test_a_client_that_disconnects_cancels_its_job_on_the_replica(cluster: RayCluster) -> None:
    from websockets.sync.client import connect

    cancelled = _replica_figures("narrow", "tiny-c")["stats"]["cancelled"]
    with connect(cluster.ws_url, open_timeout=30, max_size=None) as ws:
        options = {**FAST, "batch_size": 1}
        ws.send(
            json.dumps({"type": "analyze", "text": words(400), "model_id": "tiny-c-l1", "options": options})
        )
        deadline = time.time() + 60
        while True:  # until the replica explains its positions
            assert time.time() < deadline
            msg = json.loads(ws.recv(timeout=60))
            if msg["type"] == "processing" and (msg.get("done_positions") or 0) > 0:
                request_id = msg["request_id"]
                break
    assert _wait(cluster, request_id)["status"] == "cancelled"
    deadline = time.time() + 30
    while True:
        figures = _replica_figures("narrow", "tiny-c")
        if figures["stats"]["cancelled"] > cancelled and figures["jobs"] == 0:
            break
        assert time.time() < deadline, figures
        time.sleep(0.2)


def test_a_generation_streams_as_server_sent_events_through_serves_proxy(cluster: RayCluster) -> None:
    body = {"text": "Tell me", "model_id": "tiny-b-l1", "options": {"max_new_tokens": 6, "seed": 1}}
    events: list[Any] = []
    with httpx.stream("POST", cluster.url + "/generate?stream=true", json=body, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    types = [e if isinstance(e, str) else e["type"] for e in events]
    assert types[0] == "queued" and "token" in types and types[-2:] == ["generation_complete", "[DONE]"], (
        types
    )
    done = events[-2]
    tokens = [e for e in events[:-1] if e["type"] == "token"]
    assert len(tokens) == done["completion_tokens"][0]


def _ws_exchange(cluster: RayCluster, message: dict[str, Any], ends: set[str]) -> list[dict[str, Any]]:
    """The messages a WebSocket client hears about one request it sends, up to one of `ends`."""
    from websockets.sync.client import connect

    mine: list[dict[str, Any]] = []
    with connect(cluster.ws_url, open_timeout=30, max_size=None) as ws:
        ws.send(json.dumps({**message, "client_request_id": "mine"}))
        deadline = time.time() + 120
        while not mine or mine[-1]["type"] not in ends:
            assert time.time() < deadline, mine
            msg = json.loads(ws.recv(timeout=60))
            if msg.get("client_request_id") == "mine":
                mine.append(msg)
    return mine


def test_options_the_model_refuses_are_answered_400_at_submission_as_locally(cluster: RayCluster) -> None:
    bad = {**FAST, "tuned_lens": True}  # the engine's check: this server has no tuned lens directory
    body = {"text": TEXT, "model_id": "tiny-a-l1", "options": bad}
    r = httpx.post(cluster.url + "/analyze", json=body, timeout=30)
    assert r.status_code == 400 and "tuned lens" in r.json()["detail"], r.text
    heard = _ws_exchange(cluster, {"type": "analyze", **body}, {"error", "result"})
    assert [m["type"] for m in heard] == ["error"] and "tuned lens" in heard[0]["error"], (
        heard
    )  # never queued


def test_an_identical_request_is_answered_from_the_ingress_cache_until_its_job_is_deleted(
    cluster: RayCluster,
) -> None:
    text = "A cached sentence about rivers and the sea."
    first_id = _analyze(cluster, "tiny-b-l1", text, seed=11)
    first = _wait(cluster, first_id)
    assert first["status"] == "completed" and first["result"]["metadata"]["cached"] is False, first
    r = httpx.post(
        cluster.url + "/analyze",
        json={"text": text, "model_id": "tiny-b-l1", "options": {**FAST, "seed": 11}},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    again = _wait(cluster, r.json()["request_id"])
    assert again["result"]["metadata"]["cached"] is True, again["result"]["metadata"]
    assert again["result"]["tokens"] == first["result"]["tokens"]
    heard = _ws_exchange(
        cluster,
        {"type": "analyze", "text": text, "model_id": "tiny-b-l1", "options": {**FAST, "seed": 11}},
        {"error", "result"},
    )
    assert heard[-1]["type"] == "result" and heard[-1]["metadata"]["cached"] is True, heard
    # deleting the job that computed the rows removes them: the same request runs on a replica again
    d = httpx.delete(cluster.url + f"/api/v1/jobs/{first_id}", timeout=30)
    assert d.status_code in (200, 204), d.text
    third = _wait(cluster, _analyze(cluster, "tiny-b-l1", text, seed=11))
    assert third["result"]["metadata"]["cached"] is False and third["result"]["metadata"]["replica"]
    assert third["result"]["tokens"] == first["result"]["tokens"]


def test_the_administrators_reset_is_refused_with_409_saying_what_to_do(cluster: RayCluster) -> None:
    r = httpx.post(cluster.url + "/reset", timeout=30)
    assert r.status_code == 409, r.text
    assert "BACKEND=ray" in r.json()["detail"] and "redeploy" in r.json()["detail"]
    assert httpx.get(cluster.url + "/ready", timeout=10).status_code == 200  # nothing was unloaded
