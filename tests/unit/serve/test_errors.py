"""Domain refusals answered once: the same status, detail and Retry-After over HTTP as in a WebSocket frame."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel
from starlette.testclient import TestClient

from talkative.nla.analysis import AnalysisError
from talkative.serve import errors
from talkative.serve.catalog.registry import UnknownGroup, UnknownModel
from talkative.serve.jobs.record import UnknownRequest
from talkative.serve.scheduling.types import SchedulerError

REFUSALS: list[tuple[Exception, int, str]] = [
    (SchedulerError(429, "the queue is full", reason="queue_full", retry_after=7), 429, "the queue is full"),
    (UnknownModel("m"), 404, "unknown model_id 'm'"),
    (UnknownGroup("g"), 404, "unknown group_id 'g'"),
    (UnknownRequest("r"), 404, "unknown request_id 'r'"),
    (AnalysisError("tuned_lens needs a tuned lens"), 400, "tuned_lens needs a tuned lens"),
]


def test_every_refusal_has_one_answer_over_http_and_websocket() -> None:
    app = FastAPI()
    errors.register(app)

    @app.get("/raise/{i}")
    async def refuse(i: int) -> None:
        raise REFUSALS[i][0]

    client = TestClient(app)
    for i, (exc, status, detail) in enumerate(REFUSALS):
        answer = client.get(f"/raise/{i}")
        assert (answer.status_code, answer.json()) == (status, {"detail": detail})
        reply = errors.reply_for(exc)
        assert reply is not None and (reply.status, reply.detail) == (status, detail)
    queue_full = client.get("/raise/0")
    assert queue_full.headers["retry-after"] == "7"
    assert errors.reply_for(REFUSALS[0][0]).frame_fields() == {"kind": "queue_full", "retry_after": 7}  # type: ignore[union-attr]
    assert errors.reply_for(REFUSALS[1][0]).frame_fields() == {}  # type: ignore[union-attr]


class Body(BaseModel):
    n: int


def test_bad_input_is_400_with_every_problem_and_a_bug_is_no_refusal() -> None:
    app = FastAPI()
    errors.register(app)

    @app.post("/body")
    async def body(b: Body) -> int:
        return b.n

    answer = TestClient(app).post("/body", json={"n": "x"})
    assert answer.status_code == 400 and answer.json()["detail"].startswith("n: ")
    assert [e["loc"] for e in answer.json()["errors"]] == [["body", "n"]]
    assert errors.reply_for(KeyError("a bug")) is None and errors.reply_for(RuntimeError()) is None


def test_a_failed_job_has_the_status_of_its_cause() -> None:
    assert errors.failure_status("internal error: boom") == 500
    assert errors.failure_status("group g could not be loaded: oom") == 503
    assert errors.failure_status("the input has 9000 tokens") == 400
