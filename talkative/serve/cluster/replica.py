"""The worker deployment: each replica runs today's engine (`runner.ReplicaRunner`) on its own device.

A pool (`pools.py`) is one deployment of this class. Its groups are Serve-multiplexed: a call names its group as
the multiplexed model id, the router prefers a replica that holds it, and `group()` (decorated with
`serve.multiplexed`, `max_num_models_per_replica` = the device plus the CPU cache) makes the group ready here; the
group Serve evicts, least recently used, leaves the replica's CPU cache (`GroupSlot.__del__`), so Serve's LRU is
the CPU-cache rule. The multiplexing limit is a decorator argument, so `worker_deployment` makes one subclass per
pool with its own.

`run(payload)` streams one whole job's messages (`accepted` with the replica's id and pid, progress and tokens,
then `end`); when the ingress cancels the call, Serve cancels the generator and the runner cancels the job.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve
from ray.serve.deployment import Deployment

from ...nla.options import Resolved
from ..catalog.registry import load_registry
from ..settings import Settings
from .metrics_board import ClusterMetrics, replica_label
from .pools import Pool, load_pools
from .runner import ReplicaRunner
from .worker_metrics import worker_registry


class GroupSlot:
    """A group Serve's multiplexing counts as held by this replica; unloading it leaves the CPU cache.

    `__del__` is synchronous (Serve runs it on a thread when it unloads the group, and Python calls it again when
    the object is collected), and acts once."""

    def __init__(self, group_id: str, runner: ReplicaRunner) -> None:
        self.group_id = group_id
        self.runner = runner
        self.released = False

    def __del__(self) -> None:
        if not self.released:
            self.released = True
            self.runner.evict(self.group_id)


class WorkerReplica:
    """One worker replica: the runner over this replica's device (see the module)."""

    async def __init__(self, settings: Settings, pool_name: str) -> None:  # type: ignore[misc]  # Serve awaits it
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)  # CPU replicas sharing a machine do not compete
        registry = load_registry(settings.model_groups_file)
        registry.bind_environment(settings.environment_overrides)
        self.pool: Pool = load_pools(settings, registry)[pool_name]
        self.runner = ReplicaRunner(
            settings, registry, self.pool.device, max_jobs=self.pool.max_ongoing_requests
        )
        await self.runner.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = ClusterMetrics(replica_label("worker"))  # its engine figures in the cluster's /metrics
        self.metrics.start(worker_registry(self.runner, registry))

    async def group(self, group_id: str) -> GroupSlot:
        """Make a group ready on this replica (the subclass of each pool makes this Serve-multiplexed)."""
        await self.runner.ensure(group_id)
        return GroupSlot(group_id, self.runner)

    async def run(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """One whole job's messages, for the group of the call's multiplexed model id. `accepted` comes first, as
        soon as this replica has the call (making its group ready may take a while)."""
        yield {"type": "accepted", "replica": self.replica, "pid": os.getpid()}
        await self.group(serve.get_multiplexed_model_id())
        async for message in self.runner.run(
            payload["kind"], payload["request"], payload["model_id"], payload.get("cache_scope")
        ):
            if message.get("type") == "accepted":
                continue
            if message.get("type") == "processing":
                message = {**message, "replica": self.replica}  # which replica runs it, for operators
            result = message.get("result") if message.get("type") == "end" else None
            if isinstance(result, dict) and isinstance(result.get("metadata"), dict):
                result["metadata"]["replica"] = self.replica  # which replica ran it, for operators
            yield message

    async def check(self, model_id: str, options: Resolved) -> str | None:
        """The engine's option check for the ingress, before it queues a job of the call's group (Serve routes
        the call to a replica holding it): why the model refuses the options, or None, also when the group is not
        on this replica's device. It never loads the group: a check must not cost a load."""
        return await self.runner.check(model_id, options)

    async def load(self) -> dict[str, Any]:
        """Hold the call's group here (the ingress asks when it starts serving a group); what loaded."""
        group_id = serve.get_multiplexed_model_id()
        await self.group(group_id)
        if group_id in self.runner.holds()[:1]:
            dev = self.runner.scheduler.devices[0]
            assert dev.loaded is not None
            return {
                "group_id": group_id,
                "models": list(dev.loaded.models),
                "errors": dict(dev.loaded.errors),
                "facts": {m: self.runner.worker.model_facts(m) for m in dev.loaded.models},
            }
        failed = self.runner.load_errors.get(group_id)
        return {"group_id": group_id, "models": [], "errors": {"*": failed} if failed else {}}

    async def describe(self) -> dict[str, Any]:
        """This replica: its id, pid, pool and the runner's figures (tests and operators read it)."""
        return {"replica": self.replica, "pid": os.getpid(), "pool": self.pool.name, **self.runner.describe()}

    async def __del__(self) -> None:
        await self.metrics.stop()
        await self.runner.stop()


def worker_deployment(pool: Pool) -> Deployment:
    """The deployment of one pool: `WorkerReplica` with its multiplexing limit and Serve options."""

    class PoolWorker(WorkerReplica):
        @serve.multiplexed(max_num_models_per_replica=pool.max_groups)
        async def group(self, group_id: str) -> GroupSlot:
            return await WorkerReplica.group(self, group_id)

    PoolWorker.__name__ = PoolWorker.__qualname__ = f"Worker_{pool.deployment_name.replace('-', '_')}"
    deployment: Deployment = serve.deployment(**pool.deployment_options())(PoolWorker)
    return deployment
