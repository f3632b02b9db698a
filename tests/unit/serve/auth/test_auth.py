"""The security building blocks in process: keys, identities, owners, origins, hosts, log scrubbing, the rate
limiter, structured logs, metrics exposition, and the guard middleware on a small app of its own."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, WebSocket
from fastapi.staticfiles import StaticFiles
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from talkative.serve.api.deps import client_identity
from talkative.serve.auth.middleware import Guard
from talkative.serve.auth.policy import (
    AccessPolicy,
    ClientIdentity,
    KeyRing,
    SecurityConfigError,
    bearer,
    host_allowed,
    is_loopback,
    origin_allowed,
    owns,
    scrub,
)
from talkative.serve.auth.ratelimit import RateLimiter
from talkative.serve.jobs.record import Job
from talkative.serve.observability.logs import REQUEST_ID, JsonFormatter, TextFormatter
from talkative.serve.observability.metrics import Metrics
from talkative.serve.observability.request_context import RequestContext
from talkative.serve.settings import Settings

ALICE, BOB, ADMIN = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef", "admin-key-0123456789abcdef"


def settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(model_groups_file=tmp_path / "none.json", data_dir=tmp_path / "data", **kw)


# -- keys -------------------------------------------------------------------------------------------------------------
def test_keyring_names_and_matches(tmp_path: Path) -> None:
    ring = KeyRing.from_settings(settings(tmp_path, api_keys=f" alice:{ALICE} , bob:{BOB},admin:{ADMIN}"))
    assert ring.names == ["alice", "bob", "admin"]
    assert ring.match(ALICE) == "alice" and ring.match(BOB) == "bob" and ring.match(ADMIN) == "admin"
    for wrong in (None, "", ALICE[:-1], ALICE + "x", f"Bearer {ALICE}", ALICE.upper()):
        assert ring.match(wrong) is None, wrong
    assert ALICE not in repr(ring) and BOB not in repr(ring)


def test_single_api_key_is_the_admin_and_combines_with_api_keys(tmp_path: Path) -> None:
    ring = KeyRing.from_settings(settings(tmp_path, api_key=ADMIN, api_keys=f"alice:{ALICE}"))
    assert ring.names == ["alice", "admin"] and ring.match(ADMIN) == "admin"
    policy = AccessPolicy(settings(tmp_path, api_key=ADMIN))
    who = policy.identify("10.0.0.1", ADMIN)
    assert who is not None and who.is_admin and who.key == "key:admin" and who.metered
    assert policy.identify("127.0.0.1", None) is None and policy.identify("127.0.0.1", "nope") is None


@pytest.mark.parametrize(
    ("raw", "single", "problem"),
    [
        ("alice", None, "entry 1 is not name:key"),
        ("alice:", None, "entry 1 is not name:key"),
        ("a b:secret-one", None, "key name"),
        ("alice:secret-one,alice:secret-two", None, "'alice' is given twice"),
        ("alice:same-secret,bob:same-secret", None, "every key must be different"),
        ("admin:secret-one", "secret-two", "API_KEY is the key named admin"),
    ],
)
def test_bad_key_configuration_is_refused_without_showing_keys(
    tmp_path: Path, raw: str, single: str | None, problem: str
) -> None:
    with pytest.raises(SecurityConfigError) as err:
        KeyRing.from_settings(settings(tmp_path, api_keys=raw, api_key=single))
    assert problem in str(err.value)
    for secret in ("secret-one", "secret-two", "same-secret"):
        assert secret not in str(err.value)


def test_settings_never_show_keys(tmp_path: Path) -> None:
    s = settings(tmp_path, api_key=ADMIN, api_keys=f"alice:{ALICE}")
    assert ADMIN not in repr(s) and ALICE not in repr(s) and ADMIN not in str(s)


def test_bearer_header() -> None:
    assert bearer(f"Bearer {ALICE}") == ALICE and bearer(f"bearer   {ALICE} ") == ALICE
    assert bearer(None) is None and bearer("Basic abc") is None and bearer("Bearer") is None


# -- identities and owners --------------------------------------------------------------------------------------------
def test_without_keys_the_local_user_is_an_unmetered_admin_and_others_are_refused(tmp_path: Path) -> None:
    policy = AccessPolicy(settings(tmp_path))
    assert policy.local_only and policy.check_hosts
    local = policy.identify("127.0.0.1", None)
    assert local is not None and local.is_admin and not local.metered and local.key == "ip:127.0.0.1"
    assert policy.refuses_address("10.1.2.3") and not policy.refuses_address("::1")
    assert "loopback clients only" in policy.describe()

    open_policy = AccessPolicy(settings(tmp_path, allow_unauthenticated=True))
    remote = open_policy.identify("10.1.2.3", None)
    assert not open_policy.refuses_address("10.1.2.3") and not open_policy.check_hosts
    assert remote is not None and not remote.is_admin and remote.metered
    assert open_policy.client_cap("ip:10.1.2.3") == 16 and open_policy.client_cap("ip:127.0.0.1") is None
    assert "ALLOW_UNAUTHENTICATED=true" in open_policy.describe()


def test_client_cap_applies_to_every_key(tmp_path: Path) -> None:
    policy = AccessPolicy(settings(tmp_path, api_keys=f"alice:{ALICE}", max_jobs_per_client=3))
    assert policy.client_cap("key:alice") == 3 and policy.client_cap(None) is None
    assert (
        AccessPolicy(settings(tmp_path, api_keys=f"a:{ALICE}", max_jobs_per_client=0)).client_cap("key:a")
        is None
    )
    described = policy.describe()
    assert "alice" in described and ALICE not in described


def test_jobs_belong_to_their_submitter() -> None:
    job = Job(id="j", kind="analyze", request={}, model_id=None, group_id=None, owner="key:alice")
    alice = ClientIdentity(key="key:alice", address=None, authenticated=True, name="alice")
    admin = ClientIdentity(key="key:admin", address=None, authenticated=True, name="admin", is_admin=True)
    assert owns(alice, job) and not owns(admin, job)
    orphan = Job(id="k", kind="analyze", request={}, model_id=None, group_id=None, owner=None)
    assert owns(admin, orphan) and not owns(alice, orphan)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        (None, True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("192.168.1.2", False),
        ("testclient", False),
        ("localhost", False),
    ],
)
def test_loopback(address: str | None, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_hosts_and_origins() -> None:
    hosts = ["localhost", "127.0.0.1", "::1", "*.example.org"]
    for ok in (
        "localhost:8000",
        "LOCALHOST",
        "127.0.0.1:1",
        "[::1]:8000",
        "api.example.org",
        "a.b.example.org:443",
    ):
        assert host_allowed(ok, hosts), ok
    for bad in (None, "evil.test", "example.org", "localhost.evil.test", "127.0.0.2"):
        assert not host_allowed(bad, hosts), bad
    assert host_allowed("anything", ["*"])

    allowed = ["https://app.example.org", "http://localhost:3000"]
    assert origin_allowed(None, allowed, "x")  # not a browser page
    assert origin_allowed("https://app.example.org", allowed, "api.example.org")
    assert origin_allowed("http://myhost:8000", allowed, "myhost:8000")  # the server's own pages
    assert not origin_allowed("https://evil.test", allowed, "api.example.org")
    assert not origin_allowed("http://myhost:8001", allowed, "myhost:8000")
    assert not origin_allowed("null", allowed, "myhost:8000")
    assert origin_allowed("https://evil.test", ["*"], None)


def test_default_origins_add_localhost_ports(tmp_path: Path) -> None:
    policy = AccessPolicy(settings(tmp_path, allowed_origins="https://app.example.org", port=8123))
    for origin in (
        "https://app.example.org",
        "http://localhost:3001",
        "https://127.0.0.1:8001",
        "http://localhost:8123",
    ):
        assert origin in policy.origins
    assert AccessPolicy(settings(tmp_path, allowed_origins="*")).origins == ["*"]


def test_scrub_removes_anything_shaped_like_a_key() -> None:
    line = f'127.0.0.1 - "WebSocket /ws?api_key={ALICE}&x=1" [accepted] Authorization: Bearer {BOB}, {ADMIN}'
    out = scrub(line, (ALICE, BOB, ADMIN))
    assert ALICE not in out and BOB not in out and ADMIN not in out
    assert "api_key=***&x=1" in out and "Bearer ***" in out
    assert scrub("nothing to see", ("short",)) == "nothing to see"


# -- logs -------------------------------------------------------------------------------------------------------------
def _record(message: str, *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.getLogger("talkative.test").makeRecord(
        "talkative.test", logging.INFO, __file__, 1, message, args, None, extra=extra or None
    )
    return record


def test_json_logs_carry_the_request_id_and_no_key() -> None:
    token = REQUEST_ID.set("req-123")
    try:
        line = JsonFormatter((ALICE,)).format(
            _record("connect /ws?api_key=%s", ALICE, status=200, path="/ws")
        )
    finally:
        REQUEST_ID.reset(token)
    data = json.loads(line)
    assert data["request_id"] == "req-123" and data["level"] == "info" and data["logger"] == "talkative.test"
    assert data["status"] == 200 and data["path"] == "/ws" and data["time"].endswith("Z")
    assert ALICE not in line and "api_key=***" in data["message"]
    try:
        raise RuntimeError(f"boom with {ALICE}")
    except RuntimeError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    data = json.loads(JsonFormatter((ALICE,)).format(record))
    assert "boom" in data["exception"] and ALICE not in data["exception"] and data["request_id"] is None
    text = TextFormatter((ALICE,)).format(_record("key %s", ALICE))
    assert ALICE not in text and "[-]" in text


# -- metrics ----------------------------------------------------------------------------------------------------------
def test_metrics_registries_are_per_app_and_parse() -> None:
    a, b = Metrics(), Metrics()
    a.reject("rate_limited")
    a.stage("verbalize", 0.2)
    a.switch_event({"type": "group_switch_status", "status": "completed", "group_id": "g", "seconds": 1.5})
    a.switch_event({"type": "group_switch_status", "status": "failed", "group_id": "h"})
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(a.registry).decode())}
    rejected = {s.labels["reason"]: s.value for s in families["talkative_rejected_requests"].samples}
    assert rejected["rate_limited"] == 1
    stage = [s for s in families["talkative_stage_duration_seconds"].samples if s.name.endswith("_count")]
    assert stage[0].labels["stage"] == "verbalize" and stage[0].value == 1
    switches = {
        (s.labels["group"], s.labels["outcome"]) for s in families["talkative_group_switches"].samples
    }
    assert {("g", "completed"), ("h", "failed")} <= switches
    assert "rate_limited" not in generate_latest(b.registry).decode()
    assert a.summary()["rejected_requests"] == {"rate_limited": 1}


# -- the guard on an app of its own -----------------------------------------------------------------------------------
def guarded_app(tmp_path: Path, **kw: Any) -> FastAPI:
    cfg = settings(tmp_path, **kw)
    policy, metrics = AccessPolicy(cfg), Metrics()
    app = FastAPI()
    app.state.access_policy = policy
    api = APIRouter(dependencies=[Depends(client_identity)])

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "healthy"}

    @api.get("/things/{thing_id}")
    async def thing(thing_id: str, who: ClientIdentity = Depends(client_identity)) -> dict[str, Any]:
        return {"id": thing_id, "who": who.key}

    @api.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @api.get("/busy")
    async def busy() -> Any:
        from fastapi.responses import JSONResponse

        return JSONResponse({"detail": "full"}, status_code=429)

    app.include_router(api)
    static = tmp_path / "web"
    static.mkdir(exist_ok=True)
    (static / "index.html").write_text("<html>ui</html>")
    (static / "app.js").write_text("console.log(1)")
    app.mount("/", StaticFiles(directory=static, html=True), name="web")
    app.add_middleware(
        Guard, policy=policy, limiter=RateLimiter(cfg.rate_limit_per_minute), metrics=metrics, max_body=2048
    )
    app.add_middleware(RequestContext, metrics=metrics)
    app.state.metrics = metrics
    return app


def test_guard_protects_routes_it_was_never_told_about(tmp_path: Path) -> None:
    app = guarded_app(tmp_path, api_keys=f"alice:{ALICE}", rate_limit_per_minute=0)
    client = TestClient(app, client=("10.9.8.7", 5000))
    assert client.get("/health").status_code == 200
    assert client.get("/").text == "<html>ui</html>" and client.get("/app.js").status_code == 200
    r = client.get("/things/1")
    assert (
        r.status_code == 401
        and r.headers["www-authenticate"] == "Bearer"
        and r.json()["kind"] == "unauthorized"
    )
    assert client.get("/things/1", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/things/1", headers={"Authorization": f"Bearer {ALICE}"})
    assert ok.status_code == 200 and ok.json()["who"] == "key:alice" and ok.headers["x-request-id"]
    assert client.post("/health").status_code == 401  # a known path with another method is still protected
    mine = client.get("/things/1", headers={"Authorization": f"Bearer {ALICE}", "X-Request-ID": "abc.123"})
    assert mine.headers["x-request-id"] == "abc.123"


def test_guard_limits_bodies_as_they_stream(tmp_path: Path) -> None:
    app = guarded_app(tmp_path, api_keys=f"alice:{ALICE}", rate_limit_per_minute=0)
    client = TestClient(app)
    auth = {"Authorization": f"Bearer {ALICE}"}
    assert client.post("/echo", content=b"x" * 2048, headers=auth).json() == {"bytes": 2048}
    declared = client.post("/echo", content=b"x" * 4096, headers=auth)
    assert declared.status_code == 413 and declared.json()["kind"] == "too_large"

    def chunks() -> Any:  # no Content-Length: the guard must count
        for _ in range(10):
            yield b"y" * 512

    streamed = client.post("/echo", content=chunks(), headers=auth)
    assert streamed.status_code == 413 and "MAX_REQUEST_BYTES" in streamed.json()["detail"]


def test_guard_rate_limits_and_adds_retry_after(tmp_path: Path) -> None:
    app = guarded_app(tmp_path, api_keys=f"alice:{ALICE},bob:{BOB}", rate_limit_per_minute=3)
    client = TestClient(app)
    alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
    assert [client.get("/things/1", headers=alice).status_code for _ in range(3)] == [200, 200, 200]
    limited = client.get("/things/1", headers=alice)
    assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.json()["kind"] == "rate_limited"
    assert client.get("/things/1", headers=bob).status_code == 200
    assert client.get("/health").status_code == 200  # public paths cost nothing
    busy = client.get("/busy", headers=bob)  # a 429 from a route gets a Retry-After too
    assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1


def test_guard_local_mode_hosts_and_origins(tmp_path: Path) -> None:
    app = guarded_app(tmp_path)
    local = TestClient(app, client=("127.0.0.1", 5000), base_url="http://localhost:8000")
    assert local.get("/things/1").json()["who"] == "ip:127.0.0.1"
    remote = TestClient(app, client=("10.0.0.7", 5000), base_url="http://localhost:8000")
    refused = remote.get("/health")
    assert refused.status_code == 403 and refused.json()["kind"] == "not_local"
    rebound = TestClient(app, client=("127.0.0.1", 5000), base_url="http://evil.test:8000")
    assert rebound.get("/things/1").status_code == 400 and rebound.get("/health").status_code == 400
    foreign = local.get("/things/1", headers={"Origin": "https://evil.test"})
    assert foreign.status_code == 403 and foreign.json()["kind"] == "bad_origin"
    assert local.get("/things/1", headers={"Origin": "http://localhost:3000"}).status_code == 200
    assert (
        local.get("/things/1", headers={"Origin": "http://localhost:8000"}).status_code == 200
    )  # own origin


def test_guard_refuses_websockets_after_accepting_them(tmp_path: Path) -> None:
    app = guarded_app(tmp_path, api_keys=f"alice:{ALICE}", rate_limit_per_minute=0)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"type": "hello"})
        await websocket.close()

    app.router.routes.insert(0, app.router.routes.pop())  # before the static mount, as create_app orders them
    client = TestClient(app)
    with client.websocket_connect("/ws") as conn:
        frame = conn.receive_json()
        assert frame["type"] == "error" and frame["code"] == 401
        with pytest.raises(WebSocketDisconnect) as closed:
            conn.receive_json()
        assert closed.value.code == 1008
    with client.websocket_connect(f"/ws?api_key={ALICE}") as conn:
        assert conn.receive_json() == {"type": "hello"}
    with client.websocket_connect("/ws", headers={"Authorization": f"Bearer {ALICE}"}) as conn:
        assert conn.receive_json() == {"type": "hello"}
    with client.websocket_connect(f"/ws?api_key={ALICE}", headers={"Origin": "https://evil.test"}) as conn:
        assert conn.receive_json()["kind"] == "bad_origin"


def test_request_context_counts_by_route_template(tmp_path: Path) -> None:
    app = guarded_app(tmp_path, api_keys=f"alice:{ALICE}", rate_limit_per_minute=0)
    client = TestClient(app)
    client.get("/things/1", headers={"Authorization": f"Bearer {ALICE}"})
    client.get("/things/2", headers={"Authorization": f"Bearer {ALICE}"})
    client.get("/things/1")
    text = generate_latest(app.state.metrics.registry).decode()
    assert 'talkative_http_requests_total{method="GET",route="/things/{thing_id}",status="200"} 2.0' in text
    assert 'reason="unauthorized"' in text


def test_without_the_guard_the_dependencies_still_refuse(tmp_path: Path) -> None:
    """An app assembled by hand (no guard in front): the dependencies authenticate by themselves."""
    from talkative.serve.api.deps import websocket_identity

    app = FastAPI()
    app.state.access_policy = AccessPolicy(settings(tmp_path, api_keys=f"alice:{ALICE}"))

    @app.get("/mine")
    async def mine(who: ClientIdentity = Depends(client_identity)) -> dict[str, str]:
        return {"who": who.key}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        who = await websocket_identity(websocket)
        if who is None:
            return
        await websocket.accept()
        await websocket.send_json({"who": who.key})
        await websocket.close()

    client = TestClient(app)
    assert client.get("/mine").status_code == 401
    assert client.get("/mine", headers={"Authorization": f"Bearer {ALICE}"}).json() == {"who": "key:alice"}
    with client.websocket_connect("/ws") as conn:
        assert conn.receive_json()["code"] == 401
        with pytest.raises(WebSocketDisconnect) as closed:
            conn.receive_json()
        assert closed.value.code == 1008
    with client.websocket_connect(f"/ws?api_key={ALICE}") as conn:
        assert conn.receive_json() == {"who": "key:alice"}
    local_only = FastAPI()
    local_only.state.access_policy = AccessPolicy(settings(tmp_path))
    local_only.add_api_route("/mine", mine)
    assert TestClient(local_only, client=("10.0.0.9", 1)).get("/mine").status_code == 401
    assert TestClient(local_only, client=("127.0.0.1", 1)).get("/mine").json() == {"who": "ip:127.0.0.1"}


def test_client_strings_cannot_forge_log_lines_or_drive_terminals() -> None:
    forged = "/x\n2026-12-02 10:37:30,000 CRITICAL forged\r\x1b[31mred\u2028\x9b"
    text = TextFormatter().format(_record('"GET %s" 404', forged))
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\x9b" not in text
    assert "\\x0a2026-12-02 10:37:30,000 CRITICAL forged\\x0d\\x1b[31mred\\u2028\\x9b" in text
    try:
        raise ValueError("bad input\n1999-12-02 10:37:30,000 CRITICAL forged")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    lines = TextFormatter().format(record).splitlines()
    assert len(lines) > 2 and all(line.startswith("  ") for line in lines[1:])  # the traceback, indented
    assert not any(line.startswith("1999-12-02") for line in lines)
    data = json.loads(JsonFormatter().format(_record("GET %s", forged, path=forged)))
    for value in (data["message"], data["path"]):
        assert "\n" not in value and "\x1b" not in value and "\\x0a2026" in value and "\\x1b[31m" in value


# -- proxies and the bind address -------------------------------------------------------------------------------------
def _scope(peer: str, **headers: str) -> dict[str, Any]:
    return {
        "client": (peer, 1234),
        "headers": [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()],
    }


def test_proxied_requests_are_never_local_and_only_the_trusted_header_names_the_client(
    tmp_path: Path,
) -> None:
    from talkative.serve.auth.policy import client_address

    assert client_address(_scope("127.0.0.1"), "x-forwarded-for") == ("127.0.0.1", False)
    assert client_address(_scope("127.0.0.1", X_Real_IP="203.0.113.7"), "x-forwarded-for") == (
        "127.0.0.1",
        True,
    )
    assert client_address(_scope("127.0.0.1", X_Real_IP="203.0.113.7"), "x-real-ip") == ("203.0.113.7", True)
    forwarded = _scope("::1", Forwarded='for=192.0.2.1, for="[2001:db8::1]:4711";proto=https')
    assert client_address(forwarded, "forwarded") == ("2001:db8::1", True)
    assert client_address(_scope("127.0.0.1", Forwarded="for=_hidden"), "forwarded") == ("127.0.0.1", True)
    # from a peer that is not the local proxy, the header could be forged: the peer is the client
    assert client_address(_scope("198.51.100.2", X_Real_IP="127.0.0.1"), "x-real-ip") == (
        "198.51.100.2",
        True,
    )
    policy = AccessPolicy(settings(tmp_path))
    assert policy.refuses_address("127.0.0.1", proxied=True) and not policy.refuses_address("127.0.0.1")
    open_policy = AccessPolicy(settings(tmp_path, allow_unauthenticated=True))
    who = open_policy.identify("127.0.0.1", None, proxied=True)
    assert who is not None and not who.is_admin and who.metered and who.key == "proxy:127.0.0.1"
    assert open_policy.metered_owner(who.key) and not open_policy.metered_owner("ip:127.0.0.1")


def test_a_keyless_server_binds_loopback_and_refuses_a_network_address(tmp_path: Path) -> None:
    from talkative.serve.auth.policy import startup_refusal

    def refusal(**kw: Any) -> str | None:
        s = settings(tmp_path, **kw)
        return startup_refusal(s, KeyRing.from_settings(s))

    assert settings(tmp_path).bind_host() == "127.0.0.1" and refusal() is None
    assert settings(tmp_path, api_key=ADMIN).bind_host() == "0.0.0.0" and refusal(api_key=ADMIN) is None
    assert refusal(host="localhost") is None and refusal(host="::1") is None
    message = refusal(host="0.0.0.0")
    assert message is not None and "HOST=0.0.0.0" in message and "ALLOW_UNAUTHENTICATED" in message
    assert refusal(host="0.0.0.0", allow_unauthenticated=True) is None
    assert refusal(host="0.0.0.0", api_keys=f"alice:{ALICE}") is None


# -- strict request bodies --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        {"text": "x", "options": {"optimize_explanations_config": {"best_of_k": "2"}}},
        {"text": "x", "options": {"optimize_explanations_config": {"best_of_k": True}}},
        {"text": "x", "options": {"seed": "7"}},
        {"text": "x", "options": {"no_kl": 1}},
        {"text": "x", "options": {"no_kl": "true"}},
        {"text": "x", "options": {"temperature": "0.5"}},
    ],
)
def test_numbers_and_booleans_must_be_json_numbers_and_booleans(body: dict[str, Any]) -> None:
    from pydantic import ValidationError

    from talkative.serve.api.schemas import AnalyzeRequest, GenerateRequest
    from talkative.serve.errors import describe_validation_error

    with pytest.raises(ValidationError) as refused:
        AnalyzeRequest.model_validate(body)
    assert "must be" in describe_validation_error(refused.value.errors())
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({"text": "x", "options": {"max_new_tokens": "5"}})
    ok = AnalyzeRequest.model_validate(
        {"text": "x", "options": {"seed": 7, "no_kl": True, "temperature": 1, "batch_size": 4.0}}
    )
    assert ok.options is not None and ok.options.temperature == 1.0 and ok.options.batch_size == 4


def test_the_openapi_description_documents_what_the_server_answers(tmp_path: Path) -> None:
    from talkative.serve.app import create_app
    from talkative.serve.settings import default_model_groups_file

    groups = default_model_groups_file()
    app = create_app(
        Settings(model_groups_file=groups, data_dir=tmp_path / "data", api_keys=f"alice:{ALICE}")
    )
    schema = app.openapi()
    text = json.dumps(schema)
    assert '"422"' not in text and "HTTPValidationError" not in text
    analyze = schema["paths"]["/analyze"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "413", "429", "503"} <= set(analyze)
    assert "Retry-After" in analyze["429"]["headers"] and "WWW-Authenticate" in analyze["401"]["headers"]
    assert set(schema["paths"]["/health"]["get"]["responses"]) == {"200", "400", "403"}
    assert schema["paths"]["/analyze"]["post"]["security"]
    keyless = create_app(Settings(model_groups_file=groups, data_dir=tmp_path / "data2")).openapi()
    assert "401" not in keyless["paths"]["/analyze"]["post"]["responses"]  # nothing asks for a key there
    assert "security" not in keyless["paths"]["/analyze"]["post"]
