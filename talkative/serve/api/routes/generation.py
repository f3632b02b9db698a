"""Generation over REST: `POST /generate` queues a generation job (`?stream=true` answers with its event stream
at once), `GET /generate/{request_id}/stream` streams one as Server-Sent Events.

Each event is `data: <json>` with the WebSocket's message shapes (`queued`, `processing`, `token`,
`generation_complete`, `error`, `request_cancelled`), then `data: [DONE]`; `: keep-alive` comments flow while
nothing happens. A stream opened late still gets every token from the first (the running job keeps them), and a
finished generation's stream replays its tokens from the result. Cancel with `POST /cancel/{request_id}`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from ...catalog import visibility
from ...catalog.registry import UnknownModel
from ...errors import http_error
from ...jobs.generation import KIND, Generations
from ...scheduling.types import SchedulerError
from ..deps import ClientIdentity, client_identity, service_of
from ..schemas import AnalyzeAccepted, ErrorBody, GenerateRequest

router = APIRouter(
    dependencies=[Depends(client_identity)],
    responses={400: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def generations_of(conn: Any) -> Generations:
    gens: Generations = conn.app.state.generations
    return gens


async def sse(gens: Generations, request_id: str, submitted: bool) -> AsyncIterator[str]:
    async for message in gens.events(request_id, submitted=submitted):
        yield ": keep-alive\n\n" if message is None else f"data: {json.dumps(message)}\n\n"
    yield "data: [DONE]\n\n"


def stream_response(gens: Generations, request_id: str, *, submitted: bool = False) -> StreamingResponse:
    return StreamingResponse(
        sse(gens, request_id, submitted), media_type="text/event-stream", headers=SSE_HEADERS
    )


@router.post(
    "/generate",
    response_model=AnalyzeAccepted,
    summary="Queue a generation (stream=true: answer with its Server-Sent Events)",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def generate(
    body: GenerateRequest,
    request: Request,
    stream: bool = Query(False, description="Answer with the generation's event stream instead of its id."),
    who: ClientIdentity = Depends(client_identity),
) -> Any:
    """Continue a text or a chat with the subject model. Options (absent ones from the model's
    `generation_config`): `max_new_tokens` (alias `max_length`), `temperature` (0 = greedy), `top_p`, `seed`,
    `num_completions`, `stop_at_end_of_turn`. The result (`GET /status/{request_id}`) holds `completions`,
    `finish_reasons`, the rendered `prompt`, token counts, every completion's `token_texts`/`token_ids`, and
    metadata."""
    svc = service_of(request)
    gens = generations_of(request)
    try:
        model_id = visibility.resolve(svc.scheduler, body.model_id, who)
        job = await gens.submit(body, model_id=model_id, owner=who.key)
    except (SchedulerError, UnknownModel) as exc:
        raise http_error(exc) from None
    if stream:
        return stream_response(gens, job.id, submitted=True)
    return svc.accepted(job)


@router.get(
    "/generate/{request_id}/stream",
    summary="A generation's tokens as Server-Sent Events, from its first token",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_generation(request_id: str, request: Request) -> StreamingResponse:
    svc = service_of(request)
    job = await svc.scheduler.get(request_id)
    if job is None:
        raise HTTPException(404, f"unknown request_id {request_id!r}")
    if job.kind != KIND:
        raise HTTPException(400, f"request {request_id} is a {job.kind} request, not a generation")
    return stream_response(generations_of(request), request_id)
