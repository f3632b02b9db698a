"""The client's plans, stepped by hand against scripted answers: retries after Retry-After, connections that
could not be opened, the WebSocket analysis (refusal for room retried, progress, deadline), and an effect's
exception raised inside the plan. No server, no sockets: what both `Client` and `AsyncClient` run."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from talkative.client import Analysis, APIError, JobFailed, Progress
from talkative.client._operations import Operations
from talkative.client._plan import Connect, Emit, Notify, Receive, Request, Send, Sleep, Steps


class Plans(Operations):
    """The operations without a driver: the plans are stepped by `walk` below."""

    def _http_client(self) -> httpx.Client:
        return httpx.Client()


def walk(plan: Any, answer: Callable[[Any], Any]) -> tuple[Any, list[Any]]:
    """Run a plan as a driver would, answering each effect with `answer(effect)` (which may raise); returns the
    plan's answer and every effect and emitted event, in order."""
    steps = Steps(plan)
    seen = []
    while (effect := steps.next()) is not None:
        seen.append(effect)
        if isinstance(effect, Emit):
            continue
        try:
            steps.answer(answer(effect))
        except Exception as error:
            steps.fail(error)
    return steps.value, seen


def replies(*responses: httpx.Response | Exception) -> Callable[[Any], Any]:
    """Answers each Request with the next response (or raises the next exception); Sleeps pass."""
    queue: Iterator[httpx.Response | Exception] = iter(responses)

    def answer(effect: Any) -> Any:
        if isinstance(effect, Sleep):
            return None
        out = next(queue)
        if isinstance(out, Exception):
            raise out
        return out

    return answer


def test_a_refusal_for_room_waits_its_retry_after_then_succeeds() -> None:
    plans = Plans(max_retries=2)
    busy = httpx.Response(429, headers={"Retry-After": "3"}, json={"detail": "queue full"})
    value, seen = walk(
        Operations.health.plan(plans), replies(busy, httpx.Response(200, json={"status": "ok"}))
    )
    assert value == {"status": "ok"}
    assert seen == [Request("GET", "/health"), Sleep(3.0), Request("GET", "/health")]


def test_the_last_refusal_is_raised_with_the_server_reason() -> None:
    plans = Plans(max_retries=1)
    busy = httpx.Response(503, headers={"Retry-After": "1"}, json={"detail": "loading"})
    with pytest.raises(APIError) as err:
        walk(Operations.models.plan(plans), replies(busy, busy))
    assert (err.value.status, err.value.detail, err.value.retry_after) == (503, "loading", 1.0)


def test_a_connection_not_opened_is_retried_with_backoff() -> None:
    plans = Plans(max_retries=1)
    refused = httpx.ConnectError("refused")
    value, seen = walk(
        Operations.cancel.plan(plans, "r1"),
        replies(refused, httpx.Response(200, json={"status": "cancelled"})),
    )
    assert value["status"] == "cancelled" and Sleep(0.5) in seen
    with pytest.raises(httpx.ConnectError):
        walk(Operations.cancel.plan(plans, "r1"), replies(refused, refused))


def socket_answers(messages: list[dict[str, Any]]) -> Callable[[Any], Any]:
    """A WebSocket that answers each Receive with the next message, stamped with the sent client_request_id."""
    sent: list[dict[str, Any]] = []
    queue = iter(messages)

    def answer(effect: Any) -> Any:
        if isinstance(effect, Connect):
            return "socket"
        if isinstance(effect, Send):
            sent.append(json.loads(effect.text))
        elif isinstance(effect, Receive):
            return json.dumps({**next(queue), "client_request_id": sent[-1]["client_request_id"]})
        return None

    return answer


QUEUED = {"type": "queued", "request_id": "r1", "queue_position": 1}
RESULT = {"type": "result", "request_id": "r1", "tokens": [{"token": "a"}], "metadata": {}}


def test_the_websocket_analysis_retries_a_refusal_and_reports_progress() -> None:
    plans = Plans()
    refused = {"type": "error", "code": 429, "error": "queue full", "retry_after": 2, "request_id": None}
    value, seen = walk(
        Operations.analyze.plan(plans, "hi", on_progress=print), socket_answers([refused, QUEUED, RESULT])
    )
    assert isinstance(value, Analysis) and value.tokens == [{"token": "a"}]
    kinds = " ".join(type(e).__name__ for e in seen)
    assert kinds == "Connect Send Receive Sleep Send Receive Notify Receive"
    assert seen[3] == Sleep(2.0) and seen[1] == seen[4]
    notified = seen[6]
    assert isinstance(notified, Notify) and notified.callback is print and notified.value.stage == "queued"


def test_iter_analyze_emits_progress_then_the_analysis() -> None:
    plans = Plans()
    _, seen = walk(Operations.iter_analyze.plan(plans, "hi"), socket_answers([QUEUED, RESULT]))
    events = [e.event for e in seen if isinstance(e, Emit)]
    assert isinstance(events[0], Progress) and isinstance(events[-1], Analysis) and len(events) == 2


def test_a_receive_past_the_deadline_names_the_request() -> None:
    plans = Plans()
    answer = socket_answers([QUEUED])
    deadlines: list[float | None] = []

    def late(effect: Any) -> Any:
        if isinstance(effect, Receive):
            deadlines.append(effect.timeout)
            if len(deadlines) == 2:
                raise TimeoutError
        return answer(effect)

    plan = Operations.iter_analyze.plan(plans, "hi", timeout=5)
    with pytest.raises(TimeoutError, match=r"no result within 5 s \(request r1\)"):
        walk(plan, late)
    assert all(d is not None and 0 <= d <= 5 for d in deadlines)


# -- jobs the server stopped waiting for (202) --------------------------------------------------------------------
def still_running(request_id: str) -> httpx.Response:
    """The server's answer to a vector request whose job outlasted its wait."""
    body = {"request_id": request_id, "status": "processing", "message": "still processing"}
    return httpx.Response(202, json=body)


def status(
    request_id: str, state: str, result: dict[str, Any] | None = None, error: str | None = None
) -> Any:
    body = {"request_id": request_id, "status": state, "kind": "describe", "model_id": "m1"}
    return httpx.Response(200, json=body | {"result": result, "error": error})


ROW = {"index": 0, "explanation": "a capital city", "mse": 1.5}
EXTRACTED = {
    "layer": 3,
    "d_model": 2,
    "prompt": "Paris",
    "n_tokens": 1,
    "tokens": [{"position": 0, "token": "Paris", "token_id": 9, "norm": 1.0}],
    "activations": [[0.5, -1.0]],
}


@pytest.mark.parametrize(
    ("call", "result", "read"),
    [
        (
            lambda p: Operations.describe.plan(p, [[0.5, -1.0]]),
            {"results": [ROW], "metadata": {"n_vectors": 1}},
            lambda v: (v.request_id, v.results, v.metadata, v.raw["model_id"]),
        ),
        (
            lambda p: Operations.score.plan(p, "a capital city", [0.5, -1.0]),
            {"results": [ROW], "token": " ", "metadata": {}},
            lambda v: (v.request_id, v.results, v.raw["token"], v.raw["model_id"]),
        ),
        (
            lambda p: Operations.extract.plan(p, "Paris"),
            EXTRACTED,
            lambda v: (v.request_id, v.layer, v.tokens, v.activations, v.prompt),
        ),
        (
            lambda p: Operations.diff.plan(p, {"text": "a"}, {"text": "b"}),
            {"difference": {"explanation": "x"}, "a": {}, "b": {}, "cosine_a_b": 0.5},
            lambda v: (v["request_id"], v["model_id"], v["difference"], v["cosine_a_b"]),
        ),
        (
            lambda p: Operations.tokenize.plan(p, "Paris"),
            {"prompt": "Paris", "n_tokens": 1, "tokens": []},
            lambda v: (v["request_id"], v["model_id"], v["n_tokens"]),
        ),
    ],
    ids=["describe", "score", "extract", "diff", "tokenize"],
)
def test_a_vector_job_answered_202_is_polled_to_its_result(
    call: Callable[[Any], Any], result: dict[str, Any], read: Callable[[Any], Any]
) -> None:
    plans = Plans()
    value, seen = walk(
        call(plans),
        replies(still_running("j1"), status("j1", "processing"), status("j1", "completed", result)),
    )
    answered = {"request_id": "j1", "model_id": "m1", **result}
    direct, _ = walk(call(plans), replies(httpx.Response(200, json=answered)))
    assert read(value) == read(direct)  # the same as if the server had answered at once
    requests = [e for e in seen if isinstance(e, Request)]
    assert [r.method + " " + r.path for r in requests[1:]] == ["GET /status/j1", "GET /status/j1"]
    assert any(isinstance(e, Sleep) for e in seen)


def test_a_vector_job_that_fails_after_202_raises_job_failed() -> None:
    plans = Plans()
    failed = status("j1", "failed", error="position 9 is outside the 3 tokens")
    with pytest.raises(JobFailed) as err:
        walk(Operations.describe.plan(plans, [[0.5, -1.0]]), replies(still_running("j1"), failed))
    assert (err.value.request_id, err.value.status) == ("j1", "failed")
    assert "outside the 3 tokens" in str(err.value)


class Recorded:
    """Wraps an answer function, keeping the method and path of every request it answers."""

    def __init__(self, answer: Callable[[Any], Any]) -> None:
        self.answer = answer
        self.paths: list[str] = []

    def __call__(self, effect: Any) -> Any:
        if isinstance(effect, Request):
            self.paths.append(f"{effect.method} {effect.path}")
        return self.answer(effect)


def test_a_vector_job_past_its_timeout_is_cancelled_and_named() -> None:
    cancelled = httpx.Response(200, json={"request_id": "j1", "status": "cancelled"})
    answer = Recorded(replies(still_running("j1"), status("j1", "processing"), cancelled))
    with pytest.raises(TimeoutError, match=r"request j1 did not finish within 0 s and was cancelled"):
        walk(Operations.extract.plan(Plans(), "Paris", timeout=0), answer)
    assert answer.paths == ["POST /api/v1/extract", "GET /status/j1", "POST /cancel/j1"]


def test_the_metric_legend_is_the_servers_list() -> None:
    legend = [{"name": "fve", "role": "headline"}, {"name": "probe", "role": "detail"}]
    value, seen = walk(
        Operations.metric_legend.plan(Plans()), replies(httpx.Response(200, json={"metrics": legend}))
    )
    assert value == legend and seen == [Request("GET", "/api/v1/metrics/legend")]
