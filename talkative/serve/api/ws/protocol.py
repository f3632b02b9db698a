"""The WebSocket protocol at `/ws`, the seed API's message set: one JSON object per frame, each with a `type`.

Client -> server: `analyze`, `cancel_request` (alias `interrupt`), `list_model_groups`, `switch_model_grouped`,
`ping`, and our `subscribe` / `status` for picking a request up by id after a reconnect. A malformed frame gets an
`error` and the connection stays open. Every reply echoes the frame's `client_request_id`; every message about a
job carries the job's. The handlers are small functions in a table, not one long if/elif. A refusal is the same
answer the REST API gives (`serve/errors.py`), as an `error` frame: `{error, code, request_id, client_request_id}`
plus `kind` and `retry_after` when the refusal says when to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from ... import errors
from ...catalog import listing, visibility
from ...jobs.record import UnknownRequest
from ...lifecycle import cancel_abandoned
from ...service import Service
from ..deps import (
    catalog_state,
    generations_of,
    message_gate,
    model_for,
    refund_cache_hit,
    service_of,
    websocket_identity,
)
from ..schemas import AnalyzeRequest, GenerateRequest
from .hub import Connection

log = logging.getLogger("talkative.serve.ws")
router = APIRouter()

Handler = Callable[[Service, Connection, dict[str, Any]], Awaitable[None]]
HANDLERS: dict[str, Handler] = {}


class ProtocolError(Exception):
    """A frame the protocol cannot take (not JSON, no type, a missing field); `request_id` names the job it was
    about, when it names one."""

    def __init__(self, message: str, code: int = 400, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


def handles(*types: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for t in types:
            HANDLERS[t] = fn
        return fn

    return register


def _crid(data: dict[str, Any]) -> str | None:
    value = data.get("client_request_id")
    return value if isinstance(value, str) else None


def _job_id(data: dict[str, Any]) -> str:
    value = data.get("request_id")
    if not isinstance(value, str) or not value:
        raise ProtocolError("'request_id' (a string) is required")
    return value


@router.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    identity = await websocket_identity(websocket)
    if identity is None:
        return  # refused: websocket_identity accepted it and closed it with 1008
    await websocket.accept()
    svc = service_of(websocket)
    # the client's own choice (kept across reconnects), else the server's default unless hidden from it; read
    # before the connection is attached, so that its first message is this greeting, never a queue_update
    current = listing.shown_current(svc.registry, await catalog_state(svc, identity), identity)
    conn = svc.hub.attach(websocket, identity)
    sender = asyncio.get_running_loop().create_task(svc.hub.run_sender(conn))
    conn.send(
        {
            "type": "connection_established",
            "connection_id": conn.id,
            "message": "Connected to the Talkative analysis server",
            "current_model": current,
            "model_info": svc.scheduler.model_info(current) if current else None,
        }
    )
    conn.want_queue_update()
    try:
        while not conn.closed:
            if not await conn.wait_for_room(svc.settings.ws_send_timeout):
                break  # too slow to read its answers: the sender closes it with 1013 and the reason
            frame = await websocket.receive()
            if frame["type"] == "websocket.disconnect":
                break
            raw = frame.get("text")
            if raw is None and frame.get("bytes") is not None:
                try:
                    raw = frame["bytes"].decode("utf-8")
                except UnicodeDecodeError as exc:
                    _error(conn, None, f"message is not valid UTF-8 (byte {exc.start})", 400)
                    continue
            await _handle(svc, conn, raw or "")
            # frames a client sent in a burst are already buffered, so receive() would return them one after
            # another without ever letting the sender run; yield so answers leave as frames come in
            await asyncio.sleep(0)
    except WebSocketDisconnect:
        pass
    except RuntimeError as exc:  # receive after the sender closed the socket
        log.debug("connection %s: %s", conn.id, exc)
    finally:
        followed = list(conn.jobs)
        svc.hub.detach(conn)
        if conn.close_code != 1000:  # too slow: let the sender end with its close frame (code and reason)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sender, 2 * svc.settings.ws_send_timeout)
        sender.cancel()
        # a closed connection's unfinished jobs end with it, unless another connection follows them
        await cancel_abandoned(svc, conn, followed)


async def _handle(svc: Service, conn: Connection, raw: str) -> None:
    data: Any = None
    try:
        limit = svc.settings.max_ws_message_bytes
        if len(raw) > limit or (len(raw) * 4 > limit and len(raw.encode("utf-8", "replace")) > limit):
            raise ProtocolError(f"message too large (more than MAX_WS_MESSAGE_BYTES, {limit} bytes)", 413)
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"message is not valid JSON: {exc.msg}") from None
        except RecursionError:
            raise ProtocolError("message is not valid JSON: nested too deeply") from None
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise ProtocolError("a message must be a JSON object with a string 'type'")
        handler = HANDLERS.get(data["type"])
        if handler is None:
            raise ProtocolError(
                f"unknown message type {data['type']!r} (known: {', '.join(sorted(HANDLERS))})"
            )
        await message_gate(conn, data)  # rate limit and ownership, for every message type
        await handler(svc, conn, data)
    except ProtocolError as exc:
        _error(conn, data, str(exc), exc.code, exc.request_id)
    except Exception as exc:
        reply = errors.reply_for(exc)
        if reply is None:
            log.exception("handling a WebSocket message failed")
            _error(conn, data, "internal error while handling the message", 500)
        else:
            _error(conn, data, reply.detail, reply.status, extra=reply.frame_fields())


def _error(
    conn: Connection,
    data: Any,
    message: str,
    code: int,
    request_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    crid = _crid(data) if isinstance(data, dict) else None
    if request_id is None and isinstance(data, dict) and isinstance(data.get("request_id"), str):
        request_id = data["request_id"]
    conn.send(
        {
            "type": "error",
            "error": message,
            "code": code,
            "request_id": request_id,
            "client_request_id": crid,
            **(extra or {}),
        }
    )


# -- handlers -------------------------------------------------------------------------------------------------------
@handles("analyze")
async def analyze(svc: Service, conn: Connection, data: dict[str, Any]) -> None:
    body = {k: v for k, v in data.items() if k != "type"}
    req = AnalyzeRequest.model_validate(body)
    await model_for(svc, req.model_id, conn.identity)
    job = await svc.submit_analysis(
        req.engine_request(),
        model_id=req.model_id,
        client_request_id=req.client_request_id,
        owner=conn.identity.key,
        subscriber=conn,
    )
    await refund_cache_hit(conn.websocket, conn.identity, job)


@handles("cancel_request", "interrupt")
async def cancel(svc: Service, conn: Connection, data: dict[str, Any]) -> None:
    """By `request_id`, or by the `client_request_id` of one of this connection's requests."""
    job_id = data.get("request_id")
    crid = _crid(data)
    if not isinstance(job_id, str) or not job_id:
        if crid is None:
            raise ProtocolError("'request_id' (a string) is required")
        mine = (
            j.id for j in svc.scheduler.jobs.values() if j.client_request_id == crid and j.id in conn.jobs
        )
        job_id = next(mine, None)
        chain = generations_of(conn.websocket).pending_chain(conn.id, crid) if job_id is None else None
        if chain is not None:  # a generate_and_analyze whose analysis is not queued yet: stop its generation
            await generations_of(conn.websocket).cancel_chain(chain)
            return
        if job_id is None:
            raise ProtocolError(f"no active request of this connection has client_request_id {crid!r}", 404)
    job = await svc.scheduler.cancel(job_id)
    if not svc.hub.is_subscribed(job.id, conn):
        conn.send(
            {
                "type": "request_cancelled",
                "request_id": job.id,
                "client_request_id": job.client_request_id,
                "message": job.error,
            }
        )


@handles("list_model_groups")
async def list_model_groups(svc: Service, conn: Connection, data: dict[str, Any]) -> None:
    who = conn.identity
    view = listing.client_listing(svc.registry, svc.settings, await catalog_state(svc, who), who)
    conn.send({"type": "model_groups_list", **view, "client_request_id": _crid(data)})


@handles("switch_model_grouped", "switch_model")
async def switch_model(svc: Service, conn: Connection, data: dict[str, Any]) -> None:
    model_id = data.get("model_id")
    if not isinstance(model_id, str) or not model_id:
        raise ProtocolError("'model_id' (a string) is required")
    visibility.check_model(svc.registry, model_id, conn.identity)
    await svc.submit_switch(
        model_id,
        client_request_id=_crid(data),
        owner=conn.identity.key,
        subscriber=conn,
        server_default=conn.identity.is_admin,
    )


@handles("ping")
async def ping(svc: Service, conn: Connection, data: dict[str, Any]) -> None:
    conn.send({"type": "pong", "time": time.time(), "client_request_id": _crid(data)})


@handles("subscribe")
async def subscribe(svc: Service, conn: Connection, data: dict[str, Any]) -> None:
    """Follow a request by id (e.g. after a reconnect): its status now, then its messages; a finished request
    gets its final message (`result`, `error`, ...) at once."""
    job_id = _job_id(data)
    job = await svc.scheduler.get(job_id)
    if job is None:
        raise UnknownRequest(job_id)
    conn.send({"type": "status", **job.status_body(svc.scheduler.queue_position(job_id)), "result": None})
    if job.terminal:
        final = svc.scheduler.final_message(job)
        conn.send({**final, "request_id": job.id, "client_request_id": job.client_request_id})
    else:
        svc.scheduler.follow(job, conn)  # run here, or by another replica: its end is read from the store


@handles("status")
async def status(svc: Service, conn: Connection, data: dict[str, Any]) -> None:
    job_id = _job_id(data)
    job = await svc.scheduler.get(job_id)
    if job is None:
        raise UnknownRequest(job_id)
    conn.send({"type": "status", **job.status_body(svc.scheduler.queue_position(job_id))})


# -- generation -------------------------------------------------------------------------------------------------
@handles("generate")
async def generate(svc: Service, conn: Connection, data: dict[str, Any]) -> None:
    """The REST body of `POST /generate`; `model_id` may sit at the top or in `options` (the seed's place).
    Answer: `queued`, `processing`, one `token` per token and completion, then `generation_complete`."""
    req = GenerateRequest.model_validate({k: v for k, v in data.items() if k != "type"})
    model_id = await model_for(svc, req.model_id, conn.identity)
    await generations_of(conn.websocket).submit(
        req.engine_request(),
        model_id=model_id,
        owner=conn.identity.key,
        client_request_id=req.client_request_id,
        subscriber=conn,
    )


@handles("generate_and_analyze")
async def generate_and_analyze(svc: Service, conn: Connection, data: dict[str, Any]) -> None:
    """A generation (one completion; `client_request_id` + "_gen"), then the analysis of prompt + completion
    (`client_request_id`). The seed API's shape `{generation: {text|messages, options, model_id}, analysis: {options,
    model_id}}`, or flat: the generate fields plus `analysis`."""
    crid = _crid(data)
    generation = data.get("generation")
    if generation is None:
        generation = {k: v for k, v in data.items() if k not in ("type", "analysis", "client_request_id")}
    analysis = data.get("analysis") or {}
    if not isinstance(generation, dict) or not isinstance(analysis, dict):
        raise ProtocolError("'generation' and 'analysis' must be objects")
    if analysis.get("use_generated_completion", True) is not True:
        raise ProtocolError(
            "generate_and_analyze analyses the generated text (use_generated_completion: true)"
        )
    unknown = set(analysis) - {"options", "model_id", "use_generated_completion", "text"}
    if unknown:
        raise ProtocolError(f"unknown analysis fields: {', '.join(sorted(unknown))}")
    req = GenerateRequest.model_validate({**generation, "client_request_id": crid})
    model_id = await model_for(svc, req.model_id, conn.identity)
    analysis_model = analysis.get("model_id") or model_id
    # the analysed text is only known later; a placeholder validates the options and the model now
    areq = AnalyzeRequest.model_validate(
        {"text": "-", "model_id": analysis_model, "options": analysis.get("options")}
    )
    visibility.check_model(svc.registry, analysis_model, conn.identity)
    await generations_of(conn.websocket).submit_chain(
        req.engine_request(),
        areq.engine_request()["options"],
        model_id=model_id,
        analysis_model_id=analysis_model,
        client_request_id=req.client_request_id,
        connection=conn,
    )
