"""Per-client rate limits (`RATE_LIMIT_PER_MINUTE`), on REST requests and WebSocket messages alike.

A moving window: N hits in any 60 seconds, never a burst of 2N across a window boundary as a fixed window would
allow. A bucket is named by the caller's identity, so REST and WebSocket traffic of one key share one budget. The
answer of a refused hit is the number of seconds until the oldest hit leaves the window, which the caller sends as
`Retry-After`.

Where the hits are counted is a seam (`RateStorage`): in this process for one server (`MovingWindow`), or in one
place every ingress replica of a cluster asks (`talkative.serve.cluster.shared_limits`), so that a client's budget
is the same however Serve's proxy spreads its requests. Every storage call is awaited: a shared counter is a call
away, and the event loop must not wait on it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

WINDOW_SECONDS = 60.0


class RateStorage(Protocol):
    """Hit counts by bucket over a moving window; one storage may serve several limiters' buckets."""

    async def hit(self, bucket: str, limit: int, window: float) -> float | None:
        """Count one hit when the bucket has fewer than `limit` in the last `window` seconds and return None;
        else count nothing and return the seconds until its oldest hit leaves the window."""
        ...

    async def refund(self, bucket: str) -> None:
        """Forget the bucket's newest hit."""
        ...


class MovingWindow:
    """The hits of every bucket as their times, newest last, in this process. Buckets nobody hit for a whole
    window are dropped at the next sweep (about once a window), so one-off callers (an address that sent a wrong
    key once) do not stay in memory."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._swept = self._clock()

    def count(self, bucket: str, limit: int, window: float) -> float | None:
        now = self._clock()
        self._sweep(now, window)
        hits = self._hits.setdefault(bucket, deque())
        while hits and hits[0] <= now - window:
            hits.popleft()
        if len(hits) >= limit:
            return hits[0] + window - now
        hits.append(now)
        return None

    def give_back(self, bucket: str) -> None:
        hits = self._hits.get(bucket)
        if hits:
            hits.pop()

    def buckets(self) -> int:
        return len(self._hits)

    def _sweep(self, now: float, window: float) -> None:
        if now - self._swept < window:
            return
        self._swept = now
        for bucket in [b for b, hits in self._hits.items() if not hits or hits[-1] <= now - window]:
            del self._hits[bucket]

    # -- RateStorage ----------------------------------------------------------------------------------------------
    async def hit(self, bucket: str, limit: int, window: float) -> float | None:
        return self.count(bucket, limit, window)

    async def refund(self, bucket: str) -> None:
        self.give_back(bucket)


class RateLimiter:
    """`per_minute` hits per bucket (0: no limit), counted in `storage` (this process's, unless given one)."""

    def __init__(self, per_minute: int, storage: RateStorage | None = None) -> None:
        self.per_minute = per_minute
        self.storage: RateStorage = storage if storage is not None else MovingWindow()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    async def hit(self, bucket: str) -> int | None:
        """Count one hit; None when allowed, else the whole seconds (at least 1) to wait before retrying."""
        if not self.enabled:
            return None
        wait = await self.storage.hit(bucket, self.per_minute, WINDOW_SECONDS)
        return None if wait is None else max(1, math.ceil(wait))

    async def refund(self, bucket: str) -> None:
        """Give back the bucket's latest hit: a request that turned out to cost nothing (a result-cache hit) is
        counted only after the gate has charged it."""
        if self.enabled:
            await self.storage.refund(bucket)
