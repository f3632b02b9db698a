"""`GET /api/history`: the caller's own past requests, newest first, for the web UI's history list.

Read from the job store, so the list survives reloads and restarts for as long as results are retained
(`RESULT_RETENTION_DAYS`). "The caller" is the client identity that submitted the jobs (`api/deps.py`: the API
key's owner, or the client address when the server runs without keys). Items carry no results, only what a list
needs (a preview of the input, the options, the summary means, the token count); a result is fetched by id from
`GET /status/{request_id}`.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query

from ...jobs.record import iso
from ..deps import Identity, ServiceDep, client_identity

router = APIRouter(dependencies=[Depends(client_identity)])

PREVIEW_CHARS = 160
MAX_OFFSET = 2**63 - 1  # the job store's integers are signed 64-bit: a larger offset cannot even be bound
KINDS: dict[str, tuple[str, ...]] = {
    "analyze": ("analyze",),
    "generate": ("generate",),
    "all": ("analyze", "generate"),
}


def preview(request: dict[str, Any]) -> str:
    """The start of the text, or of the last chat message (the one a reader recognises a chat by)."""
    if isinstance(request.get("text"), str):
        text = request["text"]
    else:
        messages = request.get("messages") or []
        text = str(messages[-1].get("content", "")) if messages else ""
    text = " ".join(text.split())
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def _item(row: dict[str, Any]) -> dict[str, Any]:
    request = row["request"] or {}
    messages = request.get("messages")
    started, completed = row["started_at"], row["completed_at"]
    return {
        "request_id": row["id"],
        "kind": row["kind"],
        "status": row["status"],
        "model_id": row["model_id"],
        "client_request_id": row["client_request_id"],
        "created_at": iso(row["created_at"]),
        "completed_at": iso(completed),
        "processing_time": round(completed - started, 3) if started and completed else None,
        "input": "messages" if messages is not None else "text",
        "n_messages": len(messages) if messages is not None else None,
        "preview": preview(request),
        "options": request.get("options") or {},
        "n_tokens": row["n_tokens"],
        "summary": row["summary"],
        "error": row["error"],
    }


@router.get("/api/history", summary="The caller's past requests, newest first (without results)")
async def history(
    svc: ServiceDep,
    who: Identity,
    limit: int = Query(20, ge=1, le=100, description="Items per page."),
    offset: int = Query(
        0,
        ge=0,
        le=MAX_OFFSET,
        description="Items to skip (for the next page: offset + limit).",
    ),
    kind: Literal["analyze", "generate", "all"] = Query("analyze", description="Which requests to list."),
) -> dict[str, Any]:
    """`{items: [{request_id, kind, status, model_id, created_at, completed_at, processing_time, input,
    n_messages, preview, options, n_tokens, summary, error}], total, limit, offset}`."""
    rows, total = await svc.store.owned(who.key, KINDS[kind], limit, offset)
    return {"items": [_item(r) for r in rows], "total": total, "limit": limit, "offset": offset}
