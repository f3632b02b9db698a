"""Shares: read-only links to one completed analysis, anchored at what the sharer wants a colleague to see.

A share is `{request_id, anchor, comment}` in the store's `shares` table (`jobs/migrations.py`). It holds no
copy of the result: reading a share reads the job, so a deleted (or purged) job makes its shares answer 404, and a
share never outlives what it points at. The anchor is one position with a row, a half-open span of token
positions, or a half-open span of characters of the shown text (the rows' tokens joined, which is what the web UI
draws); it is checked against the result when the share is made, and resolved to the positions it covers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .database import Database, Tables
from .record import new_id


class AnchorError(ValueError):
    """An anchor the result does not have; the message says what the result has."""


@dataclass(frozen=True)
class Share:
    id: str
    request_id: str
    owner: str | None
    anchor: dict[str, Any]
    comment: str | None
    created_at: float


def anchored_positions(anchor: dict[str, Any], rows: Sequence[dict[str, Any]], n_tokens: int) -> list[int]:
    """The row positions an anchor covers (at least one), or AnchorError."""
    positions = [int(r["position"]) for r in rows]
    if not positions:
        raise AnchorError("the result has no rows to point at")
    if "position" in anchor:
        if anchor["position"] not in positions:
            raise AnchorError(
                f"position {anchor['position']} has no row; the result's rows are positions "
                f"{positions[0]}..{positions[-1]}"
            )
        return [anchor["position"]]
    if "tokens" in anchor:
        start, end = anchor["tokens"]
        if end > n_tokens:
            raise AnchorError(f"tokens [{start}, {end}) go beyond the {n_tokens} tokens of the input")
        covered = [q for q in positions if start <= q < end]
    else:
        start, end = anchor["chars"]
        spans, at = [], 0
        for r in rows:
            spans.append((at, at + len(r["token"])))
            at += len(r["token"])
        if end > at:
            raise AnchorError(f"chars [{start}, {end}) go beyond the {at} characters of the shown text")
        covered = [q for q, (a, b) in zip(positions, spans, strict=True) if a < end and start < b]
    if not covered:
        raise AnchorError(f"the span [{start}, {end}) covers no row")
    return covered


class ShareStore(Tables):
    """The `shares` table, on a channel of its own."""

    def __init__(self, database: Database | Path) -> None:
        super().__init__(database, "share-store")

    # -- on the store's thread ------------------------------------------------------------------------------------
    def _put(self, share: Share) -> None:
        self._conn().execute(
            "INSERT INTO shares (id, request_id, owner, anchor, comment, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (
                share.id,
                share.request_id,
                share.owner,
                json.dumps(share.anchor),
                share.comment,
                share.created_at,
            ),
        )

    def _get(self, share_id: str) -> Share | None:
        r = self._conn().execute("SELECT * FROM shares WHERE id = ?", (share_id,)).fetchone()
        if r is None:
            return None
        return Share(
            r["id"], r["request_id"], r["owner"], json.loads(r["anchor"]), r["comment"], r["created_at"]
        )

    def _delete(self, share_id: str) -> None:
        self._conn().execute("DELETE FROM shares WHERE id = ?", (share_id,))

    def _forget_request(self, request_id: str) -> int:
        return int(self._conn().execute("DELETE FROM shares WHERE request_id = ?", (request_id,)).rowcount)

    def _orphans(self) -> int:
        """Shares whose job is gone (purged after RESULT_RETENTION_DAYS): they could only answer 404."""
        cur = self._conn().execute("DELETE FROM shares WHERE request_id NOT IN (SELECT id FROM jobs)")
        return int(cur.rowcount)

    # -- async API ------------------------------------------------------------------------------------------------
    async def create(
        self, request_id: str, owner: str | None, anchor: dict[str, Any], comment: str | None
    ) -> Share:
        # a random UUID (122 random bits): the link is the capability when shares are public
        share = Share(new_id(), request_id, owner, anchor, comment, time.time())
        await self._call(self._put, share)
        return share

    async def get(self, share_id: str) -> Share | None:
        return await self._call(self._get, share_id)

    async def delete(self, share_id: str) -> None:
        await self._call(self._delete, share_id)

    async def forget_request(self, request_id: str) -> int:
        """Remove every share of a job (the job is being deleted); how many."""
        return await self._call(self._forget_request, request_id)

    async def purge_orphans(self) -> int:
        return await self._call(self._orphans)
