"""The tools' contract with an agent, over the SDK's in-process client and a stand-in for the API client: the
API's refusals become tool errors carrying the server's status and reason, a waited-for job the caller gives up
on is cancelled, and the session survives every failure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from mcp import Client
from mcp.server.mcpserver import Context

from talkative.client import Accepted, APIError, AsyncClient, JobFailed, JobStatus
from talkative.mcp import build_server

#: the server's metric legend, cut down to what the tools read, with a metric no tool names itself
LEGEND = [
    {"name": "fve", "role": "headline"},
    {"name": "mse", "role": "detail"},
    {"name": "probe_agreement", "role": "detail"},
    {"name": "nmse", "role": "derived"},
]


class FakeAPI:
    """What the tools call on an `AsyncClient`, answering from a script."""

    def __init__(
        self, fail: Exception | None = None, finishes: bool = True, result: dict[str, Any] | None = None
    ) -> None:
        self.fail = fail
        self.finishes = finishes
        self.result = result or {"tokens": [], "metadata": {"model_id": "m"}}
        self.cancelled: list[str] = []
        self.legends_read = 0

    async def models(self) -> Any:
        assert self.fail is not None
        raise self.fail

    async def submit_analysis(self, *args: Any) -> Accepted:
        return Accepted("job-1", "queued", 1, 1)

    async def wait(self, request_id: str, timeout: float | None, poll: float) -> JobStatus:
        status = "completed" if self.finishes else "processing"
        result = self.result if self.finishes else None
        return JobStatus(request_id, status, "analyze", result, None, None, None)

    async def metric_legend(self) -> list[dict[str, Any]]:
        self.legends_read += 1
        return LEGEND

    async def cancel(self, request_id: str) -> dict[str, Any]:
        self.cancelled.append(request_id)
        return {}


def server_over(api: Any) -> Any:
    @asynccontextmanager
    async def connect(ctx: Context) -> AsyncIterator[Any]:
        yield api

    return build_server(connect, poll=0.01)


async def call(api: Any, name: str, arguments: dict[str, Any]) -> tuple[bool, str, Any]:
    async with Client(server_over(api)) as client:
        result = await client.call_tool(name, arguments)
        text = result.content[0].text if result.content else ""  # type: ignore[union-attr]
        again = await client.list_tools()  # the session goes on after any failure
        assert again.tools
        return result.is_error, text, result.structured_content


def test_refusals_carry_the_servers_status_reason_and_wait() -> None:
    cases = [
        (APIError(429, "the queue is full", retry_after=12), "429: the queue is full; retry in 12 s"),
        (
            APIError(429, "rate limit exceeded; retry in 3 s", retry_after=3),
            "429: rate limit exceeded; retry in 3 s",
        ),
        (APIError(403, "model m is reserved for the administrator"), "403: model m is reserved"),
        (JobFailed("job-9", "failed", "out of memory"), "request job-9 failed: out of memory"),
        (httpx.ConnectError("connection refused"), "cannot reach the Talkative server: connection refused"),
    ]
    for failure, expected in cases:
        is_error, text, structured = asyncio.run(call(FakeAPI(fail=failure), "list_models", {}))
        assert is_error and expected in text and structured is None, text
        assert "retry in 3 s; retry" not in text


def test_a_job_not_done_in_time_is_cancelled_and_said_so() -> None:
    api = FakeAPI(finishes=False)
    is_error, text, _ = asyncio.run(call(api, "analyze", {"text": "hi", "timeout_s": 1}))
    assert is_error and "did not finish within 1 s and was cancelled" in text
    assert api.cancelled == ["job-1"]


def test_a_finished_analysis_is_compact() -> None:
    is_error, _, structured = asyncio.run(call(FakeAPI(), "analyze", {"text": "hi"}))
    assert not is_error and structured["request_id"] == "job-1" and structured["rows"] == []


def test_compact_rows_carry_every_metric_of_the_servers_legend_read_once() -> None:
    row = {"position": 0, "token": "hi", "explanation": "a greeting", "fve": 0.5, "mse": 2.0}
    row |= {"probe_agreement": 0.123456, "nmse": 0.7, "flags": []}
    api = FakeAPI(result={"tokens": [row], "metadata": {"model_id": "m"}})

    async def twice() -> list[Any]:
        async with Client(server_over(api)) as client:
            return [(await client.call_tool("analyze", {"text": "hi"})).structured_content for _ in range(2)]

    for structured in asyncio.run(twice()):
        (compact,) = structured["rows"]
        assert compact["probe_agreement"] == 0.1235 and (compact["fve"], compact["mse"]) == (0.5, 2.0)
        assert "nmse" not in compact  # derived: a function of cosine, said once
    assert api.legends_read == 1


class ScriptedClient(AsyncClient):
    """The real API client over a scripted server: `answers` maps `METHOD /path` to its answers, in turn."""

    def __init__(self, answers: dict[str, list[httpx.Response]]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        super().__init__("http://talkative.test", api_key="")

    def _http_client(self) -> httpx.AsyncClient:
        def answer(request: httpx.Request) -> httpx.Response:
            asked = f"{request.method} {request.url.path}"
            self.asked.append(asked)
            return self.answers[asked].pop(0)

        return httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url=self.base_url)


def test_vector_jobs_that_outlast_the_servers_wait_are_followed_by_the_client() -> None:
    """describe from a text: its extract and its describe are both answered 202, and both are waited for."""

    def still(job: str) -> httpx.Response:
        return httpx.Response(202, json={"request_id": job, "status": "processing", "message": "still"})

    def status(job: str, result: dict[str, Any] | None = None) -> httpx.Response:
        body = {"request_id": job, "status": "completed" if result else "processing", "model_id": "m"}
        return httpx.Response(200, json=body | {"result": result})

    token = {"position": 1, "token": " x", "token_id": 7, "norm": 3.0}
    extracted = {"layer": 2, "prompt": "a x", "tokens": [token], "activations": [[1.0, 2.0]]}
    row = {"index": 0, "token": " x", "token_assumed": False, "explanation": "words", "mse": 1.5, "norm": 3.0}
    api = ScriptedClient(
        {
            "POST /api/v1/extract": [still("job-1")],
            "GET /status/job-1": [status("job-1"), status("job-1", extracted)],
            "POST /api/v1/describe": [still("job-2")],
            "GET /status/job-2": [status("job-2", {"results": [row], "metadata": {}})],
            "GET /api/v1/metrics/legend": [httpx.Response(200, json={"metrics": LEGEND})],
        }
    )
    is_error, text, structured = asyncio.run(call(api, "describe", {"text": "a x", "positions": [1]}))
    assert not is_error, text
    assert (structured["request_id"], structured["model_id"]) == ("job-2", "m")
    (result,) = structured["results"]
    assert (result["position"], result["explanation"], result["mse"]) == (1, "words", 1.5)
    assert api.asked.count("GET /status/job-1") == 2 and api.asked.count("GET /status/job-2") == 1
