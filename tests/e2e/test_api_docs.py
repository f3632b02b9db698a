"""Every worked example of `docs/api.md`, run in order against a started server on the bundled SmolLM2.

The examples are parsed from the markdown, so the document and this test cannot drift apart:

* an ```` ```http request ```` block (`METHOD /path`, optional headers, a blank line, a JSON body) is sent, and
  the next ```` ```http response ```` block (`HTTP/1.1 <status> …`, optional headers, a blank line, a JSON body
  or `data:` lines of an event stream) is what must come back;
* a ```` ```websocket ```` block is a conversation on one connection: `>` frames are sent, and for each `<` frame
  the next message of that `type` (and `client_request_id`, when the frame has one) must arrive; messages the
  block does not show (`queue_update`, more `token`s, …) may come in between.

A documented answer matches an actual one when every documented key is there with a value of the same JSON type
(recursively; a list is checked through its first item), `type`, `status`, `context`, `kind`, `stage`,
`model_id` and `group_id` are equal, and `null` stands for any value. Ids and abbreviated values (a string
ending in `…`) that a documented answer shows are remembered with their actual values, and replaced by them
wherever a later request uses them. A GET whose documented answer has a final `status` is repeated until the
job gets there.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from e2e_helpers import REPO, Server
from websockets.sync.client import ClientConnection, connect

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

DOC = REPO / "docs" / "api.md"
FENCE = re.compile(r"^```([a-z]+(?: [a-z]+)?)\n(.*?)^```$", re.M | re.S)
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
EXACT = ("type", "status", "context", "kind", "stage", "model_id", "group_id")
FINAL = ("completed", "failed", "cancelled")
#: the second group the documented server serves (beside the repository's model_groups.json)
SECOND_GROUP = {
    "group_id": "smollm2-135m-b",
    "group_name": "SmolLM2 135M Instruct (second copy)",
    "base_model_path": "bundled:smollm2-135m-instruct",
    "description": "A second group on the same base, to show switching between groups.",
    "models": [
        {
            "id": "smollm2-135m-b-l5",
            "name": "SmolLM2 135M L5 (untrained)",
            "checkpoint": "init:bundled:smollm2-135m-instruct@5",
            "layer": 5,
            "auto_batch_size_max": 64,
        }
    ],
}


# -- parsing --------------------------------------------------------------------------------------------------------
@dataclass
class HttpExample:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int
    response_headers: dict[str, str]
    response: Any  # JSON, or a list of event-stream payloads
    line: int


@dataclass
class WsExample:
    frames: list[tuple[str, Any]] = field(default_factory=list)  # (">" | "<", message)
    line: int = 0


def _split(text: str) -> tuple[str, dict[str, str], str]:
    head, _, body = text.partition("\n\n")
    first, *rest = head.strip().splitlines()
    headers = {}
    for line in rest:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return first.strip(), headers, body.strip()


def _events(body: str) -> list[Any]:
    out: list[Any] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def _ws_frames(text: str) -> list[tuple[str, Any]]:
    frames: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line[:2] in ("> ", "< "):
            frames.append((line[0], [line[2:]]))
        elif frames and line.strip():
            frames[-1][1].append(line)
    return [(d, json.loads("\n".join(body))) for d, body in frames]


def parse(markdown: str) -> list[HttpExample | WsExample]:
    examples: list[HttpExample | WsExample] = []
    pending: tuple[str, str, dict[str, str], Any, int] | None = None
    for m in FENCE.finditer(markdown):
        info, text = m.group(1), m.group(2)
        line = markdown.count("\n", 0, m.start()) + 1
        if info == "http request":
            assert pending is None, f"docs/api.md:{line}: a request follows a request without its response"
            first, headers, body = _split(text)
            method, path = first.split(None, 1)
            pending = (method, path, headers, json.loads(body) if body else None, line)
        elif info == "http response":
            assert pending is not None, f"docs/api.md:{line}: a response without a request"
            first, headers, body = _split(text)
            status = int(first.split()[1])
            if headers.get("content-type", "").startswith("text/event-stream"):
                response: Any = _events(body)
            elif headers.get("content-type", "").startswith("application/x-ndjson"):
                response = [json.loads(line) for line in body.splitlines() if line.strip()]
            else:
                response = json.loads(body) if body else None
            method, path, req_headers, req_body, req_line = pending
            examples.append(
                HttpExample(method, path, req_headers, req_body, status, headers, response, req_line)
            )
            pending = None
        elif info == "websocket":
            examples.append(WsExample(_ws_frames(text), line))
    assert pending is None, "docs/api.md ends with a request without its response"
    return examples


# -- matching -------------------------------------------------------------------------------------------------------
class Values:
    """Documented ids and abbreviated values, and the actual values they stood for."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    @staticmethod
    def remembered(doc: str) -> bool:
        return bool(UUID.match(doc)) or (doc.endswith("…") and len(doc) > 8)

    def substitute(self, value: Any) -> Any:
        if isinstance(value, str):
            if value in self.seen:
                return self.seen[value]
            for doc, actual in self.seen.items():
                if UUID.match(doc) and doc in value:
                    value = value.replace(doc, actual)
            return value
        if isinstance(value, list):
            return [self.substitute(v) for v in value]
        if isinstance(value, dict):
            return {k: self.substitute(v) for k, v in value.items()}
        return value

    def match(self, doc: Any, actual: Any, where: str) -> None:
        if doc is None:
            return
        if isinstance(doc, bool) or isinstance(actual, bool):
            assert isinstance(actual, bool) and isinstance(doc, bool), f"{where}: {actual!r} is not a boolean"
        elif isinstance(doc, int | float):
            assert isinstance(actual, int | float), f"{where}: {actual!r} is not a number"
        elif isinstance(doc, str):
            assert isinstance(actual, str), f"{where}: {actual!r} is not a string"
            if self.remembered(doc):
                self.seen.setdefault(doc, actual)
        elif isinstance(doc, list):
            assert isinstance(actual, list), f"{where}: {actual!r} is not a list"
            if doc and actual:
                self.match(doc[0], actual[0], f"{where}[0]")
            elif doc:
                raise AssertionError(f"{where}: the list is empty, the document shows items")
        elif isinstance(doc, dict):
            assert isinstance(actual, dict), f"{where}: {actual!r} is not an object"
            for key, value in doc.items():
                assert key in actual, f"{where}: no {key!r} in {sorted(actual)}"
                if key in EXACT and value is not None and not self.remembered(str(value)):
                    assert actual[key] == value, f"{where}.{key}: {actual[key]!r}, documented {value!r}"
                self.match(value, actual[key], f"{where}.{key}")


# -- running --------------------------------------------------------------------------------------------------------
def run_http(server: Server, ex: HttpExample, values: Values) -> None:
    path = values.substitute(ex.path)
    body = values.substitute(ex.body)
    where = f"docs/api.md:{ex.line} {ex.method} {ex.path}"
    headers = {k: values.substitute(v) for k, v in ex.headers.items()}
    documented_type = ex.response_headers.get("content-type", "")
    if documented_type.startswith("text/event-stream"):
        with httpx.stream(ex.method, server.url + path, json=body, headers=headers, timeout=300) as resp:
            assert resp.status_code == ex.status, f"{where}: {resp.status_code} {resp.read()!r}"
            assert resp.headers["content-type"].startswith("text/event-stream"), where
            actual = _events("\n".join(resp.iter_lines()))
        check_events(ex.response, actual, values, where)
        return
    deadline = time.time() + 300
    while True:
        resp = httpx.request(ex.method, server.url + path, json=body, headers=headers, timeout=300)
        got = _body(resp)
        waiting = (
            ex.method == "GET"
            and isinstance(ex.response, dict)
            and ex.response.get("status") in FINAL
            and isinstance(got, dict)
            and got.get("status") not in FINAL
        )
        if not waiting or time.time() > deadline:
            break
        time.sleep(0.2)
    assert resp.status_code == ex.status, f"{where}: {resp.status_code} {resp.text}"
    for name in ex.response_headers:
        if name != "content-type":
            assert name in resp.headers, f"{where}: no {name} header"
    if documented_type:
        assert resp.headers["content-type"].startswith(documented_type), (
            f"{where}: {resp.headers['content-type']}"
        )
    values.match(ex.response, got, where)


def _body(resp: httpx.Response) -> Any:
    """A JSON answer, the lines of a JSONL one, or None for an empty or binary one (checked by its headers)."""
    kind = resp.headers.get("content-type", "")
    if not resp.content:
        return None
    if kind.startswith("application/x-ndjson"):
        return [json.loads(line) for line in resp.text.splitlines() if line.strip()]
    if kind.startswith("application/") and "json" in kind:
        return resp.json()
    return None


def check_events(doc: list[Any], actual: list[Any], values: Values, where: str) -> None:
    assert actual and actual[-1] == "[DONE]", f"{where}: the stream does not end with [DONE]"
    i = 0
    for n, event in enumerate(doc):
        if event == "[DONE]":
            continue
        while i < len(actual) and (actual[i] == "[DONE]" or actual[i].get("type") != event["type"]):
            i += 1
        assert i < len(actual), f"{where}: no {event['type']} event (documented event {n})"
        values.match(event, actual[i], f"{where} event {n}")
        i += 1


def receive(ws: ClientConnection, frame: dict[str, Any], where: str) -> dict[str, Any]:
    deadline = time.time() + 300
    while True:
        left = deadline - time.time()
        assert left > 0, f"{where}: no {frame['type']} message"
        msg = json.loads(ws.recv(timeout=left))
        if msg.get("type") != frame["type"]:
            continue
        if "client_request_id" in frame and msg.get("client_request_id") != frame["client_request_id"]:
            continue
        return dict(msg)


def run_ws(server: Server, ex: WsExample, values: Values) -> None:
    with connect(server.ws_url, open_timeout=30, max_size=None) as ws:
        for n, (direction, frame) in enumerate(ex.frames):
            where = f"docs/api.md:{ex.line} frame {n} ({frame.get('type')})"
            if direction == ">":
                ws.send(json.dumps(values.substitute(frame)))
            else:
                values.match(frame, receive(ws, frame, where), where)


def examples() -> Iterator[HttpExample | WsExample]:
    yield from parse(DOC.read_text())


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The repository's model_groups.json (the bundled SmolLM2) plus a second group, as the document says."""
    root = tmp_path_factory.mktemp("api-docs")
    groups = json.loads((REPO / "model_groups.json").read_text())
    groups["model_groups"].append(SECOND_GROUP)
    path = root / "model_groups.json"
    path.write_text(json.dumps(groups))
    server = Server(
        root,
        {"MODEL_GROUPS_FILE": str(path), "DATA_DIR": str(root / "data"), "HF_HUB_OFFLINE": "1"},
        name="docs-server",
    )
    server.start(timeout=300)
    yield server
    server.stop()


def test_the_document_parses_and_covers_the_api() -> None:
    parsed = list(examples())
    routes = {(ex.method, re.sub(r"\?.*", "", ex.path)) for ex in parsed if isinstance(ex, HttpExample)}
    sent = {f["type"] for ex in parsed if isinstance(ex, WsExample) for d, f in ex.frames if d == ">"}
    received = {f["type"] for ex in parsed if isinstance(ex, WsExample) for d, f in ex.frames if d == "<"}
    for method, path in [
        ("POST", "/generate"),
        ("POST", "/api/slim/send_message"),
        ("POST", "/api/v1/describe"),
        ("POST", "/api/v1/score"),
        ("POST", "/api/v1/extract"),
        ("POST", "/api/v1/tokenize"),
        ("POST", "/reset"),
        ("GET", "/api/gpu_stats"),
        ("GET", "/api/v2/models/memory"),
    ]:
        assert (method, path) in routes, f"docs/api.md has no example of {method} {path}"
    assert {"analyze", "generate", "generate_and_analyze", "cancel_request", "switch_model_grouped"} <= sent
    assert {"token", "generation_complete", "result", "request_cancelled", "group_switch_queued"} <= received


def test_every_endpoint_of_the_app_has_an_example(docs_server: Server) -> None:
    spec = docs_server.get("/openapi.json").json()
    documented = {
        (ex.method, re.sub(r"\?.*", "", ex.path)) for ex in examples() if isinstance(ex, HttpExample)
    }
    templates = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    for method, template in sorted(templates):
        pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")
        assert any(m == method and pattern.match(p) for m, p in documented), (
            f"{method} {template} is undocumented"
        )


def test_every_example_runs_against_the_server(docs_server: Server) -> None:
    values = Values()
    for ex in examples():
        if isinstance(ex, HttpExample):
            run_http(docs_server, ex, values)
        else:
            run_ws(docs_server, ex, values)


def test_helpers_catch_drift() -> None:
    """The matcher refuses a missing key, a changed type and a changed status (else the test above could not fail)."""
    v = Values()
    v.match({"a": 1, "status": "queued"}, {"a": 2.5, "status": "queued", "extra": 1}, "x")
    for doc, actual in (
        ({"a": 1}, {"b": 1}),
        ({"a": 1}, {"a": "1"}),
        ({"status": "queued"}, {"status": "completed"}),
        ({"rows": [{"k": 1}]}, {"rows": [{}]}),
        ({"rows": [1]}, {"rows": []}),
    ):
        with pytest.raises(AssertionError):
            v.match(doc, actual, "x")
    v.match({"request_id": "00000000-0000-4000-8000-000000000000"}, {"request_id": "real"}, "x")
    assert v.substitute("/status/00000000-0000-4000-8000-000000000000") == "/status/real"
    parsed = parse(EXAMPLE)
    assert len(parsed) == 2 and isinstance(parsed[0], HttpExample) and isinstance(parsed[1], WsExample)
    assert (
        parsed[0].body == {"text": "x"}
        and parsed[0].status == 200
        and parsed[1].frames[1][1] == {"type": "pong"}
    )


EXAMPLE = """
```http request
POST /analyze

{"text": "x"}
```

```http response
HTTP/1.1 200 OK

{"request_id": "00000000-0000-4000-8000-000000000000"}
```

```websocket
> {"type": "ping"}
< {"type": "pong"}
```
"""
