"""A WebSocket fuzzer against a real server: malformed, oversized and out-of-range messages, a curated corpus for
every registered message type and then generated ones. After every message the same connection must still
answer a ping, no message may be answered with an internal error, and the server must keep serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import Server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from security_support import analyze_when_room, base_env, message_types, recv_json, wait_job, ws_connect
from websockets.sync.client import ClientConnection

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LIMIT = 65536  # MAX_WS_MESSAGE_BYTES of the fuzzed server
WRONG_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    2**70,
    -(2**70),
    1.5,
    float("nan"),
    float("inf"),
    "",
    " ",
    "\u0000",
    "x" * 5000,
    "../../etc/passwd",
    [],
    [1, "a", None],
    {},
    {"nested": {"deeper": [{}]}},
]
FIELDS = ["text", "messages", "model_id", "options", "request_id", "client_request_id", "refresh", "generation",
          "analysis"]  # fmt: skip
OPTION_ABUSE: list[dict[str, Any]] = [
    {"optimize_explanations_config": {"best_of_k": 10**9}},
    {"optimize_explanations_config": {"best_of_k": "many"}},
    {"optimize_explanations_config": "yes"},
    {"batch_size": -5},
    {"temperature": float("nan")},
    {"temperature": float("inf")},
    {"seed": 2**64},
    {"last_n_messages": 0},
    {"add_tokens": ["x"] * 10000},
    {"max_new_tokens": 10**9},
    {"positions": [10**9]},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_groups: Path) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("fuzz")
    env = base_env(
        tiny_groups,
        workdir,
        RATE_LIMIT_PER_MINUTE="0",
        MAX_QUEUE_SIZE="6",
        MAX_TEXT_LENGTH="2000",
        MAX_WS_MESSAGE_BYTES=str(LIMIT),
        REQUEST_TIMEOUT="10",
    )
    s = Server(workdir, env, name="fuzz").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def conn(server: Server) -> Iterator[ClientConnection]:
    with ws_connect(server) as ws:
        assert recv_json(ws)["type"] == "connection_established"
        yield ws


def still_usable(ws: ClientConnection, tag: str, sent: Any) -> None:
    """The connection answers a ping after `sent`, and nothing in between was an internal error."""
    ws.send(json.dumps({"type": "ping", "client_request_id": tag}))
    while True:
        msg = recv_json(ws, 60)
        assert not (msg.get("type") == "error" and msg.get("code", 0) >= 500), (str(sent)[:300], msg)
        if msg.get("type") == "pong" and msg.get("client_request_id") == tag:
            return


def corpus() -> Iterator[str | bytes]:
    yield from ("", "{", "}", "nul", "\u0000", '"just a string"', "42", "[]", "null", "true", "[{}]")
    yield "[" * 50_000 + "]" * 50_000  # nested past the parser's recursion limit
    yield '{"type": "analyze", "options": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}"
    yield b"\xff\xfe\x00 not utf-8"
    yield b'{"type": "ping"}'
    yield "z" * (LIMIT + 10)  # over MAX_WS_MESSAGE_BYTES
    yield json.dumps(
        {"type": "analyze", "text": "\u00e9" * (LIMIT // 2 + 10)}
    )  # over it in bytes, not characters
    for t in (5, None, "", "x" * 3000, ["analyze"], {"t": 1}):
        yield json.dumps({"type": t})
    for t in message_types():
        if t == "ping":
            continue
        yield json.dumps({"type": t})
        for field in FIELDS:
            for value in WRONG_VALUES:
                yield json.dumps({"type": t, field: value})
        for options in OPTION_ABUSE:
            yield json.dumps({"type": t, "text": "fuzz", "options": options})
        yield json.dumps({"type": t, "messages": [{"role": "robot", "content": "x"}]})
        yield json.dumps({"type": t, "messages": [{"role": "user"}]})
        yield json.dumps({"type": t, "text": "x", "unexpected": 1})


def test_a_curated_corpus_for_every_message_type(conn: ClientConnection, server: Server) -> None:
    sent = 0
    for i, frame in enumerate(corpus()):
        conn.send(frame)
        still_usable(conn, f"c{i}", frame)
        sent += 1
    assert sent > 500
    rid = analyze_when_room(server, "the server still analyses")
    assert wait_job(server, rid)["status"] == "completed"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(
    kind=st.sampled_from([*message_types(), "nonsense"]),
    fields=st.dictionaries(st.sampled_from([*FIELDS, "batch_size", "seed"]), json_values, max_size=4),
    raw=st.one_of(st.none(), st.text(max_size=200), st.binary(max_size=200)),
)
def test_generated_messages(
    conn: ClientConnection, kind: str, fields: dict[str, Any], raw: str | bytes | None
) -> None:
    frame: str | bytes = raw if raw is not None else json.dumps({"type": kind, **fields})
    conn.send(frame)
    still_usable(conn, "g", frame)


def test_the_server_kept_serving(server: Server) -> None:
    assert server.get("/health").status_code == 200
    with ws_connect(server) as ws:
        assert recv_json(ws)["type"] == "connection_established"
        still_usable(ws, "fresh", "a new connection")
    rid = analyze_when_room(server, "after the fuzzing")
    assert wait_job(server, rid)["status"] == "completed"
    assert "internal error while handling the message" not in server.log_path.read_text()
