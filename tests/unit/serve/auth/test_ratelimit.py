"""The rate limiter's moving window and its storage seam (the in-process window; the cluster's shared one is
tested in tests/unit/serve/cluster/test_shared_limits.py)."""

from __future__ import annotations

import asyncio

from talkative.serve.auth.ratelimit import MovingWindow, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_counts_per_bucket_and_says_how_long_to_wait() -> None:
    async def go() -> None:
        limiter = RateLimiter(3)
        assert [await limiter.hit("a") for _ in range(3)] == [None, None, None]
        wait = await limiter.hit("a")
        assert wait is not None and 1 <= wait <= 60
        assert await limiter.hit("b") is None
        off = RateLimiter(0)
        assert not off.enabled
        assert all([await off.hit("a") is None for _ in range(1000)])

    asyncio.run(go())


def test_the_window_moves_and_the_wait_is_until_the_oldest_hit_leaves() -> None:
    clock = Clock()
    window = MovingWindow(clock)
    assert window.count("a", 2, 60) is None
    clock.now += 20
    assert window.count("a", 2, 60) is None
    assert window.count("a", 2, 60) == 40  # the first hit leaves at +60
    clock.now += 40
    assert window.count("a", 2, 60) is None  # the first left; the second (at +20) and this one fill it
    assert window.count("a", 2, 60) == 20


def test_a_refund_gives_back_the_newest_hit_only() -> None:
    async def go() -> None:
        clock = Clock()
        limiter = RateLimiter(2, MovingWindow(clock))
        assert await limiter.hit("a") is None
        clock.now += 30
        assert await limiter.hit("a") is None
        await limiter.refund("a")
        assert await limiter.hit("a") is None  # the refunded place is free again
        assert await limiter.hit("a") == 30  # the oldest (kept) hit leaves in 30 s
        await limiter.refund("nobody")  # nothing to give back: no error

    asyncio.run(go())


def test_idle_buckets_are_swept_after_a_window() -> None:
    clock = Clock()
    window = MovingWindow(clock)
    for n in range(50):
        window.count(f"address-{n}", 5, 60)
    assert window.buckets() == 50
    clock.now += 61
    window.count("fresh", 5, 60)
    assert window.buckets() == 1
