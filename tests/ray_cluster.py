"""A local Ray cluster for one test module, and the faults tests inject into it (shared by the cluster tests).

`RayCluster` starts Ray on this machine with a CPU count of its own and no dashboard (`start_local_ray`: always a
new cluster of its own, never one that RAY_ADDRESS or the last `ray start` names), starts Serve's proxy on a
free port (never the defaults: other test runs may hold a cluster at the same time), deploys Talkative (worker
pools and INGRESS_REPLICAS ingress replicas) with `talkative.serve.cluster.deploy.deploy`, and shuts everything
down at the end. `replicas(deployment)` lists the live replicas of a deployment with their process ids, from the
GCS's actor table (Serve names its replica actors `SERVE_REPLICA::<app>#<deployment>#<id>`), so a test can kill
one (`kill`) the way a crashed process or a lost node would go.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_group(gid: str, model_dir: Path, **pool: Any) -> dict[str, Any]:
    """A `model_groups.json` entry of one model (layer 1 of a tiny test model, untrained) with its pool's keys."""
    return {
        "group_id": gid,
        "group_name": gid,
        "base_model_path": str(model_dir),
        "models": [
            {"id": f"{gid}-l1", "checkpoint": f"init:{model_dir}@1", "layer": 1, "auto_batch_size_max": 32}
        ],
        **pool,
    }


def start_local_ray(num_cpus: int) -> str:
    """Start a new local Ray cluster for this process and return its address. `address="local"`, because without it
    `ray.init` joins the cluster RAY_ADDRESS names (a developer's, or another test run's) or the one `ray start` last
    started on this machine, and the tests would deploy into a cluster they do not own (and its CPUs).

    Tried up to three times: a head started in a process whose previous cluster has just stopped sometimes never
    sees its raylet register (Ray waits a fixed 30 s and gives up, "The current node timed out during startup"),
    most often on a loaded machine while the last cluster's processes are still exiting; a fresh attempt after a
    clean shutdown starts."""
    import ray

    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return str(ray.get_runtime_context().gcs_address)
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(5)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Replica:
    """A live replica: its deployment, Serve's replica id and its process."""

    deployment: str
    replica_id: str
    pid: int


class RayCluster:
    """One local Ray cluster with Serve's proxy on a free port (see the module)."""

    def __init__(self, num_cpus: int = 4) -> None:
        self.num_cpus = num_cpus
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> RayCluster:
        from ray import serve

        start_local_ray(self.num_cpus)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        return self

    def deploy(self, settings: Any, *, ingress_replicas: int | None = None, timeout: float = 240) -> None:
        """Deploy Talkative (its worker pools and ingress) and wait until the API answers /ready."""
        from talkative.serve.cluster.deploy import deploy

        deploy(settings, port=self.port, ingress_replicas=ingress_replicas)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        last: object = None
        while time.time() < deadline:
            try:
                r = httpx.get(self.url + "/ready", timeout=5)
                if r.status_code == 200:
                    return
                last = r.text
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.5)
        raise RuntimeError(f"the cluster's API was not ready after {timeout}s: {last}")

    def undeploy(self) -> None:
        from ray import serve

        from talkative.serve.cluster.names import APP_NAME

        serve.delete(APP_NAME)

    def replicas(self, deployment: str) -> list[Replica]:
        """The live replicas of a deployment of the Talkative application (e.g. `worker-default`, `ingress`)."""
        from ray._private import state

        from talkative.serve.cluster.names import APP_NAME

        prefix = f"SERVE_REPLICA::{APP_NAME}#{deployment}#"
        return [
            Replica(deployment, str(a["Name"])[len(prefix) :], int(a["Pid"]))
            for a in state.actors().values()
            if str(a.get("Name") or "").startswith(prefix) and a.get("State") == "ALIVE"
        ]

    @staticmethod
    def kill(pid: int) -> None:
        """Kill a replica's process outright (SIGKILL: no cleanup, as a crash or a lost node)."""
        os.kill(pid, signal.SIGKILL)

    def wait_replicas(self, deployment: str, count: int, timeout: float = 120) -> list[Replica]:
        """Wait until the deployment has `count` live replicas again (Serve replaces a dead one)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            live = self.replicas(deployment)
            if len(live) >= count:
                return live
            time.sleep(0.5)
        raise RuntimeError(f"{deployment} has not {count} live replicas after {timeout}s")

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
