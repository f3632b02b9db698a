"""Faults: an engine that raises (out of memory included), checkpoints that are corrupt or missing, kill -9 with
work queued, and SIGTERM while an engine batch runs. Nothing accepted is lost and the server keeps serving."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from e2e_helpers import FAST, Server
from security_support import base_env, next_of, recv_json, refusal_of, wait_job, ws_connect
from starlette.testclient import TestClient

from talkative.nla import analysis as engine  # the engine functions the server's LocalWorker calls
from talkative.serve.app import create_app
from talkative.serve.settings import Settings

pytestmark = pytest.mark.e2e


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


@pytest.fixture(scope="module")
def fault_groups(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-a (sound, with a row budget big enough for slow engine batches), a group whose only checkpoint is
    corrupt, and one whose checkpoint is missing."""
    root = tmp_path_factory.mktemp("fault-groups")
    corrupt = root / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x04 this is not a checkpoint" * 100)
    a, b = tiny_dirs["a"], tiny_dirs["b"]
    data = {
        "model_groups": [
            {
                "group_id": "tiny-a",
                "base_model_path": str(a),
                "models": [
                    {"id": "tiny-a-l1", "checkpoint": f"init:{a}@1", "layer": 1, "auto_batch_size_max": 1024}
                ],
            },
            {
                "group_id": "corrupt",
                "base_model_path": str(b),
                "models": [{"id": "corrupt-l1", "checkpoint": str(corrupt), "layer": 1}],
            },
            {
                "group_id": "missing",
                "base_model_path": str(b),
                "models": [{"id": "missing-l1", "checkpoint": str(root / "gone" / "nla.json"), "layer": 1}],
            },
        ],
        "settings": {"default_group": "tiny-a", "use_bf16": False, "max_cpu_models": 1},
    }
    path = root / "model_groups.json"
    path.write_text(json.dumps(data))
    return path


# -- the engine raises ------------------------------------------------------------------------------------------------
def test_engine_exceptions_fail_their_job_and_the_worker_keeps_serving(
    tiny_groups: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = engine.run_batch

    def run_batch(nla: Any, parts: Any, opts: Any, **kw: Any) -> Any:
        text = parts[0][0].text
        if "exhaust the accelerator" in text:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
        if "exhaust the host" in text:
            raise MemoryError()
        if "break the engine" in text:
            raise RuntimeError("a shape mismatch deep in the engine")
        return real(nla, parts, opts, **kw)

    monkeypatch.setattr(engine, "run_batch", run_batch)
    settings = Settings(model_groups_file=tiny_groups, data_dir=tmp_path / "data", queue_update_interval=0.5)
    app = create_app(settings)
    with TestClient(app, client=("127.0.0.1", 50000), base_url="http://localhost") as client:
        deadline = time.time() + 120
        while client.get("/ready").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.1)

        def run(text: str) -> dict[str, Any]:
            rid = client.post("/analyze", json={"text": text, "options": FAST}).json()["request_id"]
            for _ in range(600):
                body: dict[str, Any] = client.get(f"/status/{rid}").json()
                if body["status"] in ("completed", "failed", "cancelled"):
                    return body
                time.sleep(0.05)
            raise AssertionError(f"{rid} did not finish")

        for text, expected in (
            ("please exhaust the accelerator", "out of memory on cpu while explaining"),
            ("please exhaust the host", "out of memory on cpu while explaining"),
            ("please break the engine", "internal error while explaining: a shape mismatch"),
        ):
            failed = run(text)
            assert failed["status"] == "failed" and failed["error"].startswith(expected), failed
            fine = run("an ordinary sentence")
            assert fine["status"] == "completed" and fine["result"]["tokens"], fine
        assert client.get("/ready").status_code == 200
        metrics = client.get("/metrics", params={"format": "json"}).json()
        assert metrics["failed_requests"] == 3 and metrics["completed_requests"] == 3


# -- checkpoints that cannot be loaded --------------------------------------------------------------------------------
def test_a_bad_checkpoint_fails_the_switch_and_the_previous_model_keeps_serving(
    fault_groups: Path, tmp_path: Path
) -> None:
    server = Server(tmp_path, base_env(fault_groups, tmp_path), name="faults").start()
    try:
        for model, needle in (("corrupt-l1", "corrupt.pt"), ("missing-l1", "does not exist")):
            r = server.post("/api/v2/models/switch", {"model_id": model})
            assert r.status_code == 503, r.text
            detail = r.json()["detail"]
            assert (
                f"model group {model.removesuffix('-l1')} could not be loaded" in detail and needle in detail
            )
            listing = server.get("/api/v2/models").json()
            assert listing["current_model"] == "tiny-a-l1" and listing["model_status"]["is_loaded"]
            assert server.get("/ready").status_code == 200
            rid = server.analyze("still serving after a failed switch")
            assert server.wait(rid)["status"] == "completed"
        with server.ws() as ws:
            ws.send(
                json.dumps(
                    {"type": "switch_model_grouped", "model_id": "corrupt-l1", "client_request_id": "s"}
                )
            )
            err = next_of(ws, {"error", "model_switch_complete"})
            assert (
                err["type"] == "error"
                and "could not be loaded" in err["error"]
                and err["client_request_id"] == "s"
            )
        prometheus = server.get("/metrics").text
        assert 'talkative_group_switches_total{group="corrupt",outcome="failed"}' in prometheus
        assert 'talkative_device_group{device="cpu",group="tiny-a"} 1.0' in prometheus
    finally:
        server.stop()


# -- kill -9 ----------------------------------------------------------------------------------------------------------
def test_kill_9_with_work_queued_then_every_accepted_job_completes(
    fault_groups: Path, tmp_path: Path
) -> None:
    server = Server(tmp_path, base_env(fault_groups, tmp_path, MAX_ACTIVE_JOBS="1"), name="killed").start()
    try:
        accepted = [server.analyze(words(60), {**FAST, "batch_size": 8})]
        accepted += [server.analyze(f"queued job number {i}") for i in range(4)]
        with server.ws() as ws:
            for i in range(2):
                ws.send(json.dumps({"type": "analyze", "text": f"over the websocket {i}", "options": FAST}))
                accepted.append(next_of(ws, {"queued"})["request_id"])
            server.wait(accepted[0], lambda b: b["status"] == "processing")
            statuses = [server.status(rid)["status"] for rid in accepted]
            assert statuses.count("queued") >= 5, statuses
            server.kill()
        server.start()
        for rid in accepted:
            done = server.wait(rid, timeout=180)
            assert done["status"] == "completed" and done["result"]["tokens"], done
    finally:
        server.stop()


# -- SIGTERM ----------------------------------------------------------------------------------------------------------
def test_sigterm_drains_then_the_next_start_finishes_the_work(fault_groups: Path, tmp_path: Path) -> None:
    env = base_env(fault_groups, tmp_path, MAX_ACTIVE_JOBS="1", DRAIN_TIMEOUT="60")
    server = Server(tmp_path, env, name="drained").start()
    slow = {**FAST, "batch_size": 250}  # a few seconds per engine batch on the tiny model
    try:
        first = server.analyze(words(150), slow)  # about 600 positions: three batches
        queued = [server.analyze(f"waiting {i}") for i in range(3)]
        server.wait(first, lambda b: (b.get("progress") or {}).get("stage") == "explanation_generation")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(server.url + "/analyze", json={"text": "too late"}, timeout=10)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, refused.text
        assert refused.json()["kind"] == "draining"
        assert server.get("/ready").status_code == 503
        assert server.get("/health").status_code == 200
        with ws_connect(server) as ws:
            frame, code = refusal_of(ws)
        assert code == 1013 and frame is not None and frame["kind"] == "draining"
        assert server.proc.wait(90) == 0
        log = server.log_path.read_text()
        assert "drained: 3 queued and 1 part-way jobs stay in the store" in log, log[-3000:]
        server.start()
        for rid in [first, *queued]:
            done = server.wait(rid, timeout=240)
            assert done["status"] == "completed", done
        first_done = server.status(first)
        assert len(first_done["result"]["tokens"]) == first_done["result"]["metadata"]["n_positions"]
    finally:
        server.stop()


def test_a_drained_websocket_client_resumes_its_jobs_after_the_restart(
    fault_groups: Path, tmp_path: Path
) -> None:
    server = Server(tmp_path, base_env(fault_groups, tmp_path, MAX_ACTIVE_JOBS="1"), name="resumed").start()
    try:
        with server.ws() as ws:
            recv_json(ws)
            ws.send(json.dumps({"type": "analyze", "text": words(40), "options": {**FAST, "batch_size": 60}}))
            rid = next_of(ws, {"queued"})["request_id"]
            ws.send(json.dumps({"type": "analyze", "text": "behind it", "options": FAST}))
            behind = next_of(ws, {"queued"})["request_id"]
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(90) == 0
        server.start()
        for job in (rid, behind):  # the WebSocket closed by the shutdown did not cancel them
            assert wait_job(server, job)["status"] == "completed"
    finally:
        server.stop()
