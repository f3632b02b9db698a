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

from talkative.client import Accepted, APIError, JobFailed, JobStatus, VectorResults
from talkative.mcp import build_server


class FakeAPI:
    """What the tools call on an `AsyncClient`, answering from a script."""

    def __init__(
        self, fail: Exception | None = None, finishes: bool = True, result: dict[str, Any] | None = None
    ) -> None:
        self.fail = fail
        self.finishes = finishes
        self.result = result or {"tokens": [], "metadata": {"model_id": "m"}}
        self.cancelled: list[str] = []

    async def models(self) -> Any:
        assert self.fail is not None
        raise self.fail

    async def submit_analysis(self, *args: Any) -> Accepted:
        return Accepted("job-1", "queued", 1, 1)

    async def wait(self, request_id: str, timeout: float | None, poll: float) -> JobStatus:
        status = "completed" if self.finishes else "processing"
        result = self.result if self.finishes else None
        return JobStatus(request_id, status, "analyze", result, None, None, None)

    async def describe(self, *args: Any, **kwargs: Any) -> VectorResults:
        """The answer of a describe that outlasted the server's wait: 202 with its id."""
        body = {"request_id": "job-2", "status": "processing", "message": "still processing"}
        return VectorResults("job-2", [], {}, None, body)

    async def cancel(self, request_id: str) -> dict[str, Any]:
        self.cancelled.append(request_id)
        return {}


def server_over(api: FakeAPI) -> Any:
    @asynccontextmanager
    async def connect(ctx: Context) -> AsyncIterator[Any]:
        yield api

    return build_server(connect, poll=0.01)


async def call(api: FakeAPI, name: str, arguments: dict[str, Any]) -> tuple[bool, str, Any]:
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


def test_a_vector_job_that_outlasts_the_servers_wait_is_waited_for() -> None:
    row = {"index": 0, "token": " x", "token_assumed": False, "explanation": "words", "mse": 1.5, "norm": 3.0}
    api = FakeAPI(result={"results": [row], "metadata": {}})
    is_error, _, structured = asyncio.run(call(api, "describe", {"vectors": [[1.0, 2.0]]}))
    assert not is_error and structured["request_id"] == "job-2"
    assert structured["results"][0]["explanation"] == "words" and structured["results"][0]["mse"] == 1.5
