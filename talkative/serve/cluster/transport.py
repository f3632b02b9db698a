"""Serve's side of the dispatcher: calls to a pool's worker deployment through its `DeploymentHandle`.

A job's call is `handle.options(multiplexed_model_id=<group>, stream=True).run.remote(payload)`: Serve's router
prefers a replica that holds the group (multiplexing), balances between them, and queues or refuses by the
deployment's `max_ongoing_requests` / `max_queued_requests`. Ray's exceptions are turned into the dispatcher's
here, so nothing else at the ingress imports ray: a dead or unreachable replica is `ReplicaLost` (send again), a
refusal `ClusterBusy` (429 when replicas are merely full, 503 when none is running).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from ...nla.options import Resolved
from .dispatch import CallCancelled, ClusterBusy, ReplicaLost
from .pools import Pool, pool_of


class ServeStream:
    """One streaming call; iterating it yields the replica's messages, with Ray's failures translated."""

    def __init__(
        self, response: DeploymentResponseGenerator, ended: Callable[[], None] = lambda: None
    ) -> None:
        self.response = response
        self.cancelled = False
        self.ended = ended  # called once, when the call's messages end (however they end)

    def cancel(self) -> None:
        self.cancelled = True
        self.response.cancel()

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        try:
            async for message in self._messages():
                yield message
        finally:
            self.ended()
            self.ended = lambda: None

    async def _messages(self) -> AsyncIterator[dict[str, Any]]:
        try:
            async for message in self.response:
                yield message
        except BackPressureError as exc:
            raise ClusterBusy(str(exc), status=429, retry_after=exc.retry_after_s) from None
        except DeploymentUnavailableError as exc:
            raise ClusterBusy(str(exc), status=503, retry_after=5) from None
        except (RayActorError, ReplicaUnavailableError) as exc:
            raise ReplicaLost(type(exc).__name__) from None
        except RequestCancelledError:
            raise CallCancelled("cancelled") from None
        except asyncio.CancelledError:
            if (
                self.cancelled
            ):  # our own cancel, surfacing through the response: the job's end, not this task's
                raise CallCancelled("cancelled") from None
            raise


class ServeTransport:
    """The handles of every pool's worker deployment, by pool name."""

    def __init__(self, pools: Mapping[str, Pool], handles: Mapping[str, DeploymentHandle]) -> None:
        self.pools = dict(pools)
        self.handles = dict(handles)
        self.calls: dict[str, int] = {}  # pool name -> this ingress's job calls that have not ended

    def _pool_full(self, group_id: str) -> bool:
        """Whether this ingress's own job calls fill the pool's replicas (at their fewest), so that another call
        would wait in Serve's queue."""
        pool = pool_of(self.pools, group_id)
        replicas = int(pool.autoscaling.get("min_replicas", 1)) if pool.autoscaling else pool.replicas
        return self.calls.get(pool.name, 0) >= max(1, replicas) * pool.max_ongoing_requests

    def _handle(self, group_id: str) -> DeploymentHandle:
        return self.handles[pool_of(self.pools, group_id).name]

    def open(self, group_id: str, payload: dict[str, Any]) -> ServeStream:
        handle = self._handle(group_id).options(multiplexed_model_id=group_id, stream=True)
        response = handle.run.remote(payload)
        assert isinstance(response, DeploymentResponseGenerator)  # stream=True
        name = pool_of(self.pools, group_id).name
        self.calls[name] = self.calls.get(name, 0) + 1

        def ended() -> None:
            self.calls[name] -= 1

        return ServeStream(response, ended)

    async def load(self, group_id: str) -> dict[str, Any]:
        handle = self._handle(group_id).options(multiplexed_model_id=group_id)
        facts: dict[str, Any] = await handle.load.remote()
        return facts

    async def check(self, group_id: str, model_id: str, options: Resolved) -> str | None:
        """A short call (not streamed) to a replica holding the group; cancelled on the replica when the ingress
        stops waiting for it. Not made while the pool is full of this ingress's jobs: it would take a place in
        Serve's queue (`max_queued_requests`) that a job could have, and wait for a running job to end."""
        if self._pool_full(group_id):
            return None  # the replica that prepares the job checks its options
        response = (
            self._handle(group_id).options(multiplexed_model_id=group_id).check.remote(model_id, options)
        )
        try:
            refusal: str | None = await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        return refusal
