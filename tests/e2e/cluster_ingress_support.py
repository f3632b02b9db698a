"""What the cluster-ingress tests share: a Talkative cluster on one PostgreSQL store, an ingress replica of the
test's own (to know which replica a request reaches), and the clients' calls.

Serve's proxy spreads requests over the ingress replicas as it likes; to ask *another* replica than the one
running a job, the tests start one more ingress in the test process (`LocalIngress`: the same app, built with
BACKEND=ray, served by uvicorn on a free port, joined to the same cluster and store), which is another runner for
the store and reaches the same worker deployments through Serve's handles.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import uvicorn
import websockets
from e2e_helpers import FAST
from ray_cluster import RayCluster, free_port, tiny_group

TERMINAL = {"completed", "failed", "cancelled"}
FINAL_TYPES = {"result", "error", "request_cancelled"}
#: a text long enough that its analysis takes seconds on a CPU replica of a tiny model (best_of_k 4)
LONG = " ".join(f"word{i} and then some more of the sentence" for i in range(40))
SLOW = {**FAST, "optimize_explanations_config": {"best_of_k": 4}}


def write_groups(root: Path, model_dir: Path) -> Path:
    """One worker replica of a pool that serves `tiny-a` and `tiny-hidden` (a group no listing shows, whose id
    must never appear in `/metrics`)."""
    path = root / "model_groups.json"
    groups = {
        "model_groups": [
            tiny_group("tiny-a", model_dir, replicas=1, num_cpus=0.5, max_ongoing_requests=8),
            tiny_group("tiny-hidden", model_dir, visible=False),
        ],
        "settings": {"default_group": "tiny-a", "max_cpu_models": 1, "use_bf16": False},
    }
    path.write_text(json.dumps(groups))
    return path


def fresh_database(pg_server: Any) -> Iterator[str]:
    """A database of its own on the session's PostgreSQL server, dropped afterwards (the body of a fixture)."""
    url: str = pg_server.fresh_database()
    yield url
    pg_server.drop_database(url)


def cluster_settings(root: Path, model_dir: Path, database: str, lease_seconds: float) -> Any:
    """Settings of a cluster on `database` serving `write_groups`' pool; the result cache is off, so every request
    reaches a worker replica, and leases are short, so a dead replica's jobs are adopted within seconds."""
    from talkative.serve.settings import Settings

    return Settings(
        model_groups_file=write_groups(root, model_dir),
        data_dir=root / "data",
        database_url=database,
        result_cache=False,
        lease_seconds=lease_seconds,
        env_overrides={},
        _env_file=None,
    )


@contextmanager
def deployed(settings: Any, ingress_replicas: int) -> Iterator[RayCluster]:
    """A local Ray cluster with Talkative deployed on it, shut down on leaving."""
    ray_cluster = RayCluster(num_cpus=3).start()
    try:
        ray_cluster.deploy(settings, ingress_replicas=ingress_replicas)
        yield ray_cluster
    finally:
        ray_cluster.shutdown()


class LocalIngress:
    """An ingress replica in this process: `build_app` with BACKEND=ray under uvicorn, on a thread of its own."""

    def __init__(self, settings: Any) -> None:
        from talkative.serve.app import build_app
        from talkative.serve.cluster.deploy import portable

        self.port = free_port()
        config = uvicorn.Config(
            build_app(portable(settings)),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            ws="websockets",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="local-ingress", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 120) -> LocalIngress:
        self.thread.start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the local ingress did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@contextmanager
def local_ingress(settings: Any) -> Iterator[LocalIngress]:
    ingress = LocalIngress(settings).start()
    try:
        yield ingress
    finally:
        ingress.stop()


def analyze(
    base: str, text: str = LONG, options: dict[str, Any] | None = None, model_id: str = "tiny-a-l1"
) -> str:
    r = httpx.post(
        base + "/analyze", json={"text": text, "model_id": model_id, "options": options or SLOW}, timeout=60
    )
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def status(base: str, request_id: str) -> dict[str, Any]:
    r = httpx.get(base + f"/status/{request_id}", timeout=30)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def wait(base: str, request_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = status(base, request_id)
        if body["status"] in TERMINAL:
            return body
        time.sleep(0.3)
    raise AssertionError(f"{request_id} did not end within {timeout}s")


def runner_of(database_url: str, request_id: str) -> str | None:
    """Which runner (`<node>:<pid>:<uuid>`) holds a job's lease, read from the shared store."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT runner FROM jobs WHERE id = %s", (request_id,)).fetchone()
    return None if row is None else row[0]


async def follow(
    ws_url: str, request_ids: list[str], linger: float = 1.0, timeout: float = 180
) -> dict[str, Any]:
    """Subscribe to jobs by id over the WebSocket, as a client does after a reconnect; collect every message
    about them until each has had its final message, then `linger` seconds more (to see a second one)."""
    seen: dict[str, list[dict[str, Any]]] = {rid: [] for rid in request_ids}

    def ended() -> bool:
        return all(any(m["type"] in FINAL_TYPES for m in msgs) for msgs in seen.values())

    async with websockets.connect(ws_url, max_size=None) as ws:
        for rid in request_ids:
            await ws.send(json.dumps({"type": "subscribe", "request_id": rid}))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        stop_at: float | None = None
        while True:
            now = loop.time()
            if stop_at is None and ended():
                stop_at = now + linger
            limit = (stop_at if stop_at is not None else deadline) - now
            if limit <= 0:
                break
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), limit))
            except TimeoutError:
                if stop_at is None:
                    raise AssertionError(f"no final message within {timeout}s: {seen}") from None
                break
            rid = message.get("request_id")
            if rid in seen:
                seen[rid].append(message)
    return seen


def finals(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] in FINAL_TYPES]
