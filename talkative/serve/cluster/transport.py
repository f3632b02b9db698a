"""Serve's side of the dispatcher: calls to a pool's worker deployment through its `DeploymentHandle`.

A job's call is `handle.options(multiplexed_model_id=<group>, stream=True).run.remote(payload)`: Serve's router
prefers a replica that holds the group (multiplexing), balances between them, and queues or refuses by the
deployment's `max_ongoing_requests` / `max_queued_requests`. Ray's exceptions are turned into the dispatcher's
here, so nothing else at the ingress imports ray: a dead or unreachable replica is `ReplicaLost` (send again), a
refusal `ClusterBusy` (429 when replicas are merely full, 503 when none is running).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from .dispatch import CallCancelled, ClusterBusy, ReplicaLost
from .pools import Pool, pool_of


class ServeStream:
    """One streaming call; iterating it yields the replica's messages, with Ray's failures translated."""

    def __init__(self, response: DeploymentResponseGenerator) -> None:
        self.response = response
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.response.cancel()

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
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

    def _handle(self, group_id: str) -> DeploymentHandle:
        return self.handles[pool_of(self.pools, group_id).name]

    def open(self, group_id: str, payload: dict[str, Any]) -> ServeStream:
        handle = self._handle(group_id).options(multiplexed_model_id=group_id, stream=True)
        response = handle.run.remote(payload)
        assert isinstance(response, DeploymentResponseGenerator)  # stream=True
        return ServeStream(response)

    async def load(self, group_id: str) -> dict[str, Any]:
        handle = self._handle(group_id).options(multiplexed_model_id=group_id)
        facts: dict[str, Any] = await handle.load.remote()
        return facts
