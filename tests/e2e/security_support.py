"""Helpers of the end-to-end tests of security, limits and faults: keys, keyed servers, WebSocket clients,
and the app's routes as the server really has them (read from `create_app`, so routes added later are covered)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e_helpers import Server
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

KEYS = {
    "alice": "alice-3f9c2a7d1e8b4c6a9d0e",
    "bob": "bob-8a1d4e7c2b9f3a6d5c0b",
    "admin": "admin-5e2b8d1a7c4f9e3b6a0d",
}
API_KEYS = ",".join(f"{name}:{key}" for name, key in KEYS.items())
GUARD_KINDS = {"unauthorized", "not_local", "bad_origin", "bad_host", "rate_limited", "draining", "too_large"}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def base_env(groups: Path, workdir: Path, **env: str) -> dict[str, str]:
    return {
        "MODEL_GROUPS_FILE": str(groups),
        "DATA_DIR": str(workdir / "data"),
        "QUEUE_UPDATE_INTERVAL": "0.5",
        "HF_HUB_OFFLINE": "1",
        **env,
    }


def ws_connect(
    server: Server,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    query: str = "",
    host: str = "127.0.0.1",
) -> ClientConnection:
    """A WebSocket to the server; `key` names a key of KEYS sent as the api_key query parameter; `host` is the
    name in the URL (hence the Host header: a second Host header would be a malformed request)."""
    params = [f"api_key={KEYS[key]}"] if key else []
    if query:
        params.append(query)
    url = server.ws_url.replace("127.0.0.1", host) + ("?" + "&".join(params) if params else "")
    return connect(url, open_timeout=30, max_size=None, additional_headers=headers or {})


def recv_json(ws: ClientConnection, timeout: float = 30) -> dict[str, Any]:
    return dict(json.loads(ws.recv(timeout=timeout)))


def next_of(ws: ClientConnection, types: set[str], timeout: float = 60) -> dict[str, Any]:
    """The next message of one of `types`, skipping others (queue updates, progress)."""
    deadline = time.time() + timeout
    while True:
        left = deadline - time.time()
        assert left > 0, f"no {types} within {timeout}s"
        msg = recv_json(ws, left)
        if msg.get("type") in types:
            return msg


def refusal_of(ws: ClientConnection, timeout: float = 30) -> tuple[dict[str, Any] | None, int | None]:
    """For a refused handshake: the error frame sent before the close, and the close code."""
    frame: dict[str, Any] | None = None
    try:
        while True:
            msg = recv_json(ws, timeout)
            if msg.get("type") == "error":
                frame = msg
    except ConnectionClosed as closed:
        return frame, closed.rcvd.code if closed.rcvd else None


def usable(ws: ClientConnection, tag: str = "alive") -> bool:
    """Ping the server over `ws` and wait for the pong: the connection still works."""
    ws.send(json.dumps({"type": "ping", "client_request_id": tag}))
    while True:
        msg = recv_json(ws, 30)
        if msg.get("type") == "pong" and msg.get("client_request_id") == tag:
            return True


@dataclass(frozen=True)
class HttpRoute:
    method: str
    template: str

    def path(self, **values: str) -> str:
        """The template with every `{param}` filled (by name when given, else with a harmless word)."""
        out = self.template
        while "{" in out:
            start = out.index("{")
            end = out.index("}", start)
            name = out[start + 1 : end].split(":")[0]
            out = out[:start] + values.get(name, "nothing-here") + out[end + 1 :]
        return out


def app_routes(groups: Path, workdir: Path) -> tuple[list[HttpRoute], list[str]]:
    """Every HTTP route (method, template) and WebSocket path of the app that `talkative serve` builds."""
    from fastapi.routing import iter_route_contexts
    from starlette.routing import Mount

    from talkative.serve.app import create_app
    from talkative.serve.settings import Settings

    app = create_app(Settings(model_groups_file=groups, data_dir=workdir / "routes-data"))
    http: list[HttpRoute] = []
    sockets: list[str] = []
    for ctx in iter_route_contexts(app.routes):
        if isinstance(ctx.original_route, Mount) or ctx.path is None:
            continue
        if ctx.methods is None:
            sockets.append(ctx.path)
            continue
        for method in sorted(ctx.methods - {"HEAD"}):
            http.append(HttpRoute(method, ctx.path))
    return http, sockets


def message_types() -> list[str]:
    """Every WebSocket message type the protocol handles (new ones included as they are registered)."""
    from talkative.serve.api.ws import protocol as ws

    return sorted(ws.HANDLERS)


def tail(server: Server) -> Iterator[str]:
    yield from server.log_path.read_text(errors="replace").splitlines()


def wait_job(
    server: Server, request_id: str, headers: dict[str, str] | None = None, timeout: float = 120
) -> dict[str, Any]:
    """Poll /status (with the given key) until the job is terminal."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = server.get(f"/status/{request_id}", headers=headers or {})
        assert r.status_code == 200, r.text
        body = dict(r.json())
        if body["status"] in ("completed", "failed", "cancelled"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"{request_id} did not finish in {timeout}s")


def analyze_when_room(server: Server, text: str, timeout: float = 120, **options: Any) -> str:
    """Submit like a polite client: on 429/503, wait as Retry-After says and try again."""
    from e2e_helpers import FAST

    deadline = time.time() + timeout
    while True:
        r = server.post("/analyze", {"text": text, "options": {**FAST, **options}})
        if r.status_code == 200:
            return str(r.json()["request_id"])
        assert r.status_code in (429, 503) and time.time() < deadline, r.text
        time.sleep(min(float(r.headers.get("retry-after", "1")), 2.0))
