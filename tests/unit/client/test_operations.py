"""The client's plans, stepped by hand against scripted answers: retries after Retry-After, connections that
could not be opened, the WebSocket analysis (refusal for room retried, progress, deadline), and an effect's
exception raised inside the plan. No server, no sockets: what both `Client` and `AsyncClient` run."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from talkative.client import Analysis, APIError, Progress
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
