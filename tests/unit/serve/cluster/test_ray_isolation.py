"""The cluster tests start a Ray cluster of their own even when the environment names another (RAY_ADDRESS): a
developer's shell or another test run must never receive this run's deployments. Nothing listens at the address
set here, so joining it would fail."""

from __future__ import annotations

import pytest
from ray_cluster import free_port, start_local_ray

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray]


def test_a_test_cluster_ignores_the_ray_address_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = f"127.0.0.1:{free_port()}"  # a free port: no cluster there
    monkeypatch.setenv("RAY_ADDRESS", elsewhere)
    address = start_local_ray(1)
    try:
        assert ray.is_initialized() and address and address != elsewhere
        assert ray.get(ray.put("reachable")) == "reachable"
    finally:
        ray.shutdown()
