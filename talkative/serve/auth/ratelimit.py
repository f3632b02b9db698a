"""Per-client rate limits (`RATE_LIMIT_PER_MINUTE`), on REST requests and WebSocket messages alike.

A moving window of the `limits` package in process memory: N hits in any 60 seconds, never a burst of 2N across
a window boundary as a fixed window would allow. One limiter per app (no global state); a bucket is named by the
caller's identity, so REST and WebSocket traffic of one key share one budget. The answer of a refused hit is the
number of seconds until the oldest hit leaves the window, which the caller sends as `Retry-After`.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


class RateLimiter:
    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._item = RateLimitItemPerMinute(per_minute) if per_minute > 0 else None
        self._storage = MemoryStorage()
        self._limiter = MovingWindowRateLimiter(self._storage) if self._item is not None else None

    @property
    def enabled(self) -> bool:
        return self._item is not None

    def hit(self, bucket: str) -> int | None:
        """Count one hit; None when allowed, else the whole seconds (at least 1) to wait before retrying."""
        if self._item is None or self._limiter is None:
            return None
        if self._limiter.hit(self._item, bucket):
            return None
        stats = self._limiter.get_window_stats(self._item, bucket)
        return max(1, math.ceil(stats.reset_time - time.time()))

    def refund(self, bucket: str) -> None:
        """Give back the bucket's latest hit: a request that turned out to cost nothing (a result-cache hit) is
        counted only after the gate has charged it. The moving window keeps one entry per hit, newest first."""
        if self._item is None:
            return
        key = self._item.key_for(bucket)
        with self._storage.locks[key]:
            events = self._storage.events.get(key)
            if events:
                events.pop(0)
