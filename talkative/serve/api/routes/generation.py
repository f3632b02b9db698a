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

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import StreamingResponse

from ...jobs.generation import KIND, Generations
from ...jobs.record import UnknownRequest
from ..deps import GenerationsDep, Identity, ServiceDep, client_identity, model_for
from ..schemas import AnalyzeAccepted, ErrorBody, GenerateRequest

router = APIRouter(
    dependencies=[Depends(client_identity)],
    responses={400: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
#: an event stream must reach the client as it is written: no caching, no buffering proxy in between
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
    svc: ServiceDep,
    gens: GenerationsDep,
    who: Identity,
    stream: bool = Query(False, description="Answer with the generation's event stream instead of its id."),
) -> Any:
    """Continue a text or a chat with the subject model. Options (absent ones from the model's
    `generation_config`): `max_new_tokens` (alias `max_length`), `temperature` (0 = greedy), `top_p`, `seed`,
    `num_completions`, `stop_at_end_of_turn`. The result (`GET /status/{request_id}`) holds `completions`,
    `finish_reasons`, the rendered `prompt`, token counts, every completion's `token_texts`/`token_ids`, and
    metadata."""
    model_id = await model_for(svc, body.model_id, who)
    job = await gens.submit(
        body.engine_request(), model_id=model_id, owner=who.key, client_request_id=body.client_request_id
    )
    if stream:
        return stream_response(gens, job.id, submitted=True)
    return svc.accepted(job)


@router.get(
    "/generate/{request_id}/stream",
    summary="A generation's tokens as Server-Sent Events, from its first token",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_generation(request_id: str, svc: ServiceDep, gens: GenerationsDep) -> StreamingResponse:
    job = await svc.scheduler.get(request_id)
    if job is None:
        raise UnknownRequest(request_id)
    if job.kind != KIND:
        raise HTTPException(400, f"request {request_id} is a {job.kind} request, not a generation")
    return stream_response(gens, request_id)
