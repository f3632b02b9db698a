"""Shares: `POST /api/v1/shares` makes a link to one completed analysis, anchored and commented;
`GET /api/v1/shares/{share_id}` reads it with the result it points at; `DELETE` removes it; `/s/{share_id}` is the
web UI opened on it.

Who may do what. Only the owner of a job (or the admin) may share it; only the share's maker (or the admin) may
delete it. Reading needs an API key like every route, unless PUBLIC_SHARES: then the gate lets `GET
/api/v1/shares/{id}` through without one (the unguessable id is the capability), rate limited per address here.
The page `/s/{id}` is the UI's shell and holds no data, so it is public either way: the UI fetches the share with
the reader's key, or without one when shares are public.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.requests import HTTPConnection

from ...auth.middleware import Refusal
from ...auth.policy import ClientIdentity, client_address, owns
from ...auth.ratelimit import RateLimiter
from ...jobs.record import COMPLETED, iso
from ...jobs.shares import AnchorError, Share, ShareStore, anchored_positions
from ..deps import Identity, ServiceDep, bearer_scheme, client_identity
from ..schemas import ErrorBody, ShareCreated, ShareRequest

SHARE_PAGE = "/s/{share_id}"


def shares_of(conn: HTTPConnection) -> ShareStore:
    store: ShareStore = conn.app.state.shares
    return store


SharesDep = Annotated[ShareStore, Depends(shares_of)]

router = APIRouter(
    responses={
        400: {"model": ErrorBody, "description": "invalid input"},
        404: {"model": ErrorBody, "description": "unknown id"},
    },
)


async def _reader(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> ClientIdentity | None:
    """The caller, or None for a reader without a key when shares are public (rate limited by address)."""
    if not request.app.state.settings.public_shares:
        return await client_identity(request, credentials)
    limiter: RateLimiter = request.app.state.rate_limiter
    address, _proxied = client_address(request.scope, request.app.state.settings.trusted_proxy_header)
    wait = await limiter.hit(f"share-reads:{address}")
    if wait is not None:
        raise Refusal(429, "rate_limited", f"too many share reads; retry in {wait} s", wait)
    return None


def _body(share: Share) -> dict[str, Any]:
    return {
        "share_id": share.id,
        "url": SHARE_PAGE.format(share_id=share.id),
        "request_id": share.request_id,
        "anchor": share.anchor,
        "comment": share.comment,
        "created_at": iso(share.created_at),
    }


@router.post(
    "/api/v1/shares",
    status_code=201,
    response_model=ShareCreated,
    summary="Share one completed analysis, anchored at a position or a span, with a comment",
    dependencies=[Depends(client_identity)],
    responses={409: {"model": ErrorBody, "description": "the request has not completed"}},
)
async def create_share(
    body: ShareRequest, svc: ServiceDep, shares: SharesDep, who: Identity
) -> dict[str, Any]:
    """`{share_id, url}` (`url` = `/s/{share_id}`). 404 unless the caller owns the request (or is the admin);
    409 unless it is a completed analysis; 400 when the anchor is not in its result."""
    job = await svc.scheduler.get(body.request_id)
    if job is None or not (owns(who, job) or who.is_admin):
        raise HTTPException(404, f"unknown request_id {body.request_id!r}")
    if job.kind != "analyze" or job.status != COMPLETED or job.result is None:
        raise HTTPException(409, f"request {job.id} is {job.status}: only a completed analysis can be shared")
    anchor = body.anchor.plain()
    try:
        anchored_positions(anchor, job.result["tokens"], int(job.result["metadata"].get("n_tokens", 0)))
    except AnchorError as exc:
        raise HTTPException(400, f"anchor: {exc}") from None
    share = await shares.create(job.id, who.key, anchor, body.comment)
    return {"share_id": share.id, "url": SHARE_PAGE.format(share_id=share.id)}


@router.get("/api/v1/shares/{share_id}", summary="A share with the result it points at")
async def read_share(
    share_id: str,
    svc: ServiceDep,
    shares: SharesDep,
    _who: Annotated[ClientIdentity | None, Depends(_reader)],
) -> dict[str, Any]:
    """`{share_id, url, request_id, anchor, comment, created_at, positions, model_id, result: {tokens,
    metadata}}`; `positions` are the row positions the anchor covers. 404 once the request is deleted."""
    share = await shares.get(share_id)
    job = await svc.scheduler.get(share.request_id) if share is not None else None
    if share is None or job is None or job.result is None:
        raise HTTPException(404, f"unknown share {share_id!r}")
    rows = job.result["tokens"]
    positions = anchored_positions(share.anchor, rows, int(job.result["metadata"].get("n_tokens", 0)))
    return {**_body(share), "positions": positions, "model_id": job.model_id, "result": job.result}


@router.delete("/api/v1/shares/{share_id}", summary="Delete a share", dependencies=[Depends(client_identity)])
async def delete_share(share_id: str, shares: SharesDep, who: Identity) -> dict[str, Any]:
    """Its maker (or the admin) only; 404 otherwise, as for an unknown id."""
    share = await shares.get(share_id)
    if share is None or not (who.is_admin or share.owner == who.key):
        raise HTTPException(404, f"unknown share {share_id!r}")
    await shares.delete(share_id)
    return {"share_id": share_id, "deleted": True}


@router.get(SHARE_PAGE, include_in_schema=False)
async def share_page(share_id: str) -> RedirectResponse:
    """The web UI opened on the share (`?share=`). The redirect is relative, so the page keeps working behind a
    proxy that serves it under a prefix, and the UI's own relative paths resolve from its root."""
    return RedirectResponse(f"../?share={quote(share_id, safe='')}", status_code=307)
