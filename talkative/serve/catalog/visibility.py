"""Who may see and use which model.

* `visible: false` (a model, or a whole group) keeps it out of every listing; it still runs when a request names
  it, as the seed's catalogue intends (a model kept for links and scripts, not offered to browse).
* `backend_only` (a model, or every model of a group) makes it the administrator's: listed and usable with the
  admin identity only (`ClientIdentity.is_admin`), refused with 403 to everyone else wherever a model is chosen
  (analyze, generate, switch, slim, vectors, preload, info, WebSocket), including as the current model of a
  request that names none.

These are rules only: the views built with them are `listing.py`'s, and the model a request runs on is resolved
by the caller (the scheduler knows the client's current model; the catalogue does not import it).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..scheduling.types import SchedulerError
from .registry import GroupEntry, ModelEntry, Registry


class Identity(Protocol):
    @property
    def is_admin(self) -> bool: ...

    @property
    def key(self) -> str | None: ...  # the owner name whose current model a request without model_id runs on


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


def check_use(registry: Registry, model_id: str, who: Identity, *, named: bool) -> str:
    """The model a request runs on (`model_id`: the one it `named`, else its client's current model), checked
    for this client; a current model it may not use is refused with advice, as the client never chose it."""
    if not named and not may_use(registry, model_id, who):
        raise SchedulerError(
            403, f"the current model {model_id} is reserved for the administrator: name a model_id"
        )
    check_model(registry, model_id, who)
    return model_id


def listed_models(registry: Registry, group: GroupEntry, who: Identity) -> list[ModelEntry]:
    """The models of a group this client sees in listings (visible, and not backend_only unless admin)."""
    return [m for m in group.models if m.visible and may_use(registry, m.id, who)]


def listed_groups(registry: Registry, who: Identity) -> list[GroupEntry]:
    return [
        g
        for g in registry.groups.values()
        if g.visible and (who.is_admin or not g.backend_only) and listed_models(registry, g, who)
    ]


class _Anonymous:
    """Whoever reads a public route (`/health`) or a label every key sees (`/metrics`): not the administrator."""

    is_admin = False
    key = None


ANYONE: Identity = _Anonymous()


def sees_group(registry: Registry, group_id: str | None, who: Identity) -> bool:
    """Whether this client may learn that a group exists: the listings' rule (`listed_groups`), applied to
    every other place a group id could appear (health, metrics labels, broadcasts, not-found answers)."""
    group = registry.groups.get(group_id or "")
    if group is None or not group.visible or (group.backend_only and not who.is_admin):
        return False
    return bool(listed_models(registry, group, who))


def sees_model(registry: Registry, model_id: str | None, who: Identity) -> bool:
    """Whether this client may learn that a model exists (listed: visible, in a visible group, usable)."""
    model = registry.models.get(model_id or "")
    if model is None or not model.visible:
        return False
    return sees_group(registry, model.group_id, who) and may_use(registry, model.id, who)


def shown_group(registry: Registry, group_id: str | None, who: Identity) -> str | None:
    return group_id if sees_group(registry, group_id, who) else None


def shown_model(registry: Registry, model_id: str | None, who: Identity) -> str | None:
    return model_id if sees_model(registry, model_id, who) else None


def public_health(health: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """`GET /health` for anyone (it is public): hidden and backend_only groups and models become null or drop
    out, so the probe tells nobody that they exist, or which of them a device holds."""
    devices = []
    for dev in health.get("devices", []):
        devices.append(
            {
                **dev,
                "group_id": shown_group(registry, dev.get("group_id"), ANYONE),
                "models": [m for m in dev.get("models", []) if sees_model(registry, m, ANYONE)],
                "loading": shown_group(registry, dev.get("loading"), ANYONE),
                "draining_for": shown_group(registry, dev.get("draining_for"), ANYONE),
            }
        )
    return {
        **health,
        "current_model": shown_model(registry, health.get("current_model"), ANYONE),
        "devices": devices,
    }


def visible_broadcast(message: dict[str, Any], registry: Registry, who: Identity) -> dict[str, Any] | None:
    """A message for every connection as this one may see it: None when it is about a group the client may not
    know of (a `group_switch_status` of a hidden group), a hidden source group named as null."""
    if "group_id" in message and not sees_group(registry, message["group_id"], who):
        return None
    if message.get("source_group_id") is not None and not sees_group(
        registry, message["source_group_id"], who
    ):
        return {**message, "source_group_id": None}
    return message
