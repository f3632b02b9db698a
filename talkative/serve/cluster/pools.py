"""Worker pools: which Serve deployment serves which model groups, with how many replicas and what resources.

Each worker deployment is a *pool*. A group names its pool with the key `pool` in model_groups.json (default: the
one shared pool `default`); the groups of a pool are multiplexed on its replicas (a replica holds one on its device
and parks others in its CPU cache), so a group that needs replicas of its own names a pool of its own. The pool's
deployment settings are keys of its groups' entries, equal wherever several groups of a pool set them:

* `replicas` (fixed replica count, default 1), or `autoscaling` `{min_replicas, max_replicas,
  target_ongoing_requests}` (Serve's autoscaler; then `replicas` must not be set);
* `num_gpus`, `num_cpus` per replica (Ray resources; default 0 GPUs and 1 CPU; a replica with a GPU runs on
  `cuda:0`, the one Ray gives it);
* `max_ongoing_requests` (jobs one replica holds at once, interleaved and merged into shared engine batches;
  default MAX_ACTIVE_JOBS) and `max_queued_requests` (jobs one ingress replica lets wait for a free replica
  before Serve refuses more; default MAX_QUEUE_SIZE; -1 unbounded).

Read here, not by the catalogue, so that the local backend never depends on them; bad values and unknown keys in
`autoscaling` stop startup with the group's name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..catalog.registry import Registry, RegistryError
from ..settings import Settings

DEFAULT_POOL = "default"
AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "target_ongoing_requests")
#: the deployment keys a group entry may set
POOL_KEYS = ("replicas", "autoscaling", "num_gpus", "num_cpus", "max_ongoing_requests", "max_queued_requests")


class PoolError(RegistryError):
    """A pool setting model_groups.json gets wrong (startup stops with it)."""


@dataclass(frozen=True)
class Pool:
    """One worker deployment: its groups and Serve settings."""

    name: str
    groups: tuple[str, ...]
    replicas: int = 1
    autoscaling: dict[str, float] | None = None
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    max_ongoing_requests: int = 8
    max_queued_requests: int = 100
    #: groups one replica keeps (its device plus its CPU cache): Serve's multiplexing evicts beyond this, LRU
    max_groups: int = 3

    @property
    def deployment_name(self) -> str:
        return "worker-" + re.sub(r"[^0-9A-Za-z_-]", "_", self.name)

    @property
    def device(self) -> str:
        """The device a replica of this pool runs its engine on (Ray makes its GPU the process's cuda:0)."""
        return "cuda:0" if self.num_gpus > 0 else "cpu"

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of `serve.deployment(...)` / `.options(...)` for this pool."""
        opts: dict[str, Any] = {
            "name": self.deployment_name,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = dict(self.autoscaling)
        else:
            opts["num_replicas"] = self.replicas
        return opts


def _number(
    value: Any, key: str, where: str, *, integer: bool, least: float, allow: tuple[int, ...] = ()
) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or (value < least and value not in allow):
        kind = "an integer" if integer else "a number"
        extra = f" (or {', '.join(map(str, allow))})" if allow else ""
        raise PoolError(f"{where}: '{key}' must be {kind} ≥ {least:g}{extra}, not {value!r}")
    return value


def _autoscaling(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise PoolError(f"{where}: 'autoscaling' must be an object with {', '.join(AUTOSCALING_KEYS)}")
    unknown = sorted(set(value) - set(AUTOSCALING_KEYS))
    if unknown:
        raise PoolError(
            f"{where}: unknown 'autoscaling' keys {unknown} (known: {', '.join(AUTOSCALING_KEYS)})"
        )
    out: dict[str, float] = {}
    for key in ("min_replicas", "max_replicas"):
        if key in value:
            out[key] = _number(value[key], f"autoscaling.{key}", where, integer=True, least=0)
    if "target_ongoing_requests" in value:
        out["target_ongoing_requests"] = _number(
            value["target_ongoing_requests"],
            "autoscaling.target_ongoing_requests",
            where,
            integer=False,
            least=0,
        )
    if "max_replicas" not in out or out["max_replicas"] < 1:
        raise PoolError(f"{where}: 'autoscaling' needs max_replicas ≥ 1")
    if out.get("min_replicas", 0) > out["max_replicas"]:
        raise PoolError(f"{where}: autoscaling min_replicas is above max_replicas")
    return out


def _group_values(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """The pool keys one group entry sets, checked."""
    out: dict[str, Any] = {}
    if "replicas" in entry:
        out["replicas"] = _number(entry["replicas"], "replicas", where, integer=True, least=1)
    if "autoscaling" in entry:
        out["autoscaling"] = _autoscaling(entry["autoscaling"], where)
    for key in ("num_gpus", "num_cpus"):
        if key in entry:
            out[key] = float(_number(entry[key], key, where, integer=False, least=0))
    if "max_ongoing_requests" in entry:
        out["max_ongoing_requests"] = _number(
            entry["max_ongoing_requests"], "max_ongoing_requests", where, integer=True, least=1
        )
    if "max_queued_requests" in entry:
        out["max_queued_requests"] = _number(
            entry["max_queued_requests"], "max_queued_requests", where, integer=True, least=1, allow=(-1,)
        )
    if "replicas" in out and "autoscaling" in out:
        raise PoolError(f"{where}: set either 'replicas' or 'autoscaling', not both")
    return out


def parse_pools(
    data: Any, registry: Registry, settings: Settings, where_file: str = "model groups"
) -> dict[str, Pool]:
    """The pools of a parsed model_groups.json, by name, each with its groups in file order."""
    entries = data.get("model_groups", []) if isinstance(data, dict) else []
    members: dict[str, list[str]] = {}
    values: dict[str, dict[str, Any]] = {}
    setters: dict[tuple[str, str], str] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("group_id") not in registry.groups:
            continue
        gid = entry["group_id"]
        where = f"{where_file} group {gid!r}"
        pool = entry.get("pool", DEFAULT_POOL)
        if not isinstance(pool, str) or not pool.strip():
            raise PoolError(f"{where}: 'pool' must be a non-empty string")
        members.setdefault(pool, []).append(gid)
        mine = values.setdefault(pool, {})
        for key, value in _group_values(entry, where).items():
            if key in mine and mine[key] != value:
                raise PoolError(
                    f"{where}: '{key}' differs from group {setters[(pool, key)]!r} of the same pool {pool!r}; "
                    "set it once, or give the group a pool of its own"
                )
            mine[key] = value
            setters[(pool, key)] = gid
    cache = registry.max_cpu_groups(settings)
    pools = {}
    for name, groups in members.items():
        v = values[name]
        if "autoscaling" in v:
            v.pop("replicas", None)
        pools[name] = Pool(
            name=name,
            groups=tuple(groups),
            replicas=v.get("replicas", 1),
            autoscaling=v.get("autoscaling"),
            num_gpus=v.get("num_gpus", 0.0),
            num_cpus=v.get("num_cpus", 1.0),
            max_ongoing_requests=v.get("max_ongoing_requests", settings.max_active_jobs),
            max_queued_requests=v.get("max_queued_requests", settings.max_queue_size),
            max_groups=1 + max(cache, 0),
        )
    return pools


def load_pools(settings: Settings, registry: Registry) -> dict[str, Pool]:
    """The pools of the model_groups.json the settings name (the registry already read and checked it)."""
    path = Path(settings.model_groups_file)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PoolError(f"cannot read the pools of {path}: {exc}") from None
    return parse_pools(data, registry, settings, str(path))


def pool_of(pools: dict[str, Pool], group_id: str) -> Pool:
    """The pool that serves a group."""
    for pool in pools.values():
        if group_id in pool.groups:
            return pool
    raise PoolError(f"group {group_id!r} belongs to no worker pool")
