"""Authentication, ownership, origins and hosts over real server processes.

The route matrix iterates the routes `create_app` builds (and the WebSocket message types the protocol
registers), so routes and message types added later are covered the day they land."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import FAST, Server
from security_support import (
    API_KEYS,
    GUARD_KINDS,
    KEYS,
    app_routes,
    auth,
    base_env,
    message_types,
    next_of,
    recv_json,
    refusal_of,
    tail,
    usable,
    wait_job,
    ws_connect,
)
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.e2e

# the share page only redirects to the UI's shell (no data); the share it shows is read with the reader's key
PUBLIC = {("GET", "/"), ("GET", "/health"), ("GET", "/ready"), ("GET", "/openapi.json"), ("GET", "/docs"),
          ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc"), ("GET", "/s/{share_id}")}  # fmt: skip
ORIGIN = "https://app.example.org"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, tiny_groups: Path) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("keyed")
    env = base_env(tiny_groups, workdir, API_KEYS=API_KEYS, RATE_LIMIT_PER_MINUTE="0", ALLOWED_ORIGINS=ORIGIN)
    server = Server(workdir, env, name="keyed").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def routes(tiny_groups: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return app_routes(tiny_groups, tmp_path_factory.mktemp("routes"))


def request(server: Server, method: str, path: str, **kw: Any) -> httpx.Response:
    body = kw.pop("content", b"{")  # a body that is not JSON: a route that reads one refuses it with 400
    return httpx.request(method, server.url + path, content=body, timeout=60, **kw)


# -- every route, with and without a key ------------------------------------------------------------------------------
def test_every_route_needs_a_key_except_the_public_ones(keyed: Server, routes: Any) -> None:
    http, _ = routes
    assert len(http) >= 10, http
    for route in http:
        path = route.path()
        anonymous = request(keyed, route.method, path)
        wrong = request(keyed, route.method, path, headers={"Authorization": "Bearer not-a-key"})
        if (route.method, route.template) in PUBLIC:
            anonymous = request(keyed, route.method, path, follow_redirects=True)  # the share page redirects
            assert anonymous.status_code == 200, (route, anonymous.text[:200])
            continue
        for r in (anonymous, wrong):
            assert r.status_code == 401, (route, r.status_code, r.text[:200])
            assert r.headers["www-authenticate"] == "Bearer" and r.json()["kind"] == "unauthorized"
        allowed = request(keyed, route.method, path, headers=auth("bob"))
        refused_by_guard = allowed.status_code in (401, 403) and allowed.json().get("kind") in GUARD_KINDS
        assert not refused_by_guard and allowed.status_code < 500, (
            route,
            allowed.status_code,
            allowed.text[:300],
        )


def test_the_web_ui_loads_without_a_key(keyed: Server) -> None:
    page = keyed.get("/", headers={"accept": "text/html"})
    assert page.status_code == 200 and "<html" in page.text.lower()
    for asset in ("/index.html", "/js/main.js", "/js/auth.js", "/favicon.svg"):
        assert keyed.get(asset).status_code == 200, asset
    assert keyed.get("/no-such-file.js").status_code == 404


def test_every_websocket_message_type_needs_a_key(keyed: Server, routes: Any) -> None:
    _, sockets = routes
    assert "/ws" in sockets
    for headers, key in (({}, None), ({"Authorization": "Bearer not-a-key"}, None)):
        with ws_connect(keyed, key, headers) as ws:
            frame, code = refusal_of(ws)
        assert code == 1008 and frame is not None and frame["code"] == 401
    types = message_types()
    assert {"analyze", "cancel_request", "subscribe", "status", "ping"} <= set(types)
    with ws_connect(keyed, headers=auth("bob")) as ws:  # the header works too
        assert recv_json(ws)["type"] == "connection_established"
        for t in types:
            ws.send(json.dumps({"type": t, "client_request_id": f"t-{t}"}))
            assert usable(ws, f"after-{t}")


def test_the_api_key_query_parameter_is_for_websockets_only(keyed: Server) -> None:
    assert keyed.get(f"/api/v2/models?api_key={KEYS['alice']}").status_code == 401
    with ws_connect(keyed, "alice") as ws:
        assert recv_json(ws)["type"] == "connection_established"


# -- ownership ------------------------------------------------------------------------------------------------------
def test_another_key_cannot_read_stream_subscribe_to_or_cancel_a_job(keyed: Server, routes: Any) -> None:
    r = keyed.post("/analyze", {"text": "alice's private text", "options": FAST}, headers=auth("alice"))
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    assert keyed.get(f"/status/{rid}", headers=auth("alice")).status_code == 200
    http, _ = routes
    owned = [route for route in http if "{request_id}" in route.template]
    assert len(owned) >= 2, owned
    for route in owned:
        theirs = request(keyed, route.method, route.path(request_id=rid), headers=auth("bob"))
        unknown = request(keyed, route.method, route.path(request_id=str(uuid.uuid4())), headers=auth("bob"))
        assert theirs.status_code == 404 == unknown.status_code, (route, theirs.text[:200])
        assert theirs.json()["detail"] == f"unknown request_id {rid!r}"
        assert rid not in json.dumps(keyed.get("/api/history", headers=auth("bob")).json())
    with ws_connect(keyed, "bob") as ws:
        for t in ("subscribe", "status", "cancel_request", "interrupt"):
            ws.send(json.dumps({"type": t, "request_id": rid, "client_request_id": t}))
            err = next_of(ws, {"error", "status", "request_cancelled"})
            assert err["type"] == "error" and err["code"] == 404 and err["client_request_id"] == t, err
    done = wait_job(keyed, rid, auth("alice"))
    assert done["status"] == "completed", done  # nothing bob did touched it
    with ws_connect(keyed, "alice") as ws:
        ws.send(json.dumps({"type": "status", "request_id": rid}))
        assert next_of(ws, {"status", "error"})["type"] == "status"
    admin = keyed.get(f"/status/{rid}", headers=auth("admin"))
    assert admin.status_code == 404  # the admin key is a user like the others for jobs


# -- keyless servers: loopback only, or everyone by opt-in ----------------------------------------------------------
def test_without_a_key_only_loopback_clients_are_served(make_server: Callable[..., Server]) -> None:
    server = make_server()
    remote = {"X-Forwarded-For": "203.0.113.7"}  # uvicorn trusts it from its loopback peer
    for path in ("/health", "/api/v2/models", "/", "/js/main.js"):
        r = server.get(path, headers=remote)
        assert r.status_code == 403 and r.json()["kind"] == "not_local", (path, r.text)
    assert server.get("/api/v2/models").status_code == 200
    with ws_connect(server, headers=remote) as ws:
        frame, code = refusal_of(ws)
    assert code == 1008 and frame is not None and frame["kind"] == "not_local"
    assert "serving loopback clients only" in server.log_path.read_text()
    rebinding = server.get("/api/v2/models", headers={"Host": "attacker.example"})
    assert rebinding.status_code == 400 and rebinding.json()["kind"] == "bad_host"


def test_allow_unauthenticated_serves_everyone_and_keeps_jobs_apart(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(ALLOW_UNAUTHENTICATED="true", RATE_LIMIT_PER_MINUTE="0")
    one, two = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "198.51.100.9"}
    assert server.get("/api/v2/models", headers=one).status_code == 200
    r = server.post("/analyze", {"text": "from one", "options": FAST}, headers=one)
    rid = r.json()["request_id"]
    assert server.get(f"/status/{rid}", headers=two).status_code == 404
    assert server.get(f"/status/{rid}", headers=one).status_code == 200
    assert server.get("/api/v2/models", headers={"Host": "anything.example"}).status_code == 200
    assert "ALLOW_UNAUTHENTICATED=true: every client is served without a key" in server.log_path.read_text()


# -- origins and hosts ------------------------------------------------------------------------------------------------
def test_browser_origins_are_checked_on_rest_and_websocket(keyed: Server) -> None:
    evil = {"Origin": "https://evil.example", **auth("alice")}
    r = keyed.get("/api/v2/models", headers=evil)
    assert r.status_code == 403 and r.json()["kind"] == "bad_origin"
    good = keyed.get("/api/v2/models", headers={"Origin": ORIGIN, **auth("alice")})
    assert good.status_code == 200 and good.headers["access-control-allow-origin"] == ORIGIN
    local = keyed.get("/api/v2/models", headers={"Origin": "http://localhost:3000", **auth("alice")})
    assert local.status_code == 200  # localhost on common ports is added
    own = keyed.get("/api/v2/models", headers={"Origin": keyed.url, **auth("alice")})
    assert own.status_code == 200  # the server's own pages
    preflight = httpx.options(
        keyed.url + "/analyze",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"},
    )  # fmt: skip
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    unauthorized = keyed.get("/api/v2/models", headers={"Origin": ORIGIN})
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == ORIGIN
    with ws_connect(keyed, "alice", {"Origin": "https://evil.example"}) as ws:
        frame, code = refusal_of(ws)
    assert code == 1008 and frame is not None and frame["kind"] == "bad_origin"
    with ws_connect(keyed, "alice", {"Origin": ORIGIN}) as ws:
        assert recv_json(ws)["type"] == "connection_established"


def test_trusted_hosts(make_server: Callable[..., Server]) -> None:
    server = make_server(
        API_KEYS=API_KEYS, ENABLE_TRUSTED_HOST="true", ALLOWED_HOSTS="api.example.org,127.0.0.1"
    )
    ok = server.get("/api/v2/models", headers={"Host": "api.example.org", **auth("alice")})
    assert ok.status_code == 200
    bad = server.get("/api/v2/models", headers={"Host": "evil.example", **auth("alice")})
    assert bad.status_code == 400 and "ALLOWED_HOSTS" in bad.json()["detail"]
    assert server.get("/health", headers={"Host": "evil.example"}).status_code == 400
    with ws_connect(server, "alice", host="localhost") as ws:
        frame, code = refusal_of(ws)
    assert code == 1008 and frame is not None and frame["kind"] == "bad_host"


# -- keys never logged ------------------------------------------------------------------------------------------------
def test_keys_never_reach_the_log(keyed: Server) -> None:
    for name in KEYS:
        keyed.get("/api/v2/models", headers=auth(name))
        keyed.get(f"/api/v2/models?api_key={KEYS[name]}")
        with ws_connect(keyed, name) as ws:
            recv_json(ws)
        try:
            with ws_connect(keyed, query=f"api_key={KEYS[name]}x") as ws:
                refusal_of(ws)
        except ConnectionClosed:
            pass
    text = "\n".join(tail(keyed))
    assert "api_key=***" in text  # the lines are there, scrubbed
    for key in KEYS.values():
        assert key not in text
    assert "API keys required (3: alice, bob, admin; admin: admin)" in text


def test_client_strings_cannot_forge_log_lines(keyed: Server) -> None:
    """A decoded path is written escaped: one request, one log line, no terminal escapes."""
    forged = "1999-12-02 10:37:30,000 CRITICAL forged"
    for raw in ("/x%0a1999-12-02%2010:37:30,000%20CRITICAL%20forged", "/y%1b%5b31mred%0d"):
        assert httpx.get(keyed.url + raw, timeout=30).status_code == 404
    lines = list(tail(keyed))
    assert not any(line.startswith(forged) for line in lines)
    assert sum(f"/x\\x0a{forged}" in line for line in lines) == 1
    assert sum("/y\\x1b[31mred\\x0d" in line for line in lines) == 1
    assert not any("\x1b" in line or "\r" in line for line in lines)


# -- connections and proxies --------------------------------------------------------------------------------------
def test_trickled_headers_are_timed_out(make_server: Callable[..., Server]) -> None:
    """A client that sends its headers a byte at a time gets 408 and loses the connection (slowloris)."""
    import socket
    import time

    server = make_server(HEADER_TIMEOUT="1.5")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0, answer = time.monotonic(), b""
        try:
            for byte in b"X-Slow: " + b"a" * 40:
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
        except OSError:
            pass  # closed by the server while trickling
        sock.settimeout(5)
        while chunk := sock.recv(4096):
            answer += chunk
        seconds = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert seconds < 5
    assert server.get("/health").status_code == 200  # ordinary requests are untouched


def test_a_keyless_server_never_takes_a_proxied_client_for_its_own_user(
    make_server: Callable[..., Server],
) -> None:
    """Behind a proxy that sends only Forwarded or X-Real-IP, a keyless server's clients are not local."""
    server = make_server()
    for headers in (
        {"Forwarded": "for=203.0.113.7"},
        {"X-Real-IP": "203.0.113.7"},
        {"Forwarded": "for=unknown"},
    ):
        r = server.get("/api/v2/models", headers=headers)
        assert r.status_code == 403 and r.json()["kind"] == "not_local", (headers, r.text)
    assert server.get("/api/v2/models").status_code == 200  # the local user, directly


def test_a_trusted_real_ip_header_names_the_client(make_server: Callable[..., Server]) -> None:
    server = make_server(
        ALLOW_UNAUTHENTICATED="true", RATE_LIMIT_PER_MINUTE="0", TRUSTED_PROXY_HEADER="x-real-ip"
    )
    one, two = {"X-Real-IP": "203.0.113.7"}, {"X-Real-IP": "198.51.100.9"}
    rid = server.post("/analyze", {"text": "from one", "options": FAST}, headers=one).json()["request_id"]
    assert server.get(f"/status/{rid}", headers=one).status_code == 200
    assert server.get(f"/status/{rid}", headers=two).status_code == 404
    admin_only = server.post("/reset", headers=one)
    assert admin_only.status_code == 403  # a proxied client is never the local administrator


def test_a_keyless_server_refuses_to_start_on_a_network_address(make_server: Callable[..., Server]) -> None:
    import subprocess
    import sys

    server = make_server(start=False)
    env = {**__import__("os").environ, **server.env, "HOST": "0.0.0.0", "PORT": str(server.port)}
    done = subprocess.run(
        [sys.executable, "-m", "talkative.cli", "serve"], env=env, cwd=server.workdir, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "HOST=0.0.0.0 is not a loopback address" in done.stderr, done.stderr


# -- the current model ------------------------------------------------------------------------------------------------
def test_one_users_switch_never_changes_another_users_model(keyed: Server) -> None:
    """Bob's switch is Bob's; the administrator's switch moves the default of those who chose none; every result
    names the model it ran on."""

    def ran_on(name: str) -> str:
        r = keyed.post("/analyze", {"text": f"{name} asks", "options": FAST}, headers=auth(name))
        assert r.status_code == 200, r.text
        done = wait_job(keyed, r.json()["request_id"], auth(name))
        assert done["status"] == "completed", done
        assert done["model_id"] == done["result"]["metadata"]["model_id"]
        return str(done["result"]["metadata"]["model_id"])

    def current(name: str) -> str:
        return str(keyed.get("/api/v2/models", headers=auth(name)).json()["current_model"])

    switched = keyed.post("/api/v2/models/switch", {"model_id": "tiny-b-l1"}, headers=auth("bob"))
    assert switched.status_code == 200 and switched.json()["status"] == "success", switched.text
    assert ran_on("alice") == "tiny-a-l1" and current("alice") == "tiny-a-l1"
    assert ran_on("bob") == "tiny-b-l1" and current("bob") == "tiny-b-l1"
    try:
        default = keyed.post("/api/v2/models/switch", {"model_id": "tiny-a-l2"}, headers=auth("admin"))
        assert default.status_code == 200, default.text
        assert ran_on("alice") == "tiny-a-l2" and ran_on("bob") == "tiny-b-l1"
        with ws_connect(keyed, "alice") as ws:
            assert recv_json(ws)["current_model"] == "tiny-a-l2"
            ws.send(json.dumps({"type": "switch_model", "model_id": "tiny-a-l1", "client_request_id": "s"}))
            assert next_of(ws, {"model_switch_complete", "error"})["type"] == "model_switch_complete"
        assert ran_on("alice") == "tiny-a-l1" and current("admin") == "tiny-a-l2"
    finally:
        keyed.post("/api/v2/models/switch", {"model_id": "tiny-a-l1"}, headers=auth("admin"))
