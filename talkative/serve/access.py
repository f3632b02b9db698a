"""Who may see and use which model.

* `visible: false` (a model, or a whole group) keeps it out of every listing; it still runs when a request names
  it, as the seed's catalogue intends (a model kept for links and scripts, not offered to browse).
* `backend_only` (a model, or every model of a group) makes it the administrator's: listed and usable with the
  admin identity only (`ClientIdentity.is_admin`), refused with 403 to everyone else wherever a model is chosen
  (analyze, generate, switch, slim, vectors, preload, info, WebSocket), including as the current model of a
  request that names none.
"""

from __future__ import annotations

from typing import Any, Protocol

from .registry import GroupEntry, ModelEntry, Registry
from .scheduler import Scheduler
from .scheduler_types import SchedulerError


class Identity(Protocol):
    @property
    def is_admin(self) -> bool: ...


def backend_only(registry: Registry, model_id: str) -> bool:
    model = registry.model(model_id)
    return model.backend_only or registry.group(model.group_id).backend_only


def may_use(registry: Registry, model_id: str, who: Identity) -> bool:
    return who.is_admin or not backend_only(registry, model_id)


def check_model(registry: Registry, model_id: str, who: Identity) -> None:
    """403 for a backend_only model and a client that is not the administrator (UnknownModel when unknown)."""
    if not may_use(registry, model_id, who):
        raise SchedulerError(403, f"model {model_id} is reserved for the administrator (backend_only)")


def check_group(registry: Registry, group_id: str, who: Identity) -> GroupEntry:
    group = registry.group(group_id)
    if group.backend_only and not who.is_admin:
        raise SchedulerError(403, f"model group {group_id} is reserved for the administrator (backend_only)")
    return group


def resolve(scheduler: Scheduler, model_id: str | None, who: Identity) -> str:
    """The model a request runs on (the one it names, else the current one), checked for this client."""
    resolved = scheduler.resolve_model(model_id)
    if model_id is None and not may_use(scheduler.registry, resolved, who):
        raise SchedulerError(
            403, f"the current model {resolved} is reserved for the administrator: name a model_id"
        )
    check_model(scheduler.registry, resolved, who)
    return resolved


def listed_models(registry: Registry, group: GroupEntry, who: Identity) -> list[ModelEntry]:
    """The models of a group this client sees in listings (visible, and not backend_only unless admin)."""
    return [m for m in group.models if m.visible and may_use(registry, m.id, who)]


def listed_groups(registry: Registry, who: Identity) -> list[GroupEntry]:
    return [
        g
        for g in registry.groups.values()
        if g.visible and (who.is_admin or not g.backend_only) and listed_models(registry, g, who)
    ]


def filter_listing(listing: dict[str, Any], registry: Registry, who: Identity) -> dict[str, Any]:
    """`GET /api/v2/models` (and WebSocket `model_groups_list`) as this client may see it: backend_only models
    (and groups) only for the administrator; every group says whether it is backend_only."""
    groups = []
    for g in listing.get("groups", []):
        entry = registry.groups.get(g["group_id"])
        if entry is None:
            continue
        if entry.backend_only and not who.is_admin:
            continue
        models = [m for m in g["models"] if may_use(registry, m["id"], who)]
        if entry.backend_only:
            models = [{**m, "backend_only": True} for m in models]
        if models:
            groups.append({**g, "backend_only": entry.backend_only, "models": models})
    return {**listing, "groups": groups}
