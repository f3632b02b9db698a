"""Worker pools from model_groups.json: groups share the default pool unless they name one, a pool's Serve
settings come from its groups' entries, and bad values stop startup with the group's name."""

from __future__ import annotations

from typing import Any

import pytest

from talkative.serve.catalog.registry import parse_registry
from talkative.serve.cluster.pools import DEFAULT_POOL, PoolError, parse_pools, pool_of
from talkative.serve.settings import Settings


def groups(*entries: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_groups": [
            {
                "group_id": gid,
                "models": [{"id": f"{gid}-m", "checkpoint": "init:bundled:smollm2-135m-instruct@4"}],
                **extra,
            }
            for gid, extra in (
                (e["group_id"], {k: v for k, v in e.items() if k != "group_id"}) for e in entries
            )
        ]
    }


def pools_of(data: dict[str, Any], **settings: Any) -> dict[str, Any]:
    config = Settings(env_overrides={}, _env_file=None, **settings)
    return parse_pools(data, parse_registry(data), config)


def test_groups_share_the_default_pool_with_the_servers_limits_as_defaults() -> None:
    pools = pools_of(groups({"group_id": "a"}, {"group_id": "b"}), max_active_jobs=5, max_queue_size=40)
    pool = pools[DEFAULT_POOL]
    assert pool.groups == ("a", "b") and pool_of(pools, "b") is pool
    assert (pool.replicas, pool.num_cpus, pool.num_gpus, pool.device) == (1, 1.0, 0.0, "cpu")
    assert (pool.max_ongoing_requests, pool.max_queued_requests) == (5, 40)
    assert pool.max_groups == 1 + 2  # its device plus MAX_CPU_CACHED_MODELS
    opts = pool.deployment_options()
    assert opts["name"] == "worker-default" and opts["num_replicas"] == 1
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_a_group_with_a_pool_of_its_own_gets_its_replicas_and_resources() -> None:
    data = groups(
        {"group_id": "a"},
        {"group_id": "big", "pool": "gpu", "replicas": 3, "num_gpus": 1, "max_ongoing_requests": 2},
        {"group_id": "big2", "pool": "gpu", "max_queued_requests": -1},
    )
    pools = pools_of(data)
    gpu = pools["gpu"]
    assert gpu.groups == ("big", "big2") and gpu.replicas == 3 and gpu.device == "cuda:0"
    assert (gpu.max_ongoing_requests, gpu.max_queued_requests) == (2, -1)
    assert pools[DEFAULT_POOL].groups == ("a",)


def test_autoscaling_replaces_a_replica_count() -> None:
    data = groups(
        {"group_id": "a", "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}}
    )
    opts = pools_of(data)[DEFAULT_POOL].deployment_options()
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"replicas": 0}, "'replicas' must be an integer"),
        ({"replicas": "2"}, "'replicas' must be an integer"),
        ({"num_gpus": -1}, "'num_gpus' must be a number"),
        ({"max_ongoing_requests": True}, "'max_ongoing_requests'"),
        ({"max_queued_requests": 0}, "'max_queued_requests'"),
        ({"autoscaling": {"max_replicas": 2, "warp": 9}}, "unknown 'autoscaling' keys ['warp']"),
        ({"autoscaling": {"min_replicas": 1}}, "needs max_replicas"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas is above"),
        ({"replicas": 2, "autoscaling": {"max_replicas": 2}}, "either 'replicas' or 'autoscaling'"),
        ({"pool": ""}, "'pool' must be a non-empty string"),
    ],
)
def test_bad_pool_settings_stop_startup_naming_the_group(extra: dict[str, Any], fragment: str) -> None:
    with pytest.raises(PoolError) as info:
        pools_of(groups({"group_id": "bad", **extra}))
    assert "group 'bad'" in str(info.value) and fragment in str(info.value)


def test_groups_of_one_pool_may_not_disagree() -> None:
    data = groups({"group_id": "a", "replicas": 2}, {"group_id": "b", "replicas": 3})
    with pytest.raises(PoolError, match="differs from group 'a' of the same pool"):
        pools_of(data)
