"""Rate limits counted once for the whole cluster: one named Ray actor holds every bucket's moving window.

Each ingress replica has its own `RateLimiter`; with this storage they all count in the same place, so a client's
budget is RATE_LIMIT_PER_MINUTE however Serve's proxy spreads its requests over the replicas.

Why an actor and not the job store: a hit is counted on every request and WebSocket message, before anything else
happens; an actor answers from memory in one call, where the store would take a write (and a sweep of old rows)
per request on the database every replica also needs for its jobs. The counts are only a minute long, so losing
them with the actor (it is restarted) costs a client at most one extra window of budget.

The actor is detached (it outlives the replica that happened to create it) and found by name by the others. When
it cannot be reached the limiter lets the hit pass with a warning: refusing every request because the counter is
away would take the whole API down for a limit.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.exceptions import RayError

from ..auth.ratelimit import MovingWindow
from .shared_actor import NAMESPACE, shared_actor

log = logging.getLogger("talkative.serve.cluster.shared_limits")

ACTOR_NAME = "rate-limits"


class RateCounter:
    """The actor: one moving window for every bucket. Its calls run one at a time, so a hit is atomic."""

    def __init__(self) -> None:
        self.window = MovingWindow()

    def hit(self, bucket: str, limit: int, window: float) -> float | None:
        return self.window.count(bucket, limit, window)

    def refund(self, bucket: str) -> None:
        self.window.give_back(bucket)


class SharedRateStorage:
    """`RateStorage` over the cluster's `RateCounter`, found (or started) by name on first use."""

    def __init__(self, name: str = ACTOR_NAME, namespace: str = NAMESPACE) -> None:
        self.name = name
        self.namespace = namespace
        self._actor: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # the app may be built on the driver and shipped to the replicas: each resolves the actor itself
        return {"name": self.name, "namespace": self.namespace, "_actor": None}

    def _resolve(self) -> Any:
        return shared_actor(RateCounter, self.name, self.namespace)

    async def _counter(self) -> Any:
        if self._actor is None:
            # a named-actor lookup is a blocking call to the cluster's control store: off the event loop
            self._actor = await asyncio.to_thread(self._resolve)
        return self._actor

    async def hit(self, bucket: str, limit: int, window: float) -> float | None:
        try:
            counter = await self._counter()
            wait: float | None = await counter.hit.remote(bucket, limit, window)
            return wait
        except RayError as exc:
            self._actor = None
            log.warning("the shared rate counter is unreachable (%s); this hit is not counted", exc)
            return None

    async def refund(self, bucket: str) -> None:
        try:
            counter = await self._counter()
            await counter.refund.remote(bucket)
        except RayError as exc:
            self._actor = None
            log.warning("the shared rate counter is unreachable (%s); the refund is lost", exc)
