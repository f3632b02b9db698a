"""What the composition root builds differently with BACKEND=ray: the ingress's workers and its one job kind.

`app.build_serving` builds everything else as for the local backend (store, queue, hub, scheduler, service); with
BACKEND=ray it asks `remote_backend` for the scheduler's workers and kinds instead of local devices: one
`ServeWorker` per model group (virtual devices: Serve places groups on replicas, so the ingress never drains a
device to switch), and `RemoteKind` running every kind of job whole on a worker replica. The ingress admits every
job it accepts at once (MAX_ACTIVE_JOBS per virtual device is raised to MAX_QUEUE_SIZE): waiting happens in
Serve's router, bounded by each pool's `max_queued_requests`, and each replica interleaves its
`max_ongoing_requests` jobs. The dispatcher gets the ingress's result cache (the analysis kind's), so the rows
replicas compute are recorded here, under the ingress's job ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ray import serve

from ..catalog.registry import Registry
from ..jobs.analysis import AnalysisKind
from ..jobs.cache import ResultCache
from ..jobs.kinds import JobKind
from ..scheduling.workers import Worker
from ..settings import Settings
from .dispatch import Dispatcher, RemoteKind, ServeWorker
from .names import APP_NAME
from .pools import load_pools
from .transport import ServeTransport


@dataclass
class RemoteBackend:
    """The scheduler's parts with BACKEND=ray, and the settings it runs with."""

    workers: list[Worker]
    kinds: list[JobKind]
    settings: Settings


def remote_backend(settings: Settings, registry: Registry, kinds: Sequence[JobKind]) -> RemoteBackend:
    """Workers and kinds that send every job to the worker deployments of this Serve application."""
    pools = load_pools(settings, registry)
    handles = {
        name: serve.get_deployment_handle(pool.deployment_name, app_name=APP_NAME)
        for name, pool in pools.items()
    }
    analysis = next((k for k in kinds if isinstance(k, AnalysisKind)), None)
    # the result cache stays at the ingress: replicas send each analysis's rows and keys, recorded here
    cache = analysis.cache if analysis is not None and isinstance(analysis.cache, ResultCache) else None
    dispatcher = Dispatcher(ServeTransport(pools, handles), cache=cache)
    workers: list[Worker] = [
        ServeWorker(f"serve:{i}", registry, dispatcher) for i in range(max(1, len(registry.groups)))
    ]
    by_name = {name: kind for kind in kinds for name in kind.names}
    ingress_settings = settings.model_copy(update={"max_active_jobs": settings.max_queue_size})
    return RemoteBackend(workers, [RemoteKind(by_name, dispatcher)], ingress_settings)
