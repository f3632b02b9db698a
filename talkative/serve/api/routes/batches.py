"""Batch jobs over REST: submit many items at once, follow their progress, read their results as they finish.

`POST /api/v1/batches` takes a JSON body (`{items, options?, model_id?}`) or a JSONL upload (the body itself as
`application/x-ndjson`, or a `file` of a `multipart/form-data` form; the shared `model_id` and `options` then come
as query parameters or form fields). A JSON body is checked whole (any invalid item: 400, nothing runs); a JSONL
upload line by line: a line that is not a valid item fails on its own, with its line number, and the rest run.
The batch is stored before the 202 answer; `jobs/batches.py` runs it.

A batch belongs to the key that submitted it (another key gets 404, as for an id that does not exist); the
administrator sees every batch.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import HTTPConnection

from ...auth.policy import ClientIdentity
from ...errors import describe_validation_error
from ...jobs.batches import RUNNING, Batch, Batches, ItemSpec
from ...jobs.record import UnknownRequest, text_length
from ..deps import Identity, ServiceDep, client_identity, model_for
from ..schemas import BatchDefaults, BatchItem, BatchListing, BatchProgress, BatchRequest, ErrorBody

#: the batches' resource; its POST body (an upload) has its own limit, MAX_BATCH_BYTES (app.py's gate)
BATCHES_PATH = "/api/v1/batches"
JSONL_TYPES = frozenset(
    {"application/x-ndjson", "application/jsonl", "application/x-jsonlines", "text/jsonl"}
)
PARQUET = "application/vnd.apache.parquet"
PAGE = 500  # result lines read from the store at a time
FOLLOW_WAKE_SECONDS = 5.0  # a follower re-reads at least this often, even when nothing signals a change
MAX_OFFSET = 2**63 - 1

SUBMIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["items"],
                    "properties": {
                        "items": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["id"],
                                "properties": {
                                    "id": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                                    "text": {"type": "string"},
                                    "messages": {"type": "array", "items": {"type": "object"}},
                                    "options": {"type": "object"},
                                },
                            },
                        },
                        "model_id": {"type": "string"},
                        "options": {"type": "object"},
                    },
                }
            },
            "application/x-ndjson": {"schema": {"type": "string", "description": "One JSON item per line."}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "model_id": {"type": "string"},
                        "options": {"type": "string", "description": "JSON object"},
                    },
                }
            },
        },
    }
}

router = APIRouter(
    prefix=BATCHES_PATH,
    dependencies=[Depends(client_identity)],
    responses={
        400: {"model": ErrorBody, "description": "invalid input"},
        404: {"model": ErrorBody, "description": "unknown batch id (or another key's batch)"},
    },
)


def batches_of(conn: HTTPConnection) -> Batches:
    batches: Batches = conn.app.state.batches
    return batches


BatchesDep = Annotated[Batches, Depends(batches_of)]


async def _owned(batches: Batches, who: ClientIdentity, batch_id: str) -> Batch:
    """The batch, when the caller may see it (its owner, or the administrator); else 404 as for no batch."""
    batch = await batches.store.get(batch_id)
    if batch is None or not (who.is_admin or batch.owner == who.key):
        raise HTTPException(404, f"unknown batch_id {batch_id!r}")
    return batch


# -- reading a submission -------------------------------------------------------------------------------------------
def _json_items(body: BatchRequest, max_chars: int) -> list[ItemSpec]:
    """The items of a JSON body: any item that is not valid refuses the whole batch (400), naming the item."""
    defaults = body.option_defaults()
    specs = []
    for i, item in enumerate(body.items):
        try:
            request = item.engine_request(defaults)
        except ValidationError as exc:
            raise HTTPException(400, f"items.{i}.{describe_validation_error(exc.errors())}") from None
        except ValueError as exc:
            raise HTTPException(400, f"items.{i}: {exc}") from None
        if (n := text_length(request)) > max_chars:
            raise HTTPException(400, f"items.{i}: {n} characters, more than MAX_TEXT_LENGTH ({max_chars})")
        specs.append(ItemSpec(item.id, request))
    return specs


def _read_line(n: int, text: str, defaults: dict[str, Any], max_chars: int) -> ItemSpec:
    """One line of a JSONL upload: an item, or a failed one that says what is wrong with the line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return ItemSpec(None, None, f"line {n}: not JSON ({exc.msg} at column {exc.colno})", n)
    raw_id = data.get("id") if isinstance(data, dict) else None
    item_id = raw_id if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None
    try:
        item = BatchItem.model_validate(data)
        request = item.engine_request(defaults)
    except ValidationError as exc:
        return ItemSpec(item_id, None, f"line {n}: {describe_validation_error(exc.errors())}", n)
    except ValueError as exc:
        return ItemSpec(item_id, None, f"line {n}: {exc}", n)
    if (chars := text_length(request)) > max_chars:
        return ItemSpec(
            item_id, None, f"line {n}: {chars} characters, more than MAX_TEXT_LENGTH ({max_chars})", n
        )
    return ItemSpec(item.id, request, None, n)


def _jsonl_items(text: str, defaults: dict[str, Any], max_chars: int) -> list[ItemSpec]:
    specs = [
        _read_line(n, line, defaults, max_chars)
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]
    seen: dict[str, int | None] = {}
    for spec in specs:
        if spec.item_id is None:
            continue
        key = json.dumps(spec.item_id)
        if key in seen:
            raise HTTPException(
                400,
                f"line {spec.line}: id {spec.item_id!r} is also the id of line {seen[key]}; ids must be unique",
            )
        seen[key] = spec.line
    return specs


def _defaults(model_id: str | None, options: str | None) -> BatchDefaults:
    """The shared defaults of a JSONL upload, given as query parameters or form fields (`options`: JSON text)."""
    try:
        parsed = json.loads(options) if options else None
    except json.JSONDecodeError:
        raise HTTPException(400, "options: not a JSON object") from None
    return BatchDefaults.model_validate({"model_id": model_id, "options": parsed})


async def _upload(request: Request) -> tuple[str, str | None, str | None]:
    """The JSONL text of a multipart form's `file`, and its `model_id` and `options` fields."""
    form = await request.form()
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise HTTPException(400, "the form has no file field holding the JSONL items")
    raw = await file.read()
    fields = {name: form.get(name) for name in ("model_id", "options")}
    values = {k: v if isinstance(v, str) and v else None for k, v in fields.items()}
    return _decode(raw), values["model_id"], values["options"]


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HTTPException(400, f"the upload is not UTF-8 text (byte {exc.start})") from None


# -- routes -----------------------------------------------------------------------------------------------------------
@router.post(
    "",
    status_code=202,
    response_model=BatchProgress,
    summary="Submit a batch of analyses (JSON, or a JSONL upload)",
    openapi_extra=SUBMIT_BODY,
    responses={
        413: {"model": ErrorBody, "description": "more items than MAX_BATCH_ITEMS"},
        415: {"model": ErrorBody, "description": "neither JSON, JSONL nor a multipart form"},
        429: {"model": ErrorBody, "description": "MAX_BATCHES_IN_FLIGHT unfinished batches already"},
    },
)
async def submit_batch(
    request: Request,
    svc: ServiceDep,
    batches: BatchesDep,
    who: Identity,
    model_id: str | None = Query(None, description="JSONL only: the model of every item.", max_length=200),
    options: str | None = Query(
        None, description="JSONL only: the items' default options, as a JSON object."
    ),
) -> dict[str, Any]:
    """Stores the batch and answers at once (202) with its progress; its items then run as analyses that yield to
    interactive requests. Read results from `GET /api/v1/batches/{batch_id}/results`."""
    settings = svc.settings
    max_chars = settings.max_text_length
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("application/json", ""):
        if model_id is not None or options is not None:
            raise HTTPException(400, "with a JSON body, give model_id and options in the body")
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPException(400, "the body is not valid JSON") from None
        body = BatchRequest.model_validate(data)
        defaults: BatchDefaults = body
        specs, source = _json_items(body, max_chars), "json"
    elif kind in JSONL_TYPES or kind == "multipart/form-data":
        if kind == "multipart/form-data":
            text, form_model, form_options = await _upload(request)
            model_id, options = model_id or form_model, options or form_options
        else:
            text = _decode(await request.body())
        defaults = _defaults(model_id, options)
        specs, source = _jsonl_items(text, defaults.option_defaults(), max_chars), "jsonl"
    else:
        raise HTTPException(415, f"send JSON, JSONL (application/x-ndjson) or a multipart form, not {kind!r}")
    if not specs:
        raise HTTPException(400, "the batch has no items")
    if len(specs) > settings.max_batch_items:
        raise HTTPException(
            413,
            f"the batch has {len(specs)} items, more than MAX_BATCH_ITEMS ({settings.max_batch_items}); split it",
        )
    model = await model_for(svc, defaults.model_id, who)
    option_defaults = defaults.option_defaults()
    await svc.scheduler.check_analysis(model, option_defaults)
    batch = await batches.submit(who.key, model, option_defaults, specs, source)
    return batches.progress(batch)


@router.get("", response_model=BatchListing, summary="Your batches, newest first")
async def list_batches(
    batches: BatchesDep,
    who: Identity,
    limit: int = Query(20, ge=1, le=100),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    all: bool = Query(False, description="Administrator only: every key's batches."),
) -> dict[str, Any]:
    if all and not who.is_admin:
        raise HTTPException(403, "only the administrator may list every key's batches")
    page, total = await batches.listing(None if all else who.key, limit, offset)
    return {"batches": [batches.progress(b) for b in page], "total": total, "limit": limit, "offset": offset}


@router.get("/{batch_id}", response_model=BatchProgress, summary="A batch's progress")
async def batch_progress(batch_id: str, batches: BatchesDep, who: Identity) -> dict[str, Any]:
    """Items done (completed or failed), positions explained, positions per second and the ETA."""
    return batches.progress(await _owned(batches, who, batch_id))


@router.get(
    "/{batch_id}/results",
    summary="A batch's results, one item per line in completion order (JSONL, or Parquet)",
    responses={
        200: {
            "description": "JSONL: `{id, status, tokens, metadata}` or `{id, status, error}` per line",
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                PARQUET: {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
    response_class=Response,
)
async def batch_results(
    batch_id: str,
    batches: BatchesDep,
    who: Identity,
    follow: bool = Query(False, description="Keep the stream open until the batch ends (JSONL only)."),
    after: int = Query(0, ge=0, le=MAX_OFFSET, description="Skip the first lines (to resume a download)."),
    format: Literal["jsonl", "parquet"] = Query("jsonl"),
) -> Response:
    """The items finished so far (or, with `follow`, every item as it finishes); completed and failed items have
    a line, cancelled ones none. `X-Batch-Status` is the batch's status, `X-Batch-Over: true` says that no line
    will follow those of this answer (both read before its lines), so a poller needs no second request."""
    batch = await _owned(batches, who, batch_id)
    state = {"X-Batch-Status": batch.status, "X-Batch-Over": str(_over(batch)).lower()}
    if format == "parquet":
        if follow:
            raise HTTPException(400, "follow streams JSONL; Parquet is written once, from what is done")
        lines: list[str] = []
        while page := await batches.results(batch_id, after + len(lines), PAGE):
            lines.extend(page)
        return Response(
            parquet(lines),
            media_type=PARQUET,
            headers={"Content-Disposition": f'attachment; filename="batch-{batch_id}.parquet"', **state},
        )
    return StreamingResponse(
        _stream(batches, batch_id, after, follow),
        media_type="application/x-ndjson",
        headers={
            "Content-Disposition": f'inline; filename="batch-{batch_id}.jsonl"',
            "Cache-Control": "no-store",
            **state,
        },
    )


def _over(batch: Batch) -> bool:
    """No item will end any more: the batch has ended and its items running at a cancel have recorded their ends."""
    return batch.terminal and not batch.counts.get(RUNNING)


async def _stream(batches: Batches, batch_id: str, after: int, follow: bool) -> AsyncIterator[str]:
    cursor = after
    while True:
        try:
            batch = await batches.get(batch_id)  # read before the lines: once it is over, no line comes later
        except UnknownRequest:
            return  # deleted meanwhile
        page = await batches.results(batch_id, cursor, PAGE)
        if page:
            cursor += len(page)
            yield "".join(line + "\n" for line in page)
            if len(page) == PAGE:
                continue
        if not follow or _over(batch):
            return
        await batches.changed(FOLLOW_WAKE_SECONDS, batch_id)  # sooner for a batch another replica feeds


def parquet(lines: list[str]) -> bytes:
    """Result lines as a Parquet table: `id, status, line, request_id, error, n_tokens` and `tokens` and
    `metadata` as JSON text (rows differ by model and options, so one nested schema would refuse some batches)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in lines]
    table = pa.table(
        {
            "id": pa.array([None if r["id"] is None else str(r["id"]) for r in rows], pa.string()),
            "status": pa.array([r["status"] for r in rows], pa.string()),
            "line": pa.array([r.get("line") for r in rows], pa.int64()),
            "request_id": pa.array([r.get("request_id") for r in rows], pa.string()),
            "error": pa.array([r.get("error") for r in rows], pa.string()),
            "n_tokens": pa.array([len(r["tokens"]) if "tokens" in r else None for r in rows], pa.int64()),
            "tokens": pa.array(
                [json.dumps(r["tokens"]) if "tokens" in r else None for r in rows], pa.string()
            ),
            "metadata": pa.array(
                [json.dumps(r["metadata"]) if "metadata" in r else None for r in rows], pa.string()
            ),
        }
    )
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


@router.post(
    "/{batch_id}/cancel",
    response_model=BatchProgress,
    summary="Cancel a batch",
    responses={409: {"model": ErrorBody, "description": "the batch has already ended"}},
)
async def cancel_batch(batch_id: str, batches: BatchesDep, who: Identity) -> dict[str, Any]:
    """Items not started never run and running ones stop; finished items keep their results. 409 when over."""
    await _owned(batches, who, batch_id)
    return batches.progress(await batches.cancel(batch_id))


@router.delete("/{batch_id}", summary="Delete a batch and its results")
async def delete_batch(batch_id: str, batches: BatchesDep, who: Identity) -> dict[str, Any]:
    """An unfinished batch is cancelled first; then the batch, its items and their results are gone."""
    await _owned(batches, who, batch_id)
    await batches.delete(batch_id)
    return {"batch_id": batch_id, "deleted": True}
