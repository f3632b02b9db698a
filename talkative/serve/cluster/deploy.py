"""Start or join a Ray cluster, deploy the worker pools and the ingress, serve until told to stop.

`talkative serve --backend ray` calls `serve_forever(settings)`: it joins the cluster at RAY_ADDRESS (else starts
a local one), starts Serve's proxy on HOST:PORT, deploys one worker deployment per pool (`pools.py`) and the
ingress (INGRESS_REPLICAS replicas of the FastAPI app) as one Serve application, and on SIGTERM or SIGINT deletes
the application (each ingress replica's lifespan drains and closes its store) and leaves the cluster, shutting it
down when it started it. `deploy` is the step tests and benchmarks use on a cluster they started themselves.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.deployment import Deployment
from ray.serve.handle import DeploymentHandle

from ..catalog.registry import load_registry
from ..settings import Settings
from .ingress import Ingress
from .names import APP_NAME, INGRESS_DEPLOYMENT
from .pools import load_pools
from .replica import worker_deployment

log = logging.getLogger("talkative.serve.cluster.deploy")


def portable(settings: Settings) -> Settings:
    """The settings as replicas on any node must see them: the MODEL_*/GLOBAL_* variables of this process
    travel with them (a replica's own environment is the raylet's, not this shell's), paths are absolute (the
    files must be at the same paths on every node), the backend is ray."""
    return settings.model_copy(
        update={
            "env_overrides": settings.environment_overrides,
            "backend": "ray",
            # replicas run in Ray's worker directories, not in this shell's: relative paths would move
            "model_groups_file": Path(settings.model_groups_file).resolve(),
            "data_dir": Path(settings.data_dir).resolve(),
        }
    )


def application(settings: Settings, ingress_replicas: int | None = None) -> Any:
    """The Serve application: the ingress deployment bound with every pool's worker deployment."""
    settings = portable(settings)
    registry = load_registry(settings.model_groups_file)
    registry.bind_environment(settings.environment_overrides)
    pools = load_pools(settings, registry)
    workers = [worker_deployment(pool).bind(settings, name) for name, pool in pools.items()]
    ingress: Deployment = serve.deployment(
        name=INGRESS_DEPLOYMENT,
        num_replicas=ingress_replicas or settings.ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(100, 2 * settings.max_queue_size),
    )(Ingress)
    return ingress.bind(settings, *workers)


def start_proxy(host: str, port: int) -> None:
    """Serve's HTTP proxy on host:port (Serve is started once per cluster; a running Serve keeps its own)."""
    serve.start(http_options={"host": host, "port": port})


def deploy(
    settings: Settings, *, port: int | None = None, ingress_replicas: int | None = None
) -> DeploymentHandle:
    """Deploy workers and ingress on the connected cluster, with Serve's proxy on HOST and `port` (default
    PORT); return once every replica is up."""
    start_proxy(settings.bind_host(), port if port is not None else settings.port)
    handle: DeploymentHandle = serve.run(
        application(settings, ingress_replicas), name=APP_NAME, route_prefix="/", blocking=False
    )
    return handle


def connect(settings: Settings) -> bool:
    """Join RAY_ADDRESS, else start a local cluster; True when this process started it (and stops it)."""
    if ray.is_initialized():
        return False
    if settings.ray_address:
        ray.init(address=settings.ray_address)
        return False
    # "local": a plain ray.init() would join the cluster `ray start` last started on this machine, and this
    # process would then shut down a cluster it does not own
    ray.init(address="local")
    return True


def shutdown(started: bool) -> None:
    """Remove the application (its ingress replicas drain), then leave or stop the cluster."""
    try:
        serve.delete(APP_NAME)
    finally:
        if started:
            serve.shutdown()
        ray.shutdown()


def serve_forever(settings: Settings) -> int:
    """The CLI's ray backend: connect, deploy, wait for SIGTERM/SIGINT, shut down."""
    stop = threading.Event()
    started = connect(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, whose own handlers would abort the process
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(settings)
        log.info(
            "serving on %s:%d through Ray Serve (%s cluster)",
            settings.bind_host(),
            settings.port,
            "a local" if started else f"the {settings.ray_address}",
        )
        stop.wait()
        log.info("stopping: removing the Serve application")
    finally:
        shutdown(started)
    return 0
