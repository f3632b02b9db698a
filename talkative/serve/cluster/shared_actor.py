"""The named actors Talkative's replicas share (the rate counter, the metrics board): found by name, started by
whichever replica asks first.

Detached, so an actor outlives the replica that happened to create it; restarted by Ray without limit, so losing
its node costs only what it held in memory; no CPU reserved, so it never takes a slot a replica needs.
"""

from __future__ import annotations

from typing import Any

import ray

#: the namespace of every named actor Talkative's replicas share (Serve's replicas run in their own namespace)
NAMESPACE = "talkative"


def shared_actor(cls: type, name: str, namespace: str = NAMESPACE) -> Any:
    """The handle of actor `name` of class `cls`. A blocking call to the cluster's control store: run it off the
    event loop."""
    return (
        ray.remote(cls)
        .options(
            name=name,
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            num_cpus=0,
        )
        .remote()
    )
