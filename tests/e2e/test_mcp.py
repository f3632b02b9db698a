"""The MCP tools with the SDK's own client against started servers (tiny models): `/mcp` over streamable HTTP
behind the server's keys, rate limits and ownership, and `talkative mcp` over stdio.

Each tool runs, bad input comes back as a tool error carrying the server's reason (and the session goes on), a
keyed server refuses `/mcp` without a key, a tool call acts as its caller (the jobs it makes are the caller's,
the calls spend the caller's rate limit)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import httpx2
import pytest
from e2e_helpers import Server
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult
from security_support import API_KEYS, KEYS, auth, base_env

pytestmark = pytest.mark.e2e

TEXT = "The capital of France is Paris."
D = 64  # the tiny models' width
TOOLS = {
    "list_models",
    "analyze",
    "tokenize",
    "extract",
    "describe",
    "score",
    "diff",
    "steer_generate",
    "batch_submit",
    "batch_fetch",
}
T = TypeVar("T")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, tiny_groups: Path) -> Iterator[Server]:
    """A server with keys (alice, bob, admin) and no rate limit, shared by the module's tests."""
    workdir = tmp_path_factory.mktemp("mcp-keyed")
    server = Server(workdir, base_env(tiny_groups, workdir, API_KEYS=API_KEYS, RATE_LIMIT_PER_MINUTE="0"))
    server.start()
    yield server
    server.stop()


def run(make: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(make(), 300))  # type: ignore[arg-type]


@asynccontextmanager
async def connected(server: Server, key: str | None = None) -> AsyncIterator[Client]:
    """The SDK's client on the server's `/mcp`, with `key`'s Authorization (none without)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300))
    async with http, Client(streamable_http_client(server.url + "/mcp", http_client=http)) as client:
        yield client


def data(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


def error(result: CallToolResult) -> str:
    assert result.is_error and result.structured_content is None
    text = result.content[0].text  # type: ignore[union-attr]
    assert isinstance(text, str)
    return text


def rpc(server: Server, method: str, params: dict[str, Any], **headers: str) -> httpx.Response:
    """One JSON-RPC message POSTed to `/mcp` by hand (the stateless transport needs no handshake)."""
    return httpx.post(
        server.url + "/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params},
        headers={"Accept": "application/json, text/event-stream", **headers},
        timeout=120,
    )


# -- /mcp -----------------------------------------------------------------------------------------------------------
def test_lists_the_tools_with_documented_schemas(keyed: Server) -> None:
    async def listing() -> Any:
        async with connected(keyed, KEYS["alice"]) as client:
            return await client.list_tools()

    tools = {t.name: t for t in run(listing).tools}
    assert set(tools) >= TOOLS, sorted(tools)
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40, tool.name
        for name, prop in tool.input_schema.get("properties", {}).items():
            assert prop.get("description"), (tool.name, name)
    best_of_k = tools["analyze"].input_schema["properties"]["best_of_k"]["anyOf"][0]
    assert best_of_k["minimum"] == 1 and best_of_k["maximum"] == 64
    assert tools["score"].input_schema["required"] == ["explanations"]


def test_each_tool_runs_as_its_caller(keyed: Server) -> None:
    async def session() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with connected(keyed, KEYS["alice"]) as client:
            call = client.call_tool
            out["models"] = data(await call("list_models", {}))
            out["analysis"] = data(await call("analyze", {"text": TEXT, "best_of_k": 1, "kl": False}))
            out["chat"] = data(
                await call(
                    "analyze",
                    {
                        "messages": [{"role": "user", "content": "Hi"}],
                        "best_of_k": 1,
                        "model_id": "tiny-a-l2",
                    },
                )
            )
            out["tokens"] = data(await call("tokenize", {"text": TEXT}))
            out["extract"] = data(await call("extract", {"text": TEXT, "positions": [1, -2]}))
            out["listed"] = data(await call("extract", {"text": TEXT, "positions": [-2], "encoding": "list"}))
            out["described"] = data(
                await call(
                    "describe",
                    {
                        "vectors": out["extract"]["activations"],
                        "tokens": [t["token_id"] for t in out["extract"]["tokens"]],
                        "best_of_k": 1,
                        "salience": True,
                    },
                )
            )
            out["described_text"] = data(
                await call("describe", {"text": TEXT, "positions": [-2], "best_of_k": 1})
            )
            hypotheses = ["Paris, the capital of France", "a recipe for soup"]
            out["scored_text"] = data(
                await call("score", {"explanations": hypotheses, "text": TEXT, "position": -2})
            )
            out["scored_vector"] = data(
                await call(
                    "score",
                    {
                        "explanations": hypotheses,
                        "vector": out["listed"]["activations"][0],
                        "token": out["listed"]["tokens"][0]["token_id"],
                    },
                )
            )
        return out

    out = run(session)
    assert {m["id"] for m in out["models"]["models"]} == {"tiny-a-l1", "tiny-a-l2", "tiny-b-l1"}
    assert out["models"]["current_model"] == "tiny-a-l1"

    analysis = out["analysis"]
    n = out["tokens"]["n_tokens"]
    assert analysis["model_id"] == "tiny-a-l1" and analysis["n_tokens"] == n == len(analysis["rows"]) >= 7
    assert [r["token"] for r in analysis["rows"]] == [t["token"] for t in out["tokens"]["tokens"]]
    for row in analysis["rows"]:
        # the main metrics that have values (no KL: turned off; fve: none without the NLA's variance)
        assert {"position", "token", "explanation", "mse", "relative_rmse", "cosine", "flags"} <= set(row)
        assert set(row) <= {
            "position",
            "token",
            "explanation",
            "mse",
            "relative_rmse",
            "fve",
            "cosine",
            "flags",
        }
        assert isinstance(row["explanation"], str) and row["mse"] > 0
    assert "early_position" in analysis["rows"][0]["flags"] and analysis["summary"]["positions"] == n
    assert out["chat"]["model_id"] == "tiny-a-l2" and out["chat"]["layer"] == 2
    assert "kl_divergence" in out["chat"]["rows"][-1]

    # the analysis is alice's job: she reads it over REST, bob gets the 404 of an unknown id
    status = keyed.get(f"/status/{analysis['request_id']}", headers=auth("alice"))
    assert status.status_code == 200 and status.json()["status"] == "completed"
    assert keyed.get(f"/status/{analysis['request_id']}", headers=auth("bob")).status_code == 404

    ext = out["extract"]
    assert ext["layer"] == 1 and ext["d_model"] == D and ext["activations"]["shape"] == [2, D]
    assert [t["position"] for t in ext["tokens"]] == [1, n - 2]
    assert len(out["listed"]["activations"][0]) == D

    described = out["described"]["results"]
    assert [r["index"] for r in described] == [0, 1] and all(r["token_assumed"] is False for r in described)
    assert all(isinstance(r["explanation"], str) and r["mse"] > 0 and r["salient_words"] for r in described)
    assert out["described_text"]["results"][0]["position"] == n - 2

    by_text, by_vector = out["scored_text"], out["scored_vector"]
    assert by_text["position"] == n - 2 and by_text["token"] == out["tokens"]["tokens"][-2]["token"]
    assert [r["explanation"] for r in by_text["results"]] == [
        "Paris, the capital of France",
        "a recipe for soup",
    ]
    # the same vector and token either way: the same reconstruction, the same error
    assert [r["mse"] for r in by_text["results"]] == pytest.approx([r["mse"] for r in by_vector["results"]])


def test_steer_diff_and_batch_tools(keyed: Server) -> None:
    ocean = {"from": {"text": "We swam in the sea and the ocean waves", "position": -1}}
    fast = {"best_of_k": 1, "kl": False}

    async def session() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with connected(keyed, KEYS["alice"]) as client:
            call = client.call_tool
            out["plain"] = data(await call("analyze", {"text": TEXT, **fast}))
            out["alpha0"] = data(
                await call("analyze", {"text": TEXT, **fast, "steer": {"direction": ocean, "alpha": 0}})
            )
            out["pushed"] = data(
                await call(
                    "describe",
                    {
                        "text": TEXT,
                        "positions": [-2],
                        "best_of_k": 1,
                        "steer": {"direction": ocean, "alpha": 2},
                    },
                )
            )
            out["generated"] = data(
                await call(
                    "steer_generate",
                    {
                        "text": "Once upon a time",
                        "direction": ocean,
                        "alpha": 5,
                        "max_new_tokens": 8,
                        "temperature": 0,
                    },
                )
            )
            a, b = {"text": TEXT, "position": -2}, {"text": "The capital of Italy is Rome.", "position": -2}
            out["diff"] = data(await call("diff", {"a": a, "b": b, "best_of_k": 1}))
            out["same"] = error(await call("diff", {"a": a, "b": a}))
            out["batch"] = data(
                await call("batch_submit", {"items": ["Hello world", {"id": "b", "text": TEXT}], **fast})
            )
            out["fetched"] = data(
                await call("batch_fetch", {"batch_id": out["batch"]["batch_id"], "limit": 10, "wait_s": 120})
            )
        async with connected(keyed, KEYS["bob"]) as client:
            out["bobs"] = error(await client.call_tool("batch_fetch", {"batch_id": out["batch"]["batch_id"]}))
        return out

    out = run(session)
    # alpha 0 is the unsteered analysis; a push changes the state that is explained
    assert [r["explanation"] for r in out["alpha0"]["rows"]] == [
        r["explanation"] for r in out["plain"]["rows"]
    ]
    described = out["pushed"]["results"][0]
    assert described["position"] == out["plain"]["n_tokens"] - 2 and described["mse"] > 0

    # the tool's generation is the server's: the same steered request over REST gives the same tokens
    gen = out["generated"]
    assert gen["steer"]["source"] == "from" and gen["steer"]["alpha"] == 5
    assert len(gen["completions"]) == 1 and len(gen["unsteered"]) == 1
    rest = keyed.post(
        "/generate?stream=true",
        {
            "text": "Once upon a time",
            "options": {"max_new_tokens": 8, "temperature": 0, "steer": {"direction": ocean, "alpha": 5}},
        },
        headers=auth("alice"),
    )
    events = [
        json.loads(line[len("data: ") :]) for line in rest.text.splitlines() if line.startswith("data: {")
    ]
    complete = next(e for e in events if e["type"] == "generation_complete")
    assert complete["completions"] == gen["completions"]
    assert gen["completions"] != gen["unsteered"]  # a push of five norms changes a greedy continuation

    diff = out["diff"]
    assert diff["a"]["token"] != diff["b"]["token"] and diff["difference"]["token_assumed"] is True
    assert isinstance(diff["difference"]["explanation"], str) and -1 <= diff["cosine_a_b"] <= 1
    assert "400" in out["same"] and "no difference" in out["same"]

    batch, fetched = out["batch"], out["fetched"]
    assert batch["items"]["total"] == 2 and batch["model_id"] == "tiny-a-l1"
    assert fetched["status"] == "completed" and fetched["next_after"] == 2
    assert sorted(str(r["id"]) for r in fetched["results"]) == ["0", "b"]
    assert all(r["status"] == "completed" and r["rows"] for r in fetched["results"])
    assert "404" in out["bobs"]  # a batch is its caller's


def test_bad_input_is_a_clear_tool_error_and_the_session_goes_on(keyed: Server) -> None:
    async def session() -> tuple[list[str], dict[str, Any]]:
        async with connected(keyed, KEYS["bob"]) as client:
            call = client.call_tool
            errors = [
                error(await call("analyze", {"text": TEXT, "messages": [{"role": "user", "content": "x"}]})),
                error(await call("analyze", {"text": TEXT, "best_of_k": 0})),
                error(await call("analyze", {"text": TEXT, "model_id": "no-such-model"})),
                error(await call("describe", {"vectors": [[1.0, 2.0]]})),
                error(await call("describe", {"vectors": {"data": "AAAA", "shape": [1, D]}})),
                error(await call("score", {"explanations": ["x"], "text": TEXT})),
                error(await call("extract", {"text": TEXT, "positions": [999]})),
            ]
            return errors, data(await call("list_models", {}))

    errors, models = run(session)
    both, bound, unknown, width, packed, position, beyond = errors
    assert "exactly one of text or messages" in both
    assert "best_of_k" in bound and "greater than or equal to 1" in bound
    assert "404" in unknown and "no-such-model" in unknown
    assert "400" in width and "2 values" in width and str(D) in width
    assert "needs" in packed and "bytes" in packed
    assert "position" in position
    assert "400: position 999" in beyond
    assert models["current_model"] == "tiny-a-l1"


def test_a_keyed_server_refuses_mcp_without_a_key(keyed: Server) -> None:
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    for headers in ({}, {"Authorization": "Bearer not-a-key"}):
        r = httpx.post(keyed.url + "/mcp", json=listing, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["kind"] == "unauthorized", r.text

    async def refused() -> None:
        async with connected(keyed) as client:
            await client.list_tools()

    with pytest.raises(
        BaseExceptionGroup
    ) as raised:  # the SDK's client fails to connect, from its task group
        run(refused)
    assert raised.group_contains(MCPError, depth=None)

    called = rpc(keyed, "tools/call", {"name": "list_models", "arguments": {}}, **auth("admin"))
    assert called.status_code == 200, called.text
    result = called.json()["result"]
    assert result["isError"] is False and result["structuredContent"]["current_model"] == "tiny-a-l1"


def test_mcp_takes_post_only(keyed: Server) -> None:
    """A GET (the standing stream) or DELETE (a session's end) has nothing to do on a stateless transport: 405
    naming POST, not the web UI's 404; the gate still asks for a key first."""
    for method in ("GET", "DELETE", "PUT"):
        r = httpx.request(method, keyed.url + "/mcp", headers=auth("alice"), timeout=30)
        assert (r.status_code, r.headers.get("allow")) == (405, "POST"), (method, r.status_code, r.text)
        assert "POST only" in r.json()["detail"]
    assert httpx.get(keyed.url + "/mcp", timeout=30).status_code == 401


def test_tool_calls_spend_the_callers_rate_limit(make_server: Callable[..., Server]) -> None:
    server = make_server(API_KEYS=API_KEYS, RATE_LIMIT_PER_MINUTE="3")
    call = {"name": "list_models", "arguments": {}}
    first = rpc(
        server, "tools/call", call, **auth("alice")
    )  # the /mcp message and the models request: 2 of 3
    assert first.status_code == 200 and first.json()["result"]["isError"] is False, first.text
    second = rpc(server, "tools/call", call, **auth("alice"))  # the message passes (3 of 3), its request not
    result = second.json()["result"]
    assert result["isError"] is True and "429: rate limit" in result["content"][0]["text"], result
    third = rpc(server, "tools/call", call, **auth("alice"))
    assert third.status_code == 429 and "retry-after" in third.headers
    other = rpc(server, "tools/call", call, **auth("bob"))  # each key has its own budget
    assert other.status_code == 200 and other.json()["result"]["isError"] is False


# -- stdio ----------------------------------------------------------------------------------------------------------
def stdio(server: Server, key: str) -> StdioServerParameters:
    env = {**os.environ, "TALKATIVE_API_KEY": key}
    return StdioServerParameters(
        command=sys.executable, args=["-m", "talkative.cli", "mcp", "--server", server.url], env=env
    )


def test_talkative_mcp_over_stdio(keyed: Server) -> None:
    async def session(key: str) -> tuple[set[str], CallToolResult, CallToolResult | None]:
        async with Client(stdio(keyed, key)) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            models = await client.call_tool("list_models", {})
            if models.is_error:
                return names, models, None
            analysis = await client.call_tool("analyze", {"text": "Hello world", "best_of_k": 1, "kl": False})
            return names, models, analysis

    names, models, analysis = run(lambda: session(KEYS["alice"]))
    assert names >= TOOLS
    assert data(models)["current_model"] == "tiny-a-l1"
    assert analysis is not None and len(data(analysis)["rows"]) >= 2

    _, refused, _ = run(lambda: session("not-a-key"))
    assert "401: missing or wrong API key" in error(refused)
